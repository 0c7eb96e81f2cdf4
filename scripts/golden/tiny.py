"""Tiny random HF checkpoints and random PEFT LoRA adapters for them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from .fileio import load_json, save_json

COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
              vocab_size=256, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
              pad_token_id=0, hidden_act="silu")

# The newer families are smaller still (hidden 32, vocab 128), to keep the fixtures small.
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=128,
             max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)

LINEAR_STD, EMBED_STD, BIAS_STD, NORM_STD, LORA_STD = 0.15, 0.2, 0.1, 0.1, 0.08


@dataclass
class ModelSpec:
    name: str
    arch: str  # a transformers *ForCausalLM class name
    seed: int
    config: dict
    max_shard_size: str | None = None  # set: saved as model-0000x-of-0000y.safetensors + index
    config_class: str = ""  # default: the class name with ForCausalLM -> Config
    norm_center: float = 1.0  # norm weights are norm_center + N(0, NORM_STD); Gemma scales by 1 + weight: 0
    notes: str = ""


@dataclass
class AdapterSpec:
    name: str
    r: int
    lora_alpha: float
    target_modules: list[str] | str
    use_rslora: bool = False
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)


MODELS = [
    ModelSpec("llama_tied", "LlamaForCausalLM", 1001, dict(
        COMMON, num_key_value_heads=4, tie_word_embeddings=True, rms_norm_eps=1e-5,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64}, rope_theta=500000.0),
        notes="tied embeddings, MHA (4 kv heads), llama3 rope scaling"),
    ModelSpec("llama_gqa", "LlamaForCausalLM", 1002, dict(
        COMMON, num_key_value_heads=2, tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=10000.0),
        max_shard_size="200KB", notes="untied, GQA 4 heads / 2 kv heads, sharded safetensors + index"),
    ModelSpec("qwen2", "Qwen2ForCausalLM", 1003, dict(
        COMMON, num_key_value_heads=2, tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=1000000.0,
        use_sliding_window=False), notes="q/k/v biases, GQA 4/2, untied"),
    ModelSpec("mistral", "MistralForCausalLM", 1004, dict(
        COMMON, num_key_value_heads=2, tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=1000000.0,
        sliding_window=8), notes="GQA 4/2, untied, sliding_window=8 (active: prompts of 9 and 16 tokens exceed it)"),
    ModelSpec("qwen3", "Qwen3ForCausalLM", 1005, dict(
        SMALL, hidden_act="silu", num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, rms_norm_eps=1e-6,
        rope_theta=1000000.0), notes="q/k RMSNorm per head before RoPE, head_dim 16 != hidden/heads, GQA 4/2, tied"),
    ModelSpec("phi3", "Phi3ForCausalLM", 1006, dict(
        SMALL, hidden_act="silu", num_key_value_heads=2, tie_word_embeddings=False, rms_norm_eps=1e-5,
        rope_theta=10000.0, sliding_window=6, original_max_position_embeddings=256),
        notes="fused qkv_proj and gate_up_proj, GQA 4/2, untied, sliding_window=6 (active on the 9- and 16-token "
              "prompts)"),
    ModelSpec("gemma2", "Gemma2ForCausalLM", 1007, dict(
        SMALL, hidden_activation="gelu_pytorch_tanh", num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
        tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=10000.0, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"], attn_logit_softcapping=1.0,
        final_logit_softcapping=2.0), norm_center=0.0,
        notes="soft-capped attention (1.0) and final logits (2.0), layer 0 slides (window 4), layer 1 is global, "
              "GeGLU, embeddings times sqrt(32), (1 + w) RMSNorms before and after attention and MLP, "
              "query_pre_attn_scalar 24 != head_dim 16, tied"),
    ModelSpec("gemma3", "Gemma3ForCausalLM", 1008, dict(
        SMALL, hidden_activation="gelu_pytorch_tanh", num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
        tie_word_embeddings=True, rms_norm_eps=1e-6, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}), norm_center=0.0,
        config_class="Gemma3TextConfig",
        notes="Gemma3ForCausalLM (gemma3_text): (1 + w) q/k norms, layer 0 slides (window 4, rope_theta 1e4), layer 1 "
              "is global (rope_theta 1e6, linear scaling x4), no soft-capping, GeGLU, scaled embeddings, sandwich "
              "norms, query_pre_attn_scalar 24, tied"),
]

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

ADAPTERS = {
    "llama_gqa": [
        AdapterSpec("q_r1", 1, 4.0, ["q_proj"]),
        AdapterSpec("k_r3", 3, 6.0, ["k_proj"]),
        AdapterSpec("v_r8", 8, 16.0, ["v_proj"]),
        AdapterSpec("o_r12_rslora", 12, 24.0, ["o_proj"], use_rslora=True),
        AdapterSpec("gate_r64", 64, 32.0, ["gate_proj"]),
        AdapterSpec("all_r8_patterns", 8, 16.0, ALL7, rank_pattern={"q_proj": 4, "down_proj": 16},
                    alpha_pattern={"v_proj": 32}),
    ],
    "llama_tied": [
        AdapterSpec("up_r8", 8, 4.0, ["up_proj"]),
        AdapterSpec("attn_r4_rslora", 4, 8.0, ["q_proj", "k_proj", "v_proj", "o_proj"], use_rslora=True),
    ],
    "qwen2": [
        AdapterSpec("down_r3", 3, 5.0, ["down_proj"]),
        AdapterSpec("alllinear_r12", 12, 6.0, "all-linear"),
    ],
    "qwen3": [
        AdapterSpec("qk_r4", 4, 8.0, ["q_proj", "k_proj"]),
        AdapterSpec("all_r8_rslora_patterns", 8, 16.0, "all-linear", use_rslora=True,
                    rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 4}),
    ],
    "phi3": [
        AdapterSpec("qkv_o_r6", 6, 12.0, ["qkv_proj", "o_proj"]),
        AdapterSpec("alllinear_r16_patterns", 16, 8.0, "all-linear", use_rslora=True,
                    rank_pattern={"qkv_proj": 3, "down_proj": 32}, alpha_pattern={"gate_up_proj": 24}),
    ],
    "gemma2": [
        AdapterSpec("qv_r4", 4, 8.0, ["q_proj", "v_proj"]),
        AdapterSpec("all_r8_rslora_patterns", 8, 16.0, "all-linear", use_rslora=True,
                    rank_pattern={"o_proj": 2, "up_proj": 12}, alpha_pattern={"gate_proj": 4}),
    ],
    "gemma3": [
        AdapterSpec("k_o_r3", 3, 6.0, ["k_proj", "o_proj"]),
        AdapterSpec("all_r12_patterns", 12, 24.0, "all-linear", rank_pattern={"q_proj": 6}, alpha_pattern={"down_proj": 6}),
    ],
    "mistral": [
        AdapterSpec("qv_r2", 2, 8.0, ["q_proj", "v_proj"]),
        AdapterSpec("all_r16_rslora_patterns", 16, 8.0, ALL7, use_rslora=True,
                    rank_pattern={"gate_proj": 1, "k_proj": 64}, alpha_pattern={"o_proj": 2, "k_proj": 32}),
    ],
}


def _cls(arch, config_class=""):
    import transformers
    return getattr(transformers, arch), getattr(transformers, config_class or arch.replace("ForCausalLM", "Config"))


@torch.no_grad()
def randomize_(model, seed: int, norm_center: float = 1.0) -> None:
    """Larger-than-default random weights so logits are O(1): linears N(0, .15), embeddings N(0, .2),
    biases N(0, .1), norm weights norm_center + N(0, .1). Iterates named_parameters (tied weights once)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if name.endswith("norm.weight"):
            p.copy_(norm_center + NORM_STD * noise)
        elif name.endswith(".bias"):
            p.copy_(BIAS_STD * noise)
        elif "embed_tokens" in name:
            p.copy_(EMBED_STD * noise)
        else:
            p.copy_(LINEAR_STD * noise)


