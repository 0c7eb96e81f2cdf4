"""Tensor-parallel decode throughput with many LoRA adapters: tp=1 vs tp=2 (or any list of tp).

An 8B-shaped Llama (Llama 3 8B: 32 layers, D=4096, F=14336, 32 q / 8 kv heads, vocab 128256) with random
bf16 weights, and a bank of 64 distinct rank-16 adapters on all 7 modules. A batch of 64 sequences, each
with its own adapter, is prefilled, then decoded greedily for `--steps` tokens inside one jit (a scan), so
that no host round trip is timed. Reports decode tokens/s per tp, the scaling ratio against tp=1 and
whether the greedy tokens agree, and writes JSON.

    python scripts/bench_sharding.py --out benchmarks/results/sharding_h200x2.json   # needs 2 GPUs
    python scripts/bench_sharding.py --tiny                                         # CPU smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# NVLink multicast stays off on shared machines.
for _k, _v in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}.items():
    os.environ.setdefault(_k, _v)
if "--tiny" in sys.argv:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"

import functools  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jlora.config import LoraBankConfig, ModelConfig, RuntimeConfig  # noqa: E402
from jlora.lora import bank as bank_lib  # noqa: E402
from jlora.model import llama  # noqa: E402
from jlora.model.kv_cache import KVCache  # noqa: E402
from jlora.model.sharded import ShardedModel  # noqa: E402
from jlora.sharding import make_mesh  # noqa: E402
import pallas_kernels  # noqa: E402

LLAMA3_8B = ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                        num_kv_heads=8, head_dim=128, rope_theta=500000.0, max_position_embeddings=8192,
                        rms_norm_eps=1e-5)
TINY = ModelConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=32, max_position_embeddings=512)


def random_params(config: ModelConfig, dtype, seed: int = 0):
    """Random weights made on device 0, one leaf at a time (f32 noise of one leaf at most)."""
    shapes = llama.param_shapes(config)
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda s: isinstance(s, tuple))
    leaves = []
    for i, (path, shape) in enumerate(flat):
        norm = "norm" in jax.tree_util.keystr(path)
        make = jax.jit(lambda k, shape=shape, norm=norm: (
            (1.0 if norm else 0.0) + jax.random.normal(k, shape, jnp.float32) * 0.02).astype(dtype))
        leaves.append(make(jax.random.key(seed * 1000 + i)))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def random_bank(config: ModelConfig, slots: int, rank: int, dtype, seed: int = 1):
    """Every slot a distinct adapter on all 7 modules (q, k, v, o, gate, up, down); A, B ~ N(0, 0.02)."""
    bank = bank_lib.init_bank(config, LoraBankConfig(buckets=(rank,), slots=(slots,)), dtype)
    leaves, treedef = jax.tree.flatten(bank)
    out = []
    for i, x in enumerate(leaves):
        make = jax.jit(lambda k, shape=x.shape: (jax.random.normal(k, shape, jnp.float32) * 0.02).astype(dtype))
        out.append(make(jax.random.key(seed * 1000 + i)))
    return jax.tree.unflatten(treedef, out)


def make_prefill(fwd):
    @jax.jit
    def prefill(params, bank, cache, tokens, positions, lora_ids):
        last = jnp.full((tokens.shape[0],), tokens.shape[1] - 1, jnp.int32)
        logits, cache = fwd(params, bank, tokens, positions, lora_ids, cache, logit_index=last)
        return logits, cache
    return prefill


def make_decode(fwd, steps: int):
    """`steps` greedy decode steps in one program. Returns (tokens [steps, B], cache)."""
    @jax.jit
    def decode(params, bank, cache, tok, pos, lora_ids):
        def body(carry, _):
            tok, pos, cache = carry
            logits, cache = fwd(params, bank, tok[:, None], pos[:, None], lora_ids[:, None], cache,
                                logit_index=jnp.zeros_like(pos))
            nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            return (nxt, pos + 1, cache), nxt
        (_, _, cache), toks = jax.lax.scan(body, (tok, pos, cache), None, length=steps)
        return toks, cache
    return decode


def run_tp(tp, config, params, bank, prompt, lora_ids, args, backend, record):
    """Prefill + timed decode at one tp. Returns (first-token logits [B, V] f32 host, greedy tokens [steps, B])."""
    B, P = prompt.shape
    max_len = P + args.steps
    t0 = time.perf_counter()
    if tp == 1:
        fwd = functools.partial(llama.forward, config=config, runtime=RuntimeConfig(lora_backend=backend))
        cache = KVCache.zeros(config, B, max_len, params["embed"].dtype)
    else:
        model = ShardedModel(config, make_mesh(tp, 1))
        params, bank = model.place_params(params), model.place_bank(bank)
        cache = model.cache_zeros(B, max_len, params["embed"].dtype)
        fwd = functools.partial(model.forward, runtime=RuntimeConfig(lora_backend=backend))
    jax.block_until_ready((params, bank, cache))
    record["place_s"] = round(time.perf_counter() - t0, 2)

    positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    ids = jnp.broadcast_to(lora_ids[:, None], (B, P))
    t0 = time.perf_counter()
    logits, cache = jax.block_until_ready(make_prefill(fwd)(params, bank, cache, prompt, positions, ids))
    record["prefill_compile_and_run_s"] = round(time.perf_counter() - t0, 2)
    first = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    decode = make_decode(fwd, args.steps)
    pos = jnp.full((B,), P, jnp.int32)
    t0 = time.perf_counter()
    toks, _ = jax.block_until_ready(decode(params, bank, cache, first, pos, lora_ids))
    record["decode_compile_and_first_run_s"] = round(time.perf_counter() - t0, 2)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        again, _ = jax.block_until_ready(decode(params, bank, cache, first, pos, lora_ids))
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    record.update(decode_times_s=[round(t, 5) for t in times], decode_median_s=round(median, 5),
                  decode_step_ms=round(1e3 * median / args.steps, 3),
                  decode_tok_per_s=round(B * args.steps / median, 1),
                  repeat_outputs_identical=bool(np.array_equal(np.asarray(again), np.asarray(toks))))
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        record["device0_peak_gib"] = round(stats["peak_bytes_in_use"] / 2 ** 30, 2)
    return np.asarray(logits, np.float32), np.concatenate([np.asarray(first)[None], np.asarray(toks)])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="a tiny model on 2 simulated CPU devices (smoke test)")
    p.add_argument("--tp", default="1,2", help="comma-separated tp degrees; the first is the baseline")
    p.add_argument("--layers", type=int, default=None, help="override the layer count (default: the model's)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--adapters", type=int, default=64, help="distinct adapters (one bank slot each)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=64, help="decode steps per timed run")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--backend", default=None, help="LoRA backend (default: by platform)")
    p.add_argument("--budget-s", type=float, default=330.0, help="skip further tp runs after this much time")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "sharding_h200x2.json"))
    args = p.parse_args()

    start = time.perf_counter()
    config = TINY if args.tiny else LLAMA3_8B
    if args.layers:
        config = dataclasses.replace(config, num_layers=args.layers)
    dtype = jnp.float32 if args.tiny else jnp.bfloat16
    tps = [int(t) for t in args.tp.split(",")]
    backend = pallas_kernels.resolve_backend(args.backend)
    dev = jax.devices()[0]
    result = {
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
        "device": f"{jax.device_count()} x {dev.device_kind}", "platform": dev.platform,
        "jax": jax.__version__, "python": platform.python_version(),
        "model": {"layers": config.num_layers, "hidden": config.hidden_size, "intermediate": config.intermediate_size,
                  "heads": config.num_heads, "kv_heads": config.num_kv_heads, "head_dim": config.head_dim,
                  "vocab": config.vocab_size, "dtype": jnp.dtype(dtype).name, "weights": "random"},
        "lora": {"adapters": args.adapters, "rank": args.rank, "modules": 7, "distinct_per_batch": args.batch},
        "batch": args.batch, "prompt_len": args.prompt_len, "decode_steps": args.steps, "repeats": args.repeats,
        "runs": {}, "errors": {},
    }

    def save():
        result["wall_s"] = round(time.perf_counter() - start, 1)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    params = random_params(config, dtype)
    bank = random_bank(config, args.adapters, args.rank, dtype)
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.integers(0, config.vocab_size, (args.batch, args.prompt_len)), jnp.int32)
    lora_ids = jnp.asarray(np.arange(args.batch) % args.adapters, jnp.int32)  # sorted: one segment per row
    result["setup_s"] = round(time.perf_counter() - start, 1)
    save()

    outputs = {}
    for tp in tps:
        if tp > jax.device_count():
            result["errors"][f"tp{tp}"] = f"only {jax.device_count()} devices"
            continue
        if time.perf_counter() - start > args.budget_s:
            result["errors"][f"tp{tp}"] = f"skipped: over the {args.budget_s:.0f} s budget"
            continue
        # A failure is recorded; the LoRA kernels' failure falls back to the XLA reference path.
        for run_backend in dict.fromkeys([backend, "reference"]):
            record = {"tp": tp, "lora_backend": run_backend}
            result["runs"][f"tp{tp}"] = record
            try:
                outputs[tp] = run_tp(tp, config, params, bank, prompt, lora_ids, args, run_backend, record)
                break
            except Exception as e:
                result["errors"][f"tp{tp}_{run_backend}"] = "".join(traceback.format_exception_only(e)).strip()[-2000:]
                traceback.print_exc()
            finally:
                save()

    base = tps[0]
    for tp in tps[1:]:
        if base in outputs and tp in outputs:
            (l0, t0), (l1, t1) = outputs[base], outputs[tp]
            r0, r1 = result["runs"][f"tp{base}"], result["runs"][f"tp{tp}"]
            diverged = np.nonzero((t0 != t1).any(axis=1))[0]
            result["runs"][f"tp{tp}"].update(
                scaling_vs_tp1=round(r1["decode_tok_per_s"] / r0["decode_tok_per_s"], 3),
                first_logits_rel_err=float(np.abs(l1 - l0).max() / np.abs(l0).max()),
                first_token_match=float((t0[0] == t1[0]).mean()),
                greedy_token_match=float((t0 == t1).mean()),
                greedy_outputs_equal=bool(np.array_equal(t0, t1)),
                first_divergent_step=int(diverged[0]) if len(diverged) else None)
    save()

    print(f"\n{result['device']}, {config.num_layers} layers, batch {args.batch}, {args.adapters} adapters "
          f"r={args.rank}")
    print(f"{'tp':>3} {'LoRA':>10} {'step ms':>9} {'decode tok/s':>13} {'vs tp1':>7} {'greedy equal':>13} "
          f"{'token match':>12}")
    for name, r in result["runs"].items():
        if "decode_tok_per_s" in r:
            print(f"{r['tp']:>3} {r['lora_backend']:>10} {r['decode_step_ms']:>9.3f} {r['decode_tok_per_s']:>13.1f} "
                  f"{r.get('scaling_vs_tp1', 1.0):>7.3f} {str(r.get('greedy_outputs_equal', '-')):>13} "
                  f"{r.get('greedy_token_match', 1.0):>12.3f}")
    for name, err in result["errors"].items():
        print(f"{name}: ERROR {err.splitlines()[-1] if err else ''}")
    print(f"wrote {args.out} ({result['wall_s']} s)")
    return 0 if not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
