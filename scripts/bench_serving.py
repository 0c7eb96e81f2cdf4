"""Serving benchmark on S-LoRA's synthetic workload: throughput, TTFT and TPOT against the number of adapters.

Workload (S-LoRA): an 8B-shaped Llama with random bf16 weights, rank-16 adapters on q, k, v and o; adapter
popularity drawn with numpy.random.power(alpha); Gamma arrivals with CV = 1; input and output lengths uniform
in [8, 512]. Every figure is a ratio against a baseline of the same run: the same engine with LoRA off, and the
engine with few adapters. Prints a table, writes JSON (and a PNG if matplotlib is there).

Registered adapters are names backed by `--distinct-files` adapter directories on disk (2,000 rank-16 adapters of
an 8B model would be ~100 GB); each name is still its own adapter in the host and device tiers.

  python3 scripts/bench_serving.py                                  # the full run, on a large GPU
  python3 scripts/bench_serving.py --tiny --requests 40 --out /tmp/s.json   # a CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from jlora.config import LoraBankConfig  # noqa: E402
from jlora.engine.engine import Engine, EngineConfig  # noqa: E402
from jlora.model import Llama, init_params  # noqa: E402
from jlora.sampling import SamplingParams  # noqa: E402
from bench_forward import LLAMA_8B, TINY  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def write_adapters(config, root, count, rank, seed=0):
    """`count` random PEFT adapters (q, k, v, o) on disk; returns their paths."""
    from safetensors.numpy import save_file
    rng = np.random.default_rng(seed)
    dims = {"q_proj": (config.hidden_size, config.q_dim), "k_proj": (config.hidden_size, config.kv_dim),
            "v_proj": (config.hidden_size, config.kv_dim), "o_proj": (config.q_dim, config.hidden_size)}
    paths = []
    for i in range(count):
        path = os.path.join(root, f"a{i}")
        os.makedirs(path, exist_ok=True)
        t = {}
        for layer in range(config.num_layers):
            for m, (d_in, d_out) in dims.items():
                key = f"base_model.model.model.layers.{layer}.self_attn.{m}"
                t[f"{key}.lora_A.weight"] = rng.normal(0, 0.02, (rank, d_in)).astype(np.float32)
                t[f"{key}.lora_B.weight"] = rng.normal(0, 0.02, (d_out, rank)).astype(np.float32)
        save_file(t, os.path.join(path, "adapter_model.safetensors"))
        with open(os.path.join(path, "adapter_config.json"), "w") as f:
            json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS)}, f)
        paths.append(path)
    return paths


def workload(n, num_adapters, rate, alpha, lengths, vocab, seed):
    """S-LoRA's trace: (arrival time, prompt ids, output length, adapter index or None)."""
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=1.0, scale=1.0 / rate, size=n)  # CV = 1/sqrt(shape) = 1
    arrivals = np.cumsum(gaps) - gaps[0]
    lo, hi = lengths
    trace = []
    for t in arrivals:
        adapter = None if num_adapters == 0 else min(int(rng.power(alpha) * num_adapters), num_adapters - 1)
        prompt = rng.integers(0, vocab, rng.integers(lo, hi + 1)).tolist()
        trace.append((float(t), prompt, int(rng.integers(lo, hi + 1)), adapter))
    return trace


def run_trace(engine, trace, names):
    """Replays the trace in real time; returns per-request records and the wall time."""
    pending, records, t0 = list(range(len(trace))), {}, time.perf_counter()
    while pending or engine.has_unfinished():
        now = time.perf_counter() - t0
        while pending and trace[pending[0]][0] <= now:
            i = pending.pop(0)
            _, prompt, out_len, adapter = trace[i]
            sp = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
            engine.add_request(prompt, sp, None if adapter is None else names[adapter], request_id=f"r{i}")
        if not engine.has_unfinished():
            time.sleep(max(0.0, min(0.01, trace[pending[0]][0] - now)))
            continue
        for out in engine.step():
            if out.finished:
                n = len(out.token_ids)
                records[out.request_id] = {
                    "ttft": out.first_token_time - out.arrival_time, "tokens": n,
                    "tpot": (out.finish_time - out.first_token_time) / max(n - 1, 1)}
    return records, time.perf_counter() - t0


