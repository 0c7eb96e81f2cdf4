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
import dataclasses
import gc
import json
import os
import sys
import tempfile
import time

# The engines here take 40 GiB of KV pages and adapter slots beside 15 GiB of weights that are split per layer at
# start-up, which leaves holes in the allocator's pool: with JAX's default pool (75% of an 80 GB H100), the second
# 18 GiB KV half then found no free block that large (measured: 15.4 GiB). A larger pool leaves room for both.
if not (os.environ.get("XLA_CLIENT_MEM_FRACTION") or os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")):
    os.environ["XLA_CLIENT_MEM_FRACTION"] = "0.92"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from jlora.config import LoraBankConfig, RuntimeConfig  # noqa: E402
from jlora.engine.compiles import compile_count, compile_seconds  # noqa: E402
from jlora.engine.engine import Engine, EngineConfig  # noqa: E402
from jlora.model import Llama, init_params  # noqa: E402
from jlora.sampling import SamplingParams  # noqa: E402
from bench_forward import LLAMA_8B, TINY  # noqa: E402
from serving_workload import TARGETS, workload, write_adapters  # noqa: E402

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


def engine_config(memory_gib: float, rank: int, scheduler_steps: int, max_model_len: int,
                  max_num_seqs: int = 64) -> EngineConfig:
    """The benchmark's engine: `memory_gib` split into KV pages and rank-`rank` slots for q, k, v and o."""
    return EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=2048, max_prefill_chunk=512, page_size=16,
                        max_model_len=max_model_len, memory_bytes=int(memory_gib * 2**30), adapter_memory_fraction=0.1,
                        bank=LoraBankConfig(buckets=(rank,), slots=(1,), modules=TARGETS), max_cpu_loras=256,
                        num_scheduler_steps=scheduler_steps, runtime=RuntimeConfig.from_env())


def trace_shapes(engine) -> list[tuple]:
    """The step shapes a greedy trace of fresh prompts (none longer than a chunk, none preempted) can take: the
    greedy decode loops and the prefills whose page tables are as wide as their chunks."""
    runner, chunk = engine.runner, engine.config.max_prefill_chunk
    return [s for s in runner.bucket_shapes(chunk) if s[0] == "decode_loop_greedy"
            or (s[0] == "prefill" and s[3] == runner.page_buckets("prefill", s[2])[0])]


def lora_off(engine):
    """The same engine with LoRA off: every step runs the base model alone (no bank, no LoRA kernels)."""
    run = engine.runner.execute
    engine.runner.execute = lambda batch, slots, bank: run(batch, slots, None)
    return engine


def bench_engine(config, params_fn, ecfg: EngineConfig, files, names=None) -> Engine:
    """A fresh engine over params_fn()'s weights (split per layer on GPU, the stacked copy freed: one model is never
    held twice) with `names` registered over the adapter directories `files` in turn, or LoRA off for None."""
    gc.collect()  # the last engine's KV pool (held in a reference cycle) must be gone before this one's
    engine = Engine(Llama(config, params_fn()), None, ecfg, donate_weights=True)
    if names is None:
        return lora_off(engine)
    for i, name in enumerate(names):
        engine.store.register(name, files[i % len(files)], eager=False)
    return engine


def measured_decode(make_engine, names, n, prompt_len, out_len, vocab):
    """`decode_throughput` on two fresh engines from make_engine(); the first compiles, the second counts."""
    for _ in range(2):
        engine = None
        engine = make_engine()
        result = decode_throughput(engine, names, n, prompt_len, out_len, vocab)
    return result


