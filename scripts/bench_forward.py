"""Forward-step benchmark: one decode step of an 8B-shaped Llama with and without LoRA.

Random bf16 weights; 64 sequences decoding over the paged KV cache (as the engine runs them, with per-layer
weights on GPU), each with its own rank-16 adapter on all 7 target modules. Times (medians of jitted loops of
decode steps, on device) the base model with LoRA off, the LoRA kernel path (`pallas_kernels` on this platform)
and the XLA reference path, side by side, and counts the LoRA kernel launches per decode step. Each time is held
against its bytes floor: the weights, the KV cache read at that context and (with LoRA) the adapters' bytes, at
the copy bandwidth measured in the same run. Prints a table and writes JSON.

The kernel and layout switches come from the environment (`RuntimeConfig.from_env`: $JLORA_LORA_BACKEND,
$JLORA_ATTENTION, $JLORA_LAYER_LOOP), as in `jlora serve`.

  python3 scripts/bench_forward.py --ctx 512 2048          # the 8B shape (needs a large GPU)
  python3 scripts/bench_forward.py --weights bf16 fp8   # bf16 and FP8 (W8A16) base weights in one run
  python3 scripts/bench_forward.py --tiny --out /tmp/f.json   # a seconds-long smoke run on the CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from jlora.config import LoraBankConfig, ModelConfig, RopeScaling, RuntimeConfig  # noqa: E402
from jlora.lora import bank as bank_lib  # noqa: E402
from jlora.model import KVCache, forward, init_params  # noqa: E402
from jlora.model.llama import split_layers, split_layers_enabled  # noqa: E402
from jlora.model.quant import quantize_params  # noqa: E402
from bench_kernels import count_ops  # noqa: E402  (scripts/ is sys.path[0] when this runs as a script)
from kernel_timing import copy_bandwidth  # noqa: E402

LLAMA_8B = ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                       num_kv_heads=8, head_dim=128, rope_theta=500000.0, max_position_embeddings=8192,
                       rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192))
TINY = ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=32)


def random_bank(config, rank, slots, key, dtype, modules=None):
    """A bank with every slot filled with random (never zero) weights, on `modules` (default all 7)."""
    extra = {} if modules is None else {"modules": tuple(modules)}
    bank = bank_lib.init_bank(config, LoraBankConfig(buckets=(rank,), slots=(slots,), **extra), dtype)
    leaves, treedef = jax.tree_util.tree_flatten(bank)
    keys = jax.random.split(key, len(leaves))
    leaves = [(jax.random.normal(k, x.shape, jnp.float32) * 0.02).astype(dtype) for k, x in zip(keys, leaves)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


PAGE_SIZE = 16


def decode_loop(config, runtime, steps, page_table):
    """jit(steps decode steps) over the paged KV pool, feeding back the argmax token."""

    def run(params, bank, cache, tokens, start, lora_ids):
        def body(i, carry):
            cache, tokens = carry
            pos = jnp.full(tokens.shape, start + i, jnp.int32)
            logits, cache = forward(params, bank, tokens, pos, lora_ids, cache, config=config,
                                    logit_index=jnp.zeros(tokens.shape[:1], jnp.int32), runtime=runtime,
                                    page_table=page_table)
            return cache, jnp.argmax(logits, -1).astype(jnp.int32)[:, None]

        return jax.lax.fori_loop(0, steps, body, (cache, tokens))

    return jax.jit(run, donate_argnums=(2,))


def time_variant(config, params, bank, runtime, batch, ctx, steps, repeats):
    """Median seconds per decode step of `batch` sequences at `ctx` cached tokens (a page block each)."""
    pages_each = -(-(ctx + steps * (repeats + 2)) // PAGE_SIZE)
    page_table = jnp.arange(batch * pages_each, dtype=jnp.int32).reshape(batch, pages_each)
    fn = decode_loop(config, runtime, steps, page_table)
    cache = KVCache.pages(config, batch * pages_each, PAGE_SIZE, params["embed"].dtype)
    tokens = jax.random.randint(jax.random.key(1), (batch, 1), 0, config.vocab_size, jnp.int32)
    lora_ids = jnp.arange(batch, dtype=jnp.int32)[:, None] if bank is not None else None
    start = ctx
    cache, tokens = fn(params, bank, cache, tokens, start, lora_ids)  # compile + warm up
    jax.block_until_ready(tokens)
    times = []
    for r in range(repeats):
        start += steps
        t0 = time.perf_counter()
        cache, tokens = fn(params, bank, cache, tokens, start, lora_ids)
        jax.block_until_ready(tokens)
        times.append((time.perf_counter() - t0) / steps)
    return statistics.median(times), np.asarray(tokens)[:, 0]


def floor_bytes(config, params, bank, batch: int, ctx: int) -> dict:
    """Fewest bytes one decode step must read: every weight but the embedding (only `batch` rows of it), the cached
    keys and values of `batch` rows at `ctx` tokens, and with a bank its `batch` slots (one adapter per row)."""
    leaves = jax.tree_util.tree_leaves({k: v for k, v in params.items() if k != "embed"})
    weights = sum(x.size * x.dtype.itemsize for x in leaves)
    weights += batch * config.hidden_size * params["embed"].dtype.itemsize
    if config.tie_word_embeddings:
        weights += params["embed"].size * params["embed"].dtype.itemsize
    kv = batch * ctx * config.num_layers * 2 * config.kv_dim * params["embed"].dtype.itemsize
    lora = 0
    if bank is not None:
        slots = sum(b.num_slots for b in bank.buckets)
        lora = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(bank)) * min(batch, slots) // slots
    return {"weights": weights, "kv": kv, "lora": lora, "total": weights + kv + lora}


def kernel_launches(config, params, bank, batch):
    """LoRA pallas_call launches in one decode step: with the bank less without (GPU decode attention is one too)."""
    cache = jax.eval_shape(lambda: KVCache.pages(config, batch, PAGE_SIZE, params["embed"].dtype))
    tokens = jax.ShapeDtypeStruct((batch, 1), jnp.int32)
    table = jnp.arange(batch, dtype=jnp.int32)[:, None]

    def count(b):
        jaxpr = jax.make_jaxpr(lambda p, b, c, t: forward(p, b, t, t, t, c, config=config, page_table=table))(
            params, b, cache, tokens)
        return count_ops(jaxpr)["pallas_call"]

    return count(bank) - count(None)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a tiny model, for a smoke run on the CPU")
    ap.add_argument("--batch", type=int, default=64, help="decoding sequences = distinct adapters")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--ctx", type=int, nargs="+", default=[512], help="tokens already in the cache (one or more)")
    ap.add_argument("--steps", type=int, default=8, help="decode steps per timed loop")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-reference", action="store_true", help="skip the (slow) XLA reference LoRA path")
    ap.add_argument("--baseline-attention", nargs="*", default=[],
                    help="also time LoRA off with these decode attention backends (RuntimeConfig.attention), "
                         "e.g. pallas xla, beside the configured one")
    ap.add_argument("--weights", nargs="+", choices=("bf16", "fp8", "fp8_w8a16"), default=["bf16"],
                    help="base weight formats to time, each beside the others in the same run (fp8: the layers' "
                         "linear weights quantized per output channel as --quantization fp8 does, multiplied as "
                         "RuntimeConfig.fp8_compute resolves (W8A8 on GPU); fp8_w8a16: the same weights, W8A16)")
    ap.add_argument("--out", default="benchmarks/results/forward_h200.json")
    args = ap.parse_args()
    config = TINY if args.tiny else LLAMA_8B
    dtype = jnp.bfloat16
    runtime = RuntimeConfig.from_env().resolved()
    bf16_params = jax.jit(lambda k: init_params(config, k, dtype))(jax.random.key(0))
    split = split_layers_enabled(runtime)  # as the engine runs it: per-layer weights on GPU
    bank = random_bank(config, args.rank, args.batch, jax.random.key(2), dtype)
    lora_floor = floor_bytes(config, bf16_params, bank, args.batch, args.ctx[0])["lora"]
    stacked = {kind: quantize_params(bf16_params) if kind.startswith("fp8") else bf16_params for kind in args.weights}
    # Not donated: the formats share their norms and embedding (48 GB at most for the 8B shape with both).
    weight_sets = {kind: (split_layers(p) if split else p,
                          [floor_bytes(config, p, None, args.batch, c) for c in args.ctx])
                   for kind, p in stacked.items()}
    del stacked, bf16_params
    copy_bw = copy_bandwidth(1 << 22) if args.tiny else copy_bandwidth()
    print(f"copy bandwidth {copy_bw / 1e12:.2f} TB/s; runtime {runtime}", flush=True)
    variants = [("lora_off", None, runtime), ("lora_kernels", bank, runtime)]
    variants += [(f"lora_off_attention_{a}", None, dataclasses.replace(runtime, attention=a))
                 for a in args.baseline_attention if a != runtime.attention]
    if not args.no_reference:
        variants.append(("lora_reference", bank, dataclasses.replace(runtime, lora_backend="reference")))
    rows = []
    for kind, (params, floors) in weight_sets.items():
        suffix = "" if kind == "bf16" else "_" + kind
        for ctx, floor in zip(args.ctx, floors):
            for base_name, b, rt in variants:
                if kind != "bf16" and base_name.startswith(("lora_reference", "lora_off_attention")):
                    continue  # other weight formats are timed on the default paths only
                name = base_name + suffix
                if kind == "fp8_w8a16":
                    rt = dataclasses.replace(rt, fp8_compute="w8a16")
                t0 = time.perf_counter()
                row = {"variant": name, "weights": kind, "ctx": ctx, "batch": args.batch}
                try:
                    sec, toks = time_variant(config, params, b, rt, args.batch, ctx, args.steps, args.repeats)
                except Exception as e:  # record the failure of one variant and keep measuring the others
                    row["error"] = f"{type(e).__name__}: {e}"[:2000]
                    print(f"{name} ctx {ctx}: FAILED {row['error'][:300]}", flush=True)
                    rows.append(row)
                    continue
                need = floor["total"] + (lora_floor if b is not None else 0)
                row.update(ms_per_step=sec * 1e3, tok_per_s=args.batch / sec, floor_ms=need / copy_bw * 1e3,
                           pct_floor=100 * need / copy_bw / sec, last_tokens=toks[:8].tolist())
                rows.append(row)
                print(f"{name} ctx {ctx}: {sec * 1e3:.3f} ms/step ({time.perf_counter() - t0:.0f}s incl. compile)",
                      flush=True)
    params, floors = next(iter(weight_sets.values()))
    for r in rows:
        base = next((o["ms_per_step"] for o in rows if o["variant"] == "lora_off" and o["ctx"] == r["ctx"]
                     and "ms_per_step" in o), None)  # bf16 weights, LoRA off: the baseline of every row
        if "ms_per_step" in r and base:
            r["vs_lora_off"] = r["ms_per_step"] / base
            r["lora_increment_ms"] = r["ms_per_step"] - base
    try:
        launches = kernel_launches(config, params, bank, args.batch)
    except Exception as e:  # a count we could not take is reported, not fatal
        launches = "not counted: " + type(e).__name__
    result = {"device": jax.devices()[0].device_kind, "platform": jax.default_backend(), "jax": jax.__version__,
              "model": "tiny" if args.tiny else "llama-8b-shaped", "dtype": "bfloat16", "weights": args.weights,
              "batch": args.batch,
              "distinct_adapters": args.batch, "rank": args.rank, "target_modules": 7,
              "copy_bandwidth_tb_s": copy_bw / 1e12,
              "floor_bytes": {k: dict(zip(map(str, args.ctx), f)) for k, (_, f) in weight_sets.items()},
              "lora_floor_bytes": lora_floor, "lora_kernel_launches_per_decode_step": launches, "rows": rows,
              "kv_cache": "paged", "runtime": dataclasses.asdict(runtime),
              "command": "python3 scripts/bench_forward.py " + " ".join(sys.argv[1:])}
    print(f"{'variant':<24}{'ctx':>6}{'ms/step':>10}{'floor ms':>10}{'% floor':>9}{'tok/s':>10}{'vs off':>8}")
    for r in rows:
        if "ms_per_step" in r:
            print(f"{r['variant']:<24}{r['ctx']:>6}{r['ms_per_step']:>10.3f}{r['floor_ms']:>10.3f}"
                  f"{r['pct_floor']:>8.0f}%{r['tok_per_s']:>10.0f}{r.get('vs_lora_off', 0):>8.3f}")
    print(f"LoRA kernel launches per decode step: {launches}  ({result['device']}, copy {copy_bw / 1e12:.2f} TB/s)")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
