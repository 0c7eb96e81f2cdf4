"""Tracing and lowering time of one 8B step program: what a restart spends per step program before it can look up
the persistent compilation cache (the compile itself is then a cache load).

Abstract inputs only (`jax.ShapeDtypeStruct`: no weights are made), so it runs anywhere. Three layer loops over
the same step (8B-shaped Llama, bf16, a rank-16 bank of 8 slots, pages of 16, 2,048 pages):
  split, per layer   the baseline: per-layer weights, each layer traced and lowered in turn
  split, nested jit  what the GPU runs: every layer through one nested jit (`llama._layer_call`), lowered once
  scan               stacked weights, one scanned layer body (the CPU and TPU default)
for a decode step at 8 and 64 sequences and a 64 x 128-token prefill step. The kernels are the platform's
(`RuntimeConfig` resolved here: on a CPU the XLA attention and LoRA paths, so the Pallas kernels' own lowering,
which the GPU repeats per layer in the baseline, is not in the CPU figures). Prints a table and writes
benchmarks/results/lowering_<platform>.json.

  python scripts/bench_lowering.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_forward import LLAMA_8B  # noqa: E402

from jlora.config import LoraBankConfig, RuntimeConfig  # noqa: E402
from jlora.engine import model_runner  # noqa: E402
from jlora.lora.bank import init_bank  # noqa: E402
from jlora.model import init_params, llama  # noqa: E402
from jlora.model.kv_cache import KVCache  # noqa: E402

SHAPES = [("decode", 8, 1), ("decode", 64, 1), ("prefill", 64, 128)]  # (mode, sequences, tokens per row)


def _inputs(config, split: bool):
    """Abstract params (per-layer if `split`), bank and page pool."""
    params = jax.eval_shape(lambda: init_params(config, jax.random.key(0), jnp.bfloat16))
    if split:
        layer = {k: jax.ShapeDtypeStruct(v.shape[1:], v.dtype) for k, v in params["layers"].items()}
        params = dict(params, layers=(layer,) * config.num_layers)
    bank = jax.eval_shape(lambda: init_bank(config, LoraBankConfig(buckets=(16,), slots=(8,)), jnp.bfloat16))
    cache = jax.eval_shape(lambda: KVCache.pages(config, 2048, 16, jnp.bfloat16))
    return params, bank, cache


def _lower_seconds(config, runtime, split: bool, B: int, T: int, repeats: int) -> float:
    """Median seconds to trace and lower the step's forward, JAX's caches cleared before each."""
    params, bank, cache = _inputs(config, split)
    a = dict(tokens=np.zeros((B, T), np.int32), positions=np.zeros((B, T), np.int32),
             lora_ids=np.zeros((B, T), np.int32), page_table=np.zeros((B, 256), np.int32),
             logit_index=np.zeros((B,), np.int32))
    times = []
    for _ in range(repeats):
        jax.clear_caches()
        t0 = time.perf_counter()
        model_runner._paged_logits.lower(params, bank, cache, **a, config=config, runtime=runtime)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/lowering_<platform>.json)")
    args = p.parse_args()
    config, nested = LLAMA_8B, llama._layer_call
    variants = [("split, per layer", "split", llama._layer), ("split, nested jit", "split", nested),
                ("scan", "scan", nested)]
    rows = []
    for name, loop, layer_fn in variants:
        runtime = RuntimeConfig(layer_loop=loop).resolved()
        llama._layer_call = layer_fn  # the baseline traces each layer itself, as the loop did before
        try:
            for mode, B, T in SHAPES:
                s = _lower_seconds(config, runtime, loop == "split", B, T, args.repeats)
                rows.append({"loop": name, "mode": mode, "sequences": B, "tokens": T, "seconds": round(s, 3)})
                print(f"{name:<20}{mode:<9}{B:>4} x {T:<4}{s:>8.3f} s", flush=True)
        finally:
            llama._layer_call = nested
    base = {(r["mode"], r["sequences"]): r["seconds"] for r in rows if r["loop"] == "split, per layer"}
    print(f"\n{'loop':<20}{'step':<16}{'seconds':>8}{'x baseline':>12}")
    for r in rows:
        r["vs_baseline"] = round(r["seconds"] / base[r["mode"], r["sequences"]], 3)
        print(f"{r['loop']:<20}{r['mode'] + ' ' + str(r['sequences']) + 'x' + str(r['tokens']):<16}"
              f"{r['seconds']:>8.3f}{r['vs_baseline']:>12.3f}")
    platform = jax.default_backend()
    out = args.out or os.path.join(os.path.dirname(HERE), "benchmarks", "results", f"lowering_{platform}.json")
    with open(out, "w") as f:
        json.dump({"command": " ".join(["scripts/bench_lowering.py", *sys.argv[1:]]), "platform": platform,
                   "device": jax.devices()[0].device_kind, "model": "llama-8b-shaped", "rows": rows,
                   "baseline": "split, per layer", "floor": "none: the figure is host time before the cache "
                   "lookup; the scan, which traces one layer, bounds what the nested jit can reach"}, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