def build_model(spec: ModelSpec, out_dir: str) -> None:
    """Random-init the model and save it (fp32 safetensors + config.json)."""
    model_cls, config_cls = _cls(spec.arch, spec.config_class)
    torch.manual_seed(spec.seed)
    config = config_cls(**spec.config, attn_implementation="eager", dtype="float32")
    model = model_cls(config).to(torch.float32).eval()
    randomize_(model, spec.seed, spec.norm_center)
    kw = {"max_shard_size": spec.max_shard_size} if spec.max_shard_size else {}
    model.save_pretrained(out_dir, **kw)
    names = sorted(os.listdir(out_dir))
    if spec.max_shard_size and not any(n.endswith(".index.json") for n in names):
        raise RuntimeError(f"{spec.name}: expected a sharded checkpoint, got {names}")


def load_model(model_dir: str):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


@torch.no_grad()
def build_adapter(model_dir: str, model_rel: str, spec: AdapterSpec, seed: int, out_dir: str):
    """Attach a LoRA to a fresh base, give EVERY lora_A/lora_B fresh N(0, .08) values (PEFT zeroes B),
    save it, and return the in-memory PeftModel (eval) for a save/load cross-check."""
    from peft import LoraConfig, get_peft_model

    base = load_model(model_dir)
    cfg = LoraConfig(r=spec.r, lora_alpha=spec.lora_alpha, target_modules=spec.target_modules,
                     lora_dropout=0.0, bias="none", use_rslora=spec.use_rslora, task_type="CAUSAL_LM",
                     rank_pattern=dict(spec.rank_pattern), alpha_pattern=dict(spec.alpha_pattern))
    torch.manual_seed(seed)
    peft_model = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(seed)
    n = 0
    for name, p in peft_model.named_parameters():
        if "lora_A" in name or "lora_B" in name:
            p.copy_(LORA_STD * torch.randn(p.shape, generator=g, dtype=torch.float32))
            n += 1
    if n == 0:
        raise RuntimeError(f"{spec.name}: no LoRA weights were created")
    peft_model.eval()
    peft_model.save_pretrained(out_dir, safe_serialization=True)
    _tidy_adapter_dir(out_dir, model_rel)
    return peft_model


