"""Sharded vs single-device checks on 8 simulated CPU devices; prints one JSON object.

Run by `test_sharded_forward.py` in a subprocess, because the device count must be fixed before jax starts
(and the root conftest has already imported jax). Runs alone too: `python tests/sharding/_check_equivalence.py`.

For each case (tp=8; tp=2 x dp=4, also with the Triton kernels in interpret mode; tp=4 on kv_heads=2;
a paged cache at tp=2 x dp=2) it reports:
  - rel_err: max |sharded - single| / max |single| of the logits, per step (prefill, then 2 decode steps),
    with a mixed batch of rank-4/8/12/16 adapters and rows without one;
  - placement: every placed array whose `sharding.spec` differs from the hand-written spec below, and
    whether the local shards of w_qkv / B_k hold exactly the expected logical columns;
  - collectives: all-reduce/all-gather/reduce-scatter/collective-permute/all-to-all counts in the compiled
    decode step, in the whole module and per scanned layer, with the LoRA bank and without it.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)), os.path.dirname(HERE), HERE]

import functools  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from _common import KV2, KV8, random_bank, random_params  # noqa: E402
from helpers import rel_err  # noqa: E402
from jlora.config import RuntimeConfig  # noqa: E402
from jlora.model import llama  # noqa: E402
from jlora.model.kv_cache import KVCache  # noqa: E402
from jlora.model.sharded import ShardedModel  # noqa: E402
from jlora.sharding import make_mesh  # noqa: E402

ROW_SLOTS = [-1, 0, 0, 1, 2, 3, 4, 5]  # B = 8 rows: no adapter, shared adapters, every bucket
LENGTHS = [8, 5, 8, 3, 8, 6, 7, 8]
T, MAX_LEN, DECODE_STEPS = 8, 16, 2  # steps after the prefill
COLLECTIVE = re.compile(r"\b(all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)(-start)?\(")

# The expected placement, written out by hand (not read from jlora's tables).
M = "model"
EXPECTED_PARAMS = {"embed": P(M, None), "final_norm": P(None), "lm_head": P(None, M),
                   "attn_norm": P(None, None), "mlp_norm": P(None, None), "w_qkv": P(None, None, M),
                   "b_qkv": P(None, M), "w_o": P(None, M, None), "b_o": P(None, None),
                   "w_gate_up": P(None, None, M), "w_down": P(None, M, None)}
EXPECTED_A = {"qkv": P(), "gate_up": P(), "o": P(None, None, M, None), "down": P(None, None, M, None)}
EXPECTED_B = {"qkv": P(None, None, None, M), "gate_up": P(None, None, None, M), "o": P(), "down": P()}


def count_collectives(hlo: str) -> dict:
    """Collectives in the whole module, and in the scan's while body (one layer per iteration)."""
    comps, name = {}, None
    for line in hlo.splitlines():
        m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if m:
            name = m.group(1)
            comps[name] = []
        elif name is not None:
            comps[name].append(line)
    text = {k: "\n".join(v) for k, v in comps.items()}

    def closure(root, seen):
        if root in seen or root not in text:
            return 0
        seen.add(root)
        n = len(COLLECTIVE.findall(text[root]))
        return n + sum(closure(c, seen) for c in re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)",
                                                             text[root]))

    bodies = re.findall(r"body=%?([\w.\-]+)", hlo)
    return {"total": len(COLLECTIVE.findall(hlo)), "while_loops": len(bodies),
            "per_layer": sum(closure(b, set()) for b in bodies)}


