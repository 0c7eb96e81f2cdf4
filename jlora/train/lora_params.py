"""The trainable LoRA weights, and the one-slot bank that runs them through the serving forward.

Trainable params are one pair per targeted module, unscaled, as PEFT stores them (transposed to x @ W):
  lora[module] = {"a": [L, d_in, r], "b": [L, r, d_out]}
`to_bank` lays them out as bank slot 0 (bucket = r, scale folded into B), so training runs the same
`jlora.model.llama.forward` and `jlora.lora.ops.lora_project` code as serving.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jlora.config import FUSED_CHECKPOINTS, FUSED_MODULES, LORA_GROUPS, LORA_MODULES, ModelConfig, parse_lora_modules
from jlora.lora.bank import BucketBank, LoraBank, group_dims

TrainableLora = dict[str, dict[str, jax.Array]]
parse_targets = parse_lora_modules


def lora_scale(rank: int, alpha: float, rslora: bool) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def module_dims(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of every LoRA-able module."""
    out = {}
    for group, (d_in, d_outs) in group_dims(config).items():
        for module, d_out in zip(LORA_GROUPS[group], d_outs):
            out[module] = (d_in, d_out)
    return out


def init_lora(config: ModelConfig, targets: tuple[str, ...], rank: int, key: jax.Array) -> TrainableLora:
    """PEFT's default init: A ~ kaiming_uniform(a=sqrt(5)), i.e. U(-1/sqrt(d_in), 1/sqrt(d_in)); B = 0.

    So the adapted model starts exactly at the base model.
    """
    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    if config.model_type in FUSED_CHECKPOINTS:  # PEFT's Phi-3 has no q_proj..., so the export could not load
        raise ValueError(f"training LoRA on a {config.model_type} base is not supported: its PEFT adapters target "
                         f"fused modules {list(FUSED_MODULES)}, which jlora train does not export")
    dims = module_dims(config)
    L = config.num_layers
    keys = jax.random.split(key, len(targets))
    lora = {}
    for module, k in zip(targets, keys):
        d_in, d_out = dims[module]
        bound = 1.0 / math.sqrt(d_in)
        lora[module] = {"a": jax.random.uniform(k, (L, d_in, rank), jnp.float32, -bound, bound),
                        "b": jnp.zeros((L, rank, d_out), jnp.float32)}
    return lora


def to_bank(lora: TrainableLora, config: ModelConfig, rank: int, scale: float) -> LoraBank:
    """A one-slot bank (bucket = rank) holding `lora`, scale folded into B; untargeted modules are zeros.

    Differentiable: gradients flow from the bank back to `lora`.
    """
    L = config.num_layers
    a, b = {}, {}
    for group, (d_in, d_outs) in group_dims(config).items():
        a_parts, b_parts = [], []
        for module, d_out in zip(LORA_GROUPS[group], d_outs):
            if module in lora:
                a_parts.append(lora[module]["a"])
                b_parts.append(lora[module]["b"] * scale)
            else:
                a_parts.append(jnp.zeros((L, d_in, rank), jnp.float32))
                b_parts.append(jnp.zeros((L, rank, d_out), jnp.float32))
        a[group] = jnp.concatenate(a_parts, axis=-1)[:, None]  # [L, 1, d_in, n * r], q|k|v blocks
        b[group] = tuple(x[:, None] for x in b_parts)  # each [L, 1, r, d_j]
    return LoraBank(buckets=(BucketBank(a=a, b=b, rank=rank, offset=0),))