def summarize(records, wall):
    ttft = np.array([r["ttft"] for r in records.values()])
    tpot = np.array([r["tpot"] for r in records.values()])
    tokens = sum(r["tokens"] for r in records.values())
    return {"requests": len(records), "wall_s": wall, "req_per_s": len(records) / wall, "tok_per_s": tokens / wall,
            "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p99_s": float(np.percentile(ttft, 99)),
            "tpot_p50_s": float(np.percentile(tpot, 50)), "tpot_p99_s": float(np.percentile(tpot, 99))}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a tiny model and short lengths, for a CPU smoke run")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=8.0, help="mean arrivals per second")
    ap.add_argument("--alpha", type=float, default=1.0, help="numpy.random.power exponent of adapter popularity")
    ap.add_argument("--adapter-counts", default="5,100,1000,2000")
    ap.add_argument("--distinct-files", type=int, default=16)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--memory-gib", type=float, default=40.0, help="KV + adapter budget")
    ap.add_argument("--warmup-requests", type=int, default=128)
    ap.add_argument("--out", default="benchmarks/results/serving_h100.json")
    args = ap.parse_args()
    config = TINY if args.tiny else LLAMA_8B
    lengths = (8, 48) if args.tiny else (8, 512)
    dtype = jnp.float32 if args.tiny else jnp.bfloat16
    model = Llama(config, jax.jit(lambda k: init_params(config, k, dtype))(jax.random.key(0)))
    ecfg = EngineConfig(max_num_seqs=64, max_num_batched_tokens=2048, max_prefill_chunk=512, page_size=16,
                        max_model_len=2 * lengths[1] + 16, memory_bytes=int(args.memory_gib * 2**30),
                        adapter_memory_fraction=0.1, bank=LoraBankConfig(buckets=(args.rank,), slots=(1,)),
                        max_cpu_loras=256)
    files = write_adapters(config, tempfile.mkdtemp(prefix="jlora-bench-"), args.distinct_files, args.rank)
    results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
               "model": "tiny" if args.tiny else "llama-8b-shaped", "workload": {
                   "requests": args.requests, "rate": args.rate, "alpha": args.alpha, "lengths": lengths,
                   "arrivals": "gamma, CV=1", "rank": args.rank, "targets": TARGETS}, "runs": {}}
    counts = [0] + [int(c) for c in args.adapter_counts.split(",")]
    # Warm-up: a short trace through a throwaway engine compiles the step shapes the runs will hit
    # (the jit cache is shared); shapes first seen later still compile inside a run.
    warm = Engine(model, None, ecfg)
    for i in range(args.distinct_files):
        warm.store.register(f"w{i}", files[i], eager=False)
    run_trace(warm, [(0.0, p, o, a) for _, p, o, a in workload(args.warmup_requests, args.distinct_files, 1.0,
                                                                args.alpha, lengths, config.vocab_size, 0)],
              [f"w{i}" for i in range(args.distinct_files)])
    for count in counts:
        engine = Engine(model, None, ecfg)
        names = [f"tenant-{i}" for i in range(count)]
        for i, name in enumerate(names):
            engine.store.register(name, files[i % len(files)], eager=False)
        trace = workload(args.requests, count, args.rate, args.alpha, lengths, config.vocab_size, seed=1)
        records, wall = run_trace(engine, trace, names)
        row = summarize(records, wall)
        row.update(memory=engine.plan.describe(), metrics=engine.metrics())
        results["runs"]["lora_off" if count == 0 else f"{count}_adapters"] = row
        print(f"{count:>6} adapters: {row['req_per_s']:.2f} req/s {row['tok_per_s']:.0f} tok/s "
              f"TTFT p50 {row['ttft_p50_s']:.3f}s p99 {row['ttft_p99_s']:.3f}s TPOT p50 {row['tpot_p50_s'] * 1e3:.1f}ms "
              f"| {row['memory']}", flush=True)
    runs = results["runs"]
    few, most = f"{counts[1]}_adapters", f"{counts[-1]}_adapters"
    results["ratios"] = {f"{most}_vs_{few}": runs[most]["tok_per_s"] / runs[few]["tok_per_s"],
                         f"{few}_vs_lora_off": runs[few]["tok_per_s"] / runs["lora_off"]["tok_per_s"]}
    print(json.dumps(results["ratios"], indent=2))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        keys = [k for k in runs if k != "lora_off"]
        plt.plot([int(k.split("_")[0]) for k in keys], [runs[k]["tok_per_s"] for k in keys], "o-", label="jlora")
        plt.axhline(runs["lora_off"]["tok_per_s"], ls="--", label="LoRA off")
        plt.xscale("log"), plt.xlabel("registered adapters"), plt.ylabel("tokens/s"), plt.legend()
        plt.savefig(os.path.splitext(args.out)[0] + ".png", dpi=120)
    except ImportError:
        print("matplotlib not installed: no plot")


if __name__ == "__main__":
    main()