def check_placement(model: ShardedModel, params, bank, cache, logical_params, logical_bank) -> dict:
    mesh, bad = model.mesh, []

    def expect(name, x, spec):
        if not x.sharding.is_equivalent_to(NamedSharding(mesh, spec), x.ndim):
            bad.append(f"{name}: {x.sharding.spec} != {spec}")

    for k, x in params.items():
        if k != "layers":
            expect(k, x, EXPECTED_PARAMS[k])
    for k, x in params["layers"].items():
        expect(k, x, EXPECTED_PARAMS[k])
    for i, bucket in enumerate(bank.buckets):
        for g in bucket.a:
            expect(f"bank[{i}].a.{g}", bucket.a[g], EXPECTED_A[g])
            for j, bj in enumerate(bucket.b[g]):
                expect(f"bank[{i}].b.{g}[{j}]", bj, EXPECTED_B[g])
    kv_spec = P(None, "data", None, M, None)
    expect("cache.k", cache.k, kv_spec)
    expect("cache.v", cache.v, kv_spec)

    # Contents: model shard s must hold q heads [s N/tp, (s+1) N/tp) then the k and v heads its q heads use.
    c, tp = model.config, model.tp
    N, K, H = c.num_heads, c.num_kv_heads, c.head_dim
    w = logical_params["layers"]["w_qkv"]
    bk = logical_bank.buckets[0].b["qkv"][1]
    contents_ok = True
    for shard in params["layers"]["w_qkv"].addressable_shards:
        s = (shard.index[2].start or 0) // shard.data.shape[2]
        q_heads = range(s * N // tp, (s + 1) * N // tp)
        kv_heads = sorted({h * K // N for h in q_heads})
        cols = ([h * H + d for h in q_heads for d in range(H)] + [(N + h) * H + d for h in kv_heads for d in range(H)]
                + [(N + K + h) * H + d for h in kv_heads for d in range(H)])
        contents_ok &= bool(np.array_equal(np.asarray(shard.data), w[..., cols]))
    for shard in bank.buckets[0].b["qkv"][1].addressable_shards:
        s = (shard.index[3].start or 0) // shard.data.shape[3]
        kv_heads = sorted({h * K // N for h in range(s * N // tp, (s + 1) * N // tp)})
        contents_ok &= bool(np.array_equal(np.asarray(shard.data), bk[..., [h * H + d for h in kv_heads
                                                                             for d in range(H)]]))
    return {"mismatched": bad, "shard_contents_ok": contents_ok}


def run_case(config, tp, dp, params, bank, paged=False, backend=None) -> dict:
    t0 = time.perf_counter()
    model = ShardedModel(config, make_mesh(tp, dp))
    B = len(ROW_SLOTS)
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, config.vocab_size, (B, T)).astype(np.int32)
    positions = np.full((B, T), -1, np.int32)
    for i, n in enumerate(LENGTHS):
        positions[i, :n] = np.arange(n)
    lora_ids = np.repeat(np.array(ROW_SLOTS, np.int32)[:, None], T, axis=1)
    lengths = np.array(LENGTHS)

    # Every step has the prefill's shape (decode steps are one valid token, the rest padding), so each
    # function compiles once and the compiled decode step is the one whose collectives are counted.
    ref_fwd = jax.jit(functools.partial(llama.forward, config=config))
    extra_ref, extra = {}, {}
    if paged:
        page_size, per_seq = 4, MAX_LEN // 4
        pool = B * per_seq
        ref_cache = KVCache.pages(config, pool, page_size)
        cache = model.pages_zeros(pool, page_size)
        # Each data replica owns a contiguous block of pages and its sequences use only those (shuffled).
        local_pool, rows_per = pool // dp, B // dp
        table = np.zeros((B, per_seq), np.int32)
        for r in range(dp):
            local = rng.permutation(local_pool).reshape(rows_per, per_seq)
            table[r * rows_per:(r + 1) * rows_per] = local + r * local_pool
        extra_ref["page_table"] = table
        extra["page_table"] = table - (np.arange(B) // rows_per * local_pool)[:, None]
    else:
        ref_cache = KVCache.zeros(config, B, MAX_LEN)
        cache = model.cache_zeros(B, MAX_LEN)
    placed_params, placed_bank = model.place_params(params), model.place_bank(bank)
    fwd = jax.jit(functools.partial(model.forward, runtime=RuntimeConfig(lora_backend=backend or "auto")))
    step = fwd.lower(placed_params, placed_bank, tokens, positions, lora_ids, cache, **extra).compile()

    errs = []
    for i in range(1 + DECODE_STEPS):
        ref, ref_cache = ref_fwd(params, bank, tokens, positions, lora_ids, ref_cache, **extra_ref)
        out, cache = step(placed_params, placed_bank, tokens, positions, lora_ids, cache, **extra)
        valid = positions >= 0
        errs.append(rel_err(np.asarray(out)[valid], np.asarray(ref)[valid]))
        col = lengths - 1 if i == 0 else np.zeros(B, int)  # the last valid token's logits
        tokens = np.zeros_like(tokens)
        tokens[:, 0] = np.asarray(ref)[np.arange(B), col].argmax(-1)
        positions = np.full_like(positions, -1)
        positions[:, 0] = lengths + i
    result = {"tp": tp, "dp": dp, "kv_heads": config.num_kv_heads, "paged": paged, "backend": backend, "rel_err": errs,
              "logits_spec": str(out.sharding.spec)}
    if not paged and backend is None:
        result["placement"] = check_placement(model, placed_params, placed_bank, cache, params, bank)
        without = fwd.lower(placed_params, None, tokens, positions, lora_ids, cache).compile().as_text()
        result["collectives"] = {"lora": count_collectives(step.as_text()), "base": count_collectives(without)}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        kv8 = (random_params(KV8, 0), random_bank(KV8, tmp))
        kv2 = (random_params(KV2, 1), random_bank(KV2, tmp))
        results["tp8"] = run_case(KV8, 8, 1, *kv8)
        results["tp2_dp4"] = run_case(KV8, 2, 4, *kv8)
        results["tp4_kv2"] = run_case(KV2, 4, 1, *kv2)
        # The Triton LoRA kernels (interpret mode) on local shards, as they run on GPUs.
        results["tp2_dp4_triton"] = run_case(KV8, 2, 4, *kv8, backend="interpret")
        results["paged_tp2_dp2"] = run_case(KV2, 2, 2, *kv2, paged=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
