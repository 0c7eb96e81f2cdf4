"""Tiny models and a mixed-rank LoRA bank shared by the sharding checks. No side effects on import."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from helpers import write_adapter

from jlora.config import LoraBankConfig, ModelConfig
from jlora.lora.bank import BucketBank, LoraBank, group_dims
from jlora.lora.peft import load_adapter
from jlora.model import llama

def run_check(script: str, timeout_s: int = 300) -> dict:
    """Runs a check script on 8 simulated CPU devices in a subprocess (the device count must be set before jax
    starts, and this process's jax has already started) and returns the JSON it prints last."""
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"  # keeps the opt level
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags.strip())
    proc = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=timeout_s)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


KV8 = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8,
                  num_kv_heads=8, head_dim=8, qkv_bias=True, max_position_embeddings=64)
# Fewer kv heads than tp=4, tied embeddings, and a vocab that tp does not divide (padded to 100).
KV2 = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8,
                  num_kv_heads=2, head_dim=8, tie_word_embeddings=True, max_position_embeddings=64)
BANK = LoraBankConfig(buckets=(8, 16), slots=(4, 2))
# (rank, target modules) of the adapters in global slots 0..5: ranks 4 and 12 are zero-padded to 8 and 16.
ADAPTERS = [(8, None), (8, None), (4, None), (8, ("q_proj", "v_proj", "down_proj")), (16, None),
            (12, ("o_proj", "gate_proj", "up_proj"))]


def random_params(config: ModelConfig, seed: int) -> dict:
    """Host float32 weights keyed like `Llama.params()`: norms near 1, embeddings N(0, 1), matrices N(0, 0.1)."""
    rng = np.random.default_rng(seed)
    shapes = llama.param_shapes(config)
    out = {}
    for key, shape in [*((k, s) for k, s in shapes.items() if k != "layers"),
                       *((("layers", k), s) for k, s in shapes["layers"].items())]:
        name = key[1] if isinstance(key, tuple) else key
        x = 1 + rng.normal(0, 0.1, shape) if "norm" in name else rng.normal(0, 1.0 if name == "embed" else 0.1, shape)
        if isinstance(key, tuple):
            out.setdefault("layers", {})[name] = x.astype(np.float32)
        else:
            out[name] = x.astype(np.float32)
    return out


def random_bank(config: ModelConfig, tmp: str) -> LoraBank:
    """A host bank with the ADAPTERS written by `helpers.write_adapter` and loaded like any PEFT adapter."""
    dims, L = group_dims(config), config.num_layers
    host = {rank: ({g: np.zeros((L, s, d_in, len(d_outs) * rank), np.float32) for g, (d_in, d_outs) in dims.items()},
                   {g: [np.zeros((L, s, rank, d), np.float32) for d in d_outs] for g, (_, d_outs) in dims.items()})
            for rank, s in BANK.active}
    offsets = dict(zip([r for r, _ in BANK.active], np.cumsum([0] + [s for _, s in BANK.active])))
    for slot, (r, targets) in enumerate(ADAPTERS):
        kw = {"targets": targets} if targets else {}
        path = write_adapter(os.path.join(tmp, f"a{slot}_{config.num_kv_heads}"), config, r=r, alpha=2.0 * r,
                             seed=100 + slot, **kw)
        ad = load_adapter(path, config, BANK)
        a, b = host[ad.bucket]
        ad_a, ad_b = ad.dense(config)
        local = slot - offsets[ad.bucket]
        assert 0 <= local < dict(BANK.active)[ad.bucket], (slot, ad.bucket)
        for g in a:
            a[g][:, local] = ad_a[g]
            for j, bj in enumerate(ad_b[g]):
                b[g][j][:, local] = bj
    return LoraBank(buckets=tuple(BucketBank(a=host[r][0], b={g: tuple(x) for g, x in host[r][1].items()}, rank=r,
                                             offset=int(offsets[r])) for r, _ in BANK.active))