def decode_throughput(engine, names, n, prompt_len, out_len, vocab, seed=2):
    """n requests at once, request i on adapter names[i] (or the base when names is empty); returns decode tok/s
    measured from the step after every request has its first token to the end."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        engine.add_request(rng.integers(0, vocab, prompt_len).tolist(),
                           SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True),
                           names[i] if names else None, request_id=f"d{i}")
    started, t0, tok0, outputs = 0, None, 0, {}
    while engine.has_unfinished():
        for out in engine.step():
            started += len(out.token_ids) == 1 or (out.finished and len(out.token_ids) <= 1)
            if out.finished:
                outputs[out.request_id] = out.token_ids
        if t0 is None and started >= n:
            t0, tok0 = time.perf_counter(), engine.tokens_generated
    return (engine.tokens_generated - tok0) / (time.perf_counter() - t0), [outputs[f"d{i}"] for i in range(n)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a tiny model and short lengths, for a CPU smoke run")
    ap.add_argument("--layers", type=int, default=0, help="override the layer count (a quick GPU smoke run)")
    ap.add_argument("--requests", type=int, default=160, help="requests per trace")
    ap.add_argument("--rate", type=float, default=20.0, help="mean arrivals per second (above capacity: the "
                    "throughput figures are the engine's, not the arrival rate's)")
    ap.add_argument("--alpha", type=float, default=1.0, help="numpy.random.power exponent of adapter popularity")
    ap.add_argument("--adapter-counts", default="5,100,1000,2000", help="registered adapters, one run each")
    ap.add_argument("--distinct-files", type=int, default=16, help="adapter directories behind the names")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--memory-gib", type=float, default=None, help="KV + adapter budget (default 40, 0.25 with --tiny)")
    ap.add_argument("--passes", type=int, default=3,
                    help="most times each run replays its trace, each time through a fresh engine: it stops at the "
                         "first pass that compiled nothing, which counts (or else the last). Which step shapes a "
                         "replay meets depends on its timing, so one pass can need shapes the passes before did not "
                         "(default: %(default)s)")
    ap.add_argument("--no-warmup", action="store_true",
                    help="skip compiling the step shapes a trace can take (`trace_shapes`) before the first pass with "
                         "LoRA off and with adapters; the passes alone then compile them")
    ap.add_argument("--decode-batch", type=int, default=64, help="sequences in the decode-throughput comparison")
    ap.add_argument("--decode-tokens", type=int, default=256, help="tokens each of them generates")
    ap.add_argument("--decode-only", action="store_true", help="only the decode comparison (no traces)")
    ap.add_argument("--no-decode", action="store_true", help="only the traces (no decode comparison)")
    ap.add_argument("--no-lora-off", action="store_true", help="skip the LoRA-off trace (the adapter counts alone)")
    ap.add_argument("--scheduler-steps", type=int, default=EngineConfig.num_scheduler_steps,
                    help="EngineConfig.num_scheduler_steps: decode tokens per sequence per device call "
                         "(default: %(default)s)")
    ap.add_argument("--peft-json", default=None, help="bench_peft_baseline.py's result, for the PEFT ratio")
    ap.add_argument("--out", default="benchmarks/results/serving_h100.json")
    args = ap.parse_args()
    config = TINY if args.tiny else LLAMA_8B
    args.memory_gib = args.memory_gib or (0.25 if args.tiny else 40.0)
    if args.layers:
        config = dataclasses.replace(config, num_layers=args.layers)
    lengths = (8, 48) if args.tiny else (8, 512)
    dtype = jnp.float32 if args.tiny else jnp.bfloat16
    init = jax.jit(lambda k: init_params(config, k, dtype))

    ecfg = engine_config(args.memory_gib, args.rank, args.scheduler_steps, max_model_len=2 * lengths[1] + 16)
    files = write_adapters(config, tempfile.mkdtemp(prefix="jlora-bench-"), args.distinct_files, args.rank)

    def engine_with(names):
        """An engine over the same random weights, drawn afresh, with `names` registered (None: LoRA off)."""
        return bench_engine(config, lambda: init(jax.random.key(0)), ecfg, files, names)

    from jlora.model.attention import paged_backend
    results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
               "decode_attention": paged_backend(config, 1, ecfg.runtime, page_size=ecfg.page_size),
               "model": "tiny" if args.tiny else "llama-8b-shaped", "layers": config.num_layers, "workload": {
                   "requests": args.requests, "rate": args.rate, "alpha": args.alpha, "lengths": lengths,
                   "arrivals": "gamma, CV=1", "rank": args.rank, "targets": TARGETS, "seed": 1},
               "num_scheduler_steps": args.scheduler_steps, "passes": args.passes,
               "command": "python3 " + " ".join(sys.argv), "runs": {}}
    if args.decode_only:
        args.adapter_counts = ""
    # Decode throughput: a distinct adapter per sequence against LoRA off (each measured twice; the second counts).
    n, plen = args.decode_batch, 64 if not args.tiny else 8
    dec, tokens = {}, {}
    decode_runs = [] if args.no_decode else [("lora_off", None), ("distinct_adapters", [f"d-{i}" for i in range(n)])]
    for name, names in decode_runs:
        dec[name], tokens[name] = measured_decode(lambda: engine_with(names), names, n, plen, args.decode_tokens,
                                                  config.vocab_size)
        print(f"decode, batch {n}, {name}: {dec[name]:.0f} tok/s ({compile_seconds():.0f} s compiling so far)",
              flush=True)
    if decode_runs:
        # The adapters must really be applied: their greedy outputs differ from the base model's.
        differ = sum(a != b for a, b in zip(tokens["lora_off"], tokens["distinct_adapters"])) / n
        print(f"decode: {differ:.0%} of the adapter requests' outputs differ from LoRA off", flush=True)
        results["decode"] = {"batch": n, "prompt_len": plen, "tokens_each": args.decode_tokens, "tok_per_s": dec,
                             "distinct_vs_lora_off": dec["distinct_adapters"] / dec["lora_off"],
                             "outputs_differing_from_lora_off": differ}

    if args.decode_only:
        save(results, args.out)
        print(json.dumps(results["decode"], indent=2))
        return
    counts = ([] if args.no_lora_off else [0]) + [int(c) for c in args.adapter_counts.split(",")]
    warm = set()  # bank settings ("off", "on") whose trace shapes are compiled
    for count in counts:
        trace = workload(args.requests, count, args.rate, args.alpha, lengths, config.vocab_size, seed=1)
        for done in range(1, args.passes + 1):  # the jit cache is shared: earlier passes compile shapes for later
            engine = None
            names = [f"tenant-{i}" for i in range(count)]
            engine = engine_with(names if count else None)
            setting = "off" if count == 0 else "on"
            if setting not in warm and not args.no_warmup:
                t0, seconds, shapes = time.perf_counter(), compile_seconds(), trace_shapes(engine)
                if count:
                    engine.store.slots.warmup()  # the adapter slot writes
                engine.runner.warmup(None if count == 0 else engine.store.bank, ecfg.max_prefill_chunk, shapes)
                took = time.perf_counter() - t0
                print(f"  warm-up, LoRA {setting}: {len(shapes)} step shapes in {took:.0f} s "
                      f"({compile_seconds() - seconds:.0f} s compiling)", flush=True)
                results.setdefault("warmup", {})[setting] = {"shapes": len(shapes), "s": took}
                warm.add(setting)
            compiles, seconds = compile_count(), compile_seconds()
            records, wall = run_trace(engine, trace, names)
            compiled = compile_count() - compiles
            print(f"  pass {done}: {wall:.1f} s, compiled {compiled} programs in {compile_seconds() - seconds:.1f} s",
                  flush=True)
            if compiled == 0:
                break
        row = summarize(records, wall)
        row.update(memory=engine.plan.describe(), metrics=engine.metrics(), compilations_in_run=compiled,
                   passes_run=done)
        results["runs"]["lora_off" if count == 0 else f"{count}_adapters"] = row
        save(results, args.out)  # partial results survive a run cut short
        print(f"{count:>6} adapters: {row['req_per_s']:.2f} req/s {row['tok_per_s']:.0f} tok/s "
              f"TTFT p50 {row['ttft_p50_s']:.3f}s p99 {row['ttft_p99_s']:.3f}s "
              f"TPOT p50 {row['tpot_p50_s'] * 1e3:.1f}ms "
              f"p99 {row['tpot_p99_s'] * 1e3:.1f}ms | passes {done}, compiled in the last: {compiled} | "
              f"{row['memory']}", flush=True)
    runs = results["runs"]
    few, most = [f"{c}_adapters" for c in counts if c][0], f"{counts[-1]}_adapters"
    ratios = {f"{most}_vs_{few}": runs[most]["tok_per_s"] / runs[few]["tok_per_s"]}
    if "lora_off" in runs:
        ratios[f"{few}_vs_lora_off"] = runs[few]["tok_per_s"] / runs["lora_off"]["tok_per_s"]
    if args.peft_json and os.path.exists(args.peft_json):
        with open(args.peft_json) as f:
            peft = json.load(f)
        results["peft_baseline"] = peft
        key = f"{peft['adapters']}_adapters"
        if key in runs:
            ratios[f"{key}_vs_hf_peft"] = runs[key]["tok_per_s"] / peft["tok_per_s"]
    if "decode" in results:
        ratios["decode_distinct_vs_lora_off"] = results["decode"]["distinct_vs_lora_off"]
    results["ratios"] = ratios
    print(json.dumps(ratios, indent=2))
    save(results, args.out)
    plot(results, os.path.splitext(args.out)[0] + ".png")


def save(results, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)


def plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    runs = results["runs"]
    keys = [k for k in runs if k != "lora_off"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    xs = [int(k.split("_")[0]) for k in keys]
    a.plot(xs, [runs[k]["tok_per_s"] for k in keys], "o-", label="jlora")
    if "lora_off" in runs:
        a.axhline(runs["lora_off"]["tok_per_s"], ls="--", color="gray", label="jlora, LoRA off")
    if "peft_baseline" in results:
        a.plot([results["peft_baseline"]["adapters"]], [results["peft_baseline"]["tok_per_s"]], "rs", label="HF PEFT")
    a.set(xscale="log", yscale="log", xlabel="registered adapters", ylabel="tokens/s", title="throughput")
    a.legend()
    for q in ("p50", "p99"):
        b.plot(xs, [runs[k][f"tpot_{q}_s"] * 1e3 for k in keys], "o-", label=f"TPOT {q}")
    b.set(xscale="log", xlabel="registered adapters", ylabel="ms", title="time per output token")
    b.legend()
    fig.suptitle(f"S-LoRA workload, {results['model']} on {results['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
