"""Forward-step benchmark: one decode step of an 8B-shaped Llama with and without LoRA.

Random bf16 weights; 64 sequences decoding over the paged KV cache (as the engine runs them, with per-layer
weights on GPU), each with its own rank-16 adapter on all 7 target modules. Times (medians of jitted loops of
decode steps, on device) the base model with LoRA off, the LoRA kernel path (`pallas_kernels` on this platform)
and the XLA reference path, side by side, and counts the LoRA kernel launches per decode step. Prints a table
and writes JSON.

  python3 scripts/bench_forward.py                       # the 8B shape (needs a large GPU)
  python3 scripts/bench_forward.py --tiny --out /tmp/f.json   # a seconds-long smoke run on the CPU
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

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from jlora.config import LoraBankConfig, ModelConfig, RopeScaling  # noqa: E402
from jlora.lora import bank as bank_lib  # noqa: E402
from jlora.model import KVCache, forward, init_params  # noqa: E402
from jlora.model.llama import split_layers, split_layers_enabled  # noqa: E402
from bench_kernels import count_ops  # noqa: E402  (scripts/ is sys.path[0] when this runs as a script)

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


def decode_loop(config, backend, steps, page_table):
    """jit(steps decode steps) over the paged KV pool, feeding back the argmax token."""

    def run(params, bank, cache, tokens, start, lora_ids):
        def body(i, carry):
            cache, tokens = carry
            pos = jnp.full(tokens.shape, start + i, jnp.int32)
            logits, cache = forward(params, bank, tokens, pos, lora_ids, cache, config=config,
                                    logit_index=jnp.zeros(tokens.shape[:1], jnp.int32), lora_backend=backend,
                                    page_table=page_table)
            return cache, jnp.argmax(logits, -1).astype(jnp.int32)[:, None]

        return jax.lax.fori_loop(0, steps, body, (cache, tokens))

    return jax.jit(run, donate_argnums=(2,))


def time_variant(config, params, bank, backend, batch, ctx, steps, repeats):
    """Median seconds per decode step of `batch` sequences at `ctx` cached tokens (a page block each)."""
    pages_each = -(-(ctx + steps * (repeats + 2)) // PAGE_SIZE)
    page_table = jnp.arange(batch * pages_each, dtype=jnp.int32).reshape(batch, pages_each)
    fn = decode_loop(config, backend, steps, page_table)
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
    ap.add_argument("--ctx", type=int, default=512, help="tokens already in the cache")
    ap.add_argument("--steps", type=int, default=8, help="decode steps per timed loop")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/forward_h100.json")
    args = ap.parse_args()
    config = TINY if args.tiny else LLAMA_8B
    dtype = jnp.bfloat16
    params = jax.jit(lambda k: init_params(config, k, dtype))(jax.random.key(0))
    split = split_layers_enabled()  # as the engine runs it: per-layer weights on GPU ($JLORA_LAYER_LOOP)
    if split:
        params = split_layers(params, donate=True)
    bank = random_bank(config, args.rank, args.batch, jax.random.key(2), dtype)
    rows = {}
    for name, b, backend in [("lora_off", None, None), ("lora_kernels", bank, None),
                             ("lora_reference", bank, "reference")]:
        t0 = time.perf_counter()
        try:
            sec, toks = time_variant(config, params, b, backend, args.batch, args.ctx, args.steps, args.repeats)
        except Exception as e:  # record the failure of one variant and keep measuring the others
            rows[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            print(f"{name}: FAILED {rows[name]['error'][:300]}", flush=True)
            continue
        rows[name] = {"ms_per_step": sec * 1e3, "tok_per_s": args.batch / sec, "last_tokens": toks[:8].tolist()}
        print(f"{name}: {sec * 1e3:.3f} ms/step ({time.perf_counter() - t0:.0f}s incl. compile)", flush=True)
    base = rows.get("lora_off", {}).get("ms_per_step")
    for r in rows.values():
        if "ms_per_step" in r and base:
            r["vs_lora_off"] = r["ms_per_step"] / base
    try:
        launches = kernel_launches(config, params, bank, args.batch)
    except Exception as e:  # a count we could not take is reported, not fatal
        launches = "not counted: " + type(e).__name__
    result = {"device": jax.devices()[0].device_kind, "platform": jax.default_backend(), "jax": jax.__version__,
              "model": "tiny" if args.tiny else "llama-8b-shaped", "dtype": "bfloat16", "batch": args.batch,
              "distinct_adapters": args.batch, "rank": args.rank, "target_modules": 7, "ctx": args.ctx,
              "lora_kernel_launches_per_decode_step": launches, "variants": rows, "kv_cache": "paged",
              "layer_loop": "split" if split else "scan",
              "command": "python3 scripts/bench_forward.py" + (" --tiny" if args.tiny else "")}
    print(f"{'variant':<16}{'ms/step':>10}{'tok/s':>12}{'vs LoRA off':>14}")
    for name, r in rows.items():
        if "ms_per_step" in r:
            print(f"{name:<16}{r['ms_per_step']:>10.3f}{r['tok_per_s']:>12.0f}{r.get('vs_lora_off', 0):>14.3f}")
    print(f"LoRA kernel launches per decode step: {launches}  ({result['device']})")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
