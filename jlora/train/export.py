"""Writes trained LoRA weights as a PEFT adapter directory (read by jlora and by Hugging Face PEFT)."""

from __future__ import annotations

import json
import os

import ml_dtypes  # a jax dependency: numpy has no bfloat16 of its own
import numpy as np
from safetensors.numpy import save_file

from jlora.lora.peft import CONFIG_FILE, WEIGHTS_FILE
from jlora.train.lora_params import TrainableLora

_MLP = ("gate_proj", "up_proj", "down_proj")
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def peft_key(layer: int, module: str, side: str) -> str:
    """PEFT's tensor name, e.g. base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight."""
    part = "mlp" if module in _MLP else "self_attn"
    return f"base_model.model.model.layers.{layer}.{part}.{module}.lora_{side}.weight"


def peft_tensors(lora: TrainableLora) -> dict[str, np.ndarray]:
    """PEFT layout, unscaled: lora_A [r, d_in] and lora_B [d_out, r] per layer and module (float32)."""
    out = {}
    for module, ab in lora.items():
        a, b = np.asarray(ab["a"], np.float32), np.asarray(ab["b"], np.float32)  # [L, d_in, r], [L, r, d_out]
        for layer in range(a.shape[0]):
            out[peft_key(layer, module, "A")] = np.ascontiguousarray(a[layer].T)
            out[peft_key(layer, module, "B")] = np.ascontiguousarray(b[layer].T)
    return out


def adapter_config(*, rank: int, alpha: float, rslora: bool, targets: tuple[str, ...], base_model: str) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "use_rslora": rslora,
        "target_modules": list(targets),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def save_peft(path: str, lora: TrainableLora, *, rank: int, alpha: float, rslora: bool,
              targets: tuple[str, ...], base_model: str, dtype: str = "float32",
              metadata: dict | None = None) -> str:
    """Writes adapter_config.json and adapter_model.safetensors into `path` (created if needed).

    Args:
      dtype: storage dtype of the tensors: "float32", "bfloat16" or "float16".
      metadata: extra string fields for the safetensors header (e.g. how the adapter was trained).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    tensors = {k: v.astype(DTYPES[dtype]) for k, v in peft_tensors(lora).items()}
    os.makedirs(path, exist_ok=True)
    header = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}
    save_file(tensors, os.path.join(path, WEIGHTS_FILE), metadata=header)
    cfg = adapter_config(rank=rank, alpha=alpha, rslora=rslora, targets=targets, base_model=base_model)
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    return path
