"""Decode tuning sweep: the serving engine's batch-64 decode throughput under variants of its GPU decode path.

Each variant patches one module-level choice, clears JAX's caches and measures `bench_serving`'s decode comparison
(64 requests decoding at once, LoRA off and each request on its own rank-16 q/k/v/o adapter; the second of two
replays counts). The choices:
  - `attention.DECODE_ATTENTION_PROGRAMS`: how far the paged-attention kernel splits each row's pages (a huge value
    gives the fixed 16-way split used before);
  - `llama.FOLD_RESIDUAL`: whether the o/down projections add the residual before the LoRA delta;
  - the Triton LoRA tiling of decode-sized steps (`pallas_kernels.tuning`), and how they expand
    (`tuning.DECODE_EXPAND`: the tiled kernel or XLA's gather-einsum). Variants name the tiling they run, so the
    list reads the same after a default changes; "before" marks what shipped when it was measured.
Variants that change only the LoRA path are measured with adapters alone. Prints a table and writes JSON; the
ratio column is each variant's tok/s against the first variant's, measured in the same run.

  python3 scripts/sweep_decode.py --out benchmarks/results/decode_sweep_h100.json
  python3 scripts/sweep_decode.py --tiny --tokens 8 --out /tmp/sweep.json      # a CPU smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_forward import LLAMA_8B, TINY  # noqa: E402
from bench_serving import bench_engine, engine_config, measured_decode, save  # noqa: E402
from serving_workload import write_adapters  # noqa: E402
from jlora.model import attention, init_params, llama  # noqa: E402
from pallas_kernels import tuning  # noqa: E402

_SHRINK, _EXPAND = tuning.gpu_shrink_blocks, tuning.gpu_expand_blocks
OLD_SPLIT = 1 << 30  # DECODE_ATTENTION_PROGRAMS that always splits 16 ways, as before


def decode_tiling(shrink=None, expand=None):
    """Patches for the Triton tiling of decode-sized steps (T <= 256): field overrides of the shipped blocks."""
    def shrink_blocks(t, d_in, rank, itemsize=2):
        b = _SHRINK(t, d_in, rank, itemsize)
        return dataclasses.replace(b, **shrink) if shrink and t <= 256 and itemsize == 2 else b

    def expand_blocks(t, d_out, rank, itemsize=2):
        b = _EXPAND(t, d_out, rank, itemsize)
        return dataclasses.replace(b, **expand) if expand and t <= 256 and itemsize == 2 else b

    return {(tuning, "gpu_shrink_blocks"): shrink_blocks, (tuning, "gpu_expand_blocks"): expand_blocks}


def variants():
    """(name, patches, sides): sides is ("off", "on") or ("on",) for choices that touch only the LoRA path."""
    new = {(attention, "DECODE_ATTENTION_PROGRAMS"): attention.DECODE_ATTENTION_PROGRAMS,
           (llama, "FOLD_RESIDUAL"): True}
    both, on = ("off", "on"), ("on",)
    out = [("16-way attention split, residual after LoRA (before)",
            {(attention, "DECODE_ATTENTION_PROGRAMS"): OLD_SPLIT, (llama, "FOLD_RESIDUAL"): False}, both),
           ("16-way attention split, residual folded",
            {(attention, "DECODE_ATTENTION_PROGRAMS"): OLD_SPLIT, (llama, "FOLD_RESIDUAL"): True}, on)]
    for programs in (512, 1024, 2048):
        out.append((f"attention split to {programs} programs, residual folded",
                    {**new, (attention, "DECODE_ATTENTION_PROGRAMS"): programs}, both))
    for label, kw in [("expand block_n 512", {"expand": {"block_n": 512}}),
                      ("expand 2 warps", {"expand": {"num_warps": 2}}),
                      ("shrink 4 splits", {"shrink": {"k_splits": 4}}),
                      ("shrink block_k 512, 8 warps, 3 stages",
                       {"shrink": {"block_k": 512, "num_warps": 8, "num_stages": 3}})]:
        out.append((f"shipped + {label}", {**new, **decode_tiling(**kw)}, on))
    out.append(("shrink 2 splits of block_k 256, 4 stages; tiled Triton expand (shipped before)",
                {**new, **decode_tiling(shrink={"block_k": 256, "k_splits": 2, "num_warps": 4, "num_stages": 4}),
                 (tuning, "DECODE_EXPAND"): "triton"}, on))
    out.append(("shipped (shrink 16 splits of block_k 128), tiled Triton expand",
                {**new, (tuning, "DECODE_EXPAND"): "triton"}, on))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a tiny model, for a smoke run on the CPU")
    ap.add_argument("--batch", type=int, default=64, help="sequences decoding at once, each on its own adapter")
    ap.add_argument("--tokens", type=int, default=256, help="tokens each sequence decodes")
    ap.add_argument("--only", default=None, help="comma-separated variant numbers to run (default: all)")
    ap.add_argument("--out", default="benchmarks/results/decode_sweep_h100.json")
    args = ap.parse_args()
    config = TINY if args.tiny else LLAMA_8B
    dtype = jnp.float32 if args.tiny else jnp.bfloat16
    plen = 8 if args.tiny else 64
    init = jax.jit(lambda k: init_params(config, k, dtype))
    ecfg = engine_config(0.25 if args.tiny else 40.0, 16, 8, max_model_len=plen + args.tokens + 16)
    files = write_adapters(config, tempfile.mkdtemp(prefix="jlora-sweep-"), 16, 16)
    names = [f"d{i}" for i in range(args.batch)]

    def measure(side):
        on = names if side == "on" else None
        return measured_decode(lambda: bench_engine(config, lambda: init(jax.random.key(0)), ecfg, files, on), on,
                               args.batch, plen, args.tokens, config.vocab_size)[0]

    chosen = variants()
    if args.only:
        chosen = [chosen[int(i)] for i in args.only.split(",")]
    results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "batch": args.batch,
               "prompt_len": plen, "tokens_each": args.tokens, "model": "tiny" if args.tiny else "llama-8b-shaped",
               "adapters": "rank 16, q/k/v/o, one per sequence", "num_scheduler_steps": ecfg.num_scheduler_steps,
               "command": "python3 " + " ".join(sys.argv), "variants": []}
    print(f"{'variant':70s} {'LoRA off':>9s} {'adapters':>9s} {'on/off':>7s}")
    for name, patches, sides in chosen:
        saved = {key: getattr(*key) for key in patches}
        for (mod, attr), value in patches.items():
            setattr(mod, attr, value)
        jax.clear_caches()
        t0 = time.perf_counter()
        try:
            row = {"variant": name, **{f"tok_per_s_{s}": measure(s) for s in sides}}
        finally:
            for (mod, attr), value in saved.items():
                setattr(mod, attr, value)
        row["seconds"] = time.perf_counter() - t0
        if "tok_per_s_off" in row:
            row["on_vs_off"] = row["tok_per_s_on"] / row["tok_per_s_off"]
        results["variants"].append(row)
        save(results, args.out)
        print(f"{name:70s} {row.get('tok_per_s_off', float('nan')):9.0f} {row['tok_per_s_on']:9.0f} "
              f"{row.get('on_vs_off', float('nan')):7.3f}", flush=True)
    first = results["variants"][0]
    for row in results["variants"]:
        for s in ("off", "on"):
            if f"tok_per_s_{s}" in row and f"tok_per_s_{s}" in first:
                row[f"{s}_vs_first"] = row[f"tok_per_s_{s}"] / first[f"tok_per_s_{s}"]
    save(results, args.out)
    print(json.dumps(results["variants"], indent=1))


if __name__ == "__main__":
    main()