def _tidy_adapter_dir(out_dir: str, model_rel: str) -> None:
    """Make adapter_config.json reproducible (sorted lists, a fixtures-relative base path) and drop the
    generated model card."""
    path = os.path.join(out_dir, "adapter_config.json")
    cfg = load_json(path)
    for key, val in cfg.items():
        if isinstance(val, list) and all(isinstance(v, str) for v in val):
            cfg[key] = sorted(val)
    cfg["base_model_name_or_path"] = model_rel
    save_json(path, cfg)
    card = os.path.join(out_dir, "README.md")
    if os.path.exists(card):
        os.remove(card)


def load_adapter(model_dir: str, adapter_dir: str):
    from peft import PeftModel
    return PeftModel.from_pretrained(load_model(model_dir), adapter_dir).eval()


def adapter_facts(peft_model, spec: AdapterSpec, adapter_dir: str) -> dict:
    """Readable facts: config values plus the effective per-module rank and scaling PEFT applied."""
    cfg = load_json(os.path.join(adapter_dir, "adapter_config.json"))
    per_module = {}
    for name, mod in peft_model.named_modules():
        if hasattr(mod, "scaling") and isinstance(getattr(mod, "scaling"), dict) and "default" in mod.scaling:
            short = name.split(".")[-1]
            entry = {"r": int(mod.r["default"]), "scaling": float(mod.scaling["default"])}
            prev = per_module.setdefault(short, entry)
            if prev != entry:
                raise RuntimeError(f"{spec.name}: {short} differs across layers: {prev} vs {entry}")
    return {"r": cfg["r"], "lora_alpha": cfg["lora_alpha"], "use_rslora": cfg["use_rslora"],
            "target_modules": cfg["target_modules"], "target_modules_requested": spec.target_modules,
            "rank_pattern": cfg.get("rank_pattern") or {}, "alpha_pattern": cfg.get("alpha_pattern") or {},
            "effective": dict(sorted(per_module.items()))}
