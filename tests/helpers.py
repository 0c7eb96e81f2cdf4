"""Builders of tiny random checkpoints and adapters, written to disk the way Hugging Face lays them out."""

from __future__ import annotations

import json
import os

import numpy as np
from safetensors.numpy import save_file

from jlora.checkpoint.hf import save_hf_dir
from jlora.config import LORA_MODULES, ModelConfig

TINY = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=8, max_position_embeddings=128, rope_theta=10000.0)


def module_dims(config: ModelConfig) -> dict[str, tuple[int, int]]:
    d, f = config.hidden_size, config.intermediate_size
    return {"q_proj": (d, config.q_dim), "k_proj": (d, config.kv_dim), "v_proj": (d, config.kv_dim),
            "o_proj": (config.q_dim, d), "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}


def random_hf_tensors(config: ModelConfig, seed: int = 0, std: float = 0.2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = {"model.embed_tokens.weight": rng.normal(0, 1, (config.vocab_size, config.hidden_size)),
         "model.norm.weight": 1 + rng.normal(0, 0.1, config.hidden_size)}
    if not config.tie_word_embeddings:
        t["lm_head.weight"] = rng.normal(0, std, (config.vocab_size, config.hidden_size))
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = 1 + rng.normal(0, 0.1, config.hidden_size)
        t[p + "post_attention_layernorm.weight"] = 1 + rng.normal(0, 0.1, config.hidden_size)
        for m, (d_in, d_out) in module_dims(config).items():
            part = "mlp" if m in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            t[f"{p}{part}.{m}.weight"] = rng.normal(0, std, (d_out, d_in))
    return {k: v.astype(np.float32) for k, v in t.items()}


def write_model(path: str, config: ModelConfig = TINY, seed: int = 0) -> str:
    save_hf_dir(random_hf_tensors(config, seed), config, path)
    return path


def write_adapter(path: str, config: ModelConfig = TINY, r: int = 4, alpha: float = 8.0,
                  targets=LORA_MODULES, seed: int = 0, use_rslora: bool = False, std: float = 0.1,
                  extra_config: dict | None = None, tensors_override: dict | None = None) -> str:
    """A PEFT-layout adapter with random (never zero) A and B."""
    rng = np.random.default_rng(seed)
    os.makedirs(path, exist_ok=True)
    tensors = {}
    for i in range(config.num_layers):
        for m in targets:
            d_in, d_out = module_dims(config)[m]
            part = "mlp" if m in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            key = f"base_model.model.model.layers.{i}.{part}.{m}"
            tensors[f"{key}.lora_A.weight"] = rng.normal(0, std, (r, d_in)).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = rng.normal(0, std, (d_out, r)).astype(np.float32)
    tensors.update(tensors_override or {})
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": list(targets),
           "use_rslora": use_rslora, "bias": "none", **(extra_config or {})}
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)
    return path


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))
