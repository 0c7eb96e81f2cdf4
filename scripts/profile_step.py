"""Where a decode step's device time goes: every kernel of one 8B-shaped decode step, with LoRA off and on.

Traces a jitted loop of decode steps (the `bench_forward` setup: paged cache, per-layer weights on GPU, one
distinct rank-16 adapter per sequence) with the JAX profiler, and reads the device plane back: for each variant,
the time the GPU was busy per step, the time it sat idle between kernels, and the kernels grouped by name (count
and µs per step). The LoRA-on table marks the kernels that LoRA adds. Prints tables and writes JSON.

With --engine it traces the serving engine's decode steps instead (`bench_serving`'s decode comparison: 64
requests, each on its own adapter of a 157-slot bank, against the same engine with LoRA off), and adds each step's
wall time and how much of it the host spent outside the jitted step, all per decode token of every sequence (an
engine step samples up to --scheduler-steps of them).

  python3 scripts/profile_step.py --modules q_proj,k_proj,v_proj,o_proj     # the serving benchmark's adapters
  python3 scripts/profile_step.py --engine --out benchmarks/results/profile_engine_h100.json
  python3 scripts/profile_step.py --tiny --out /tmp/p.json                   # a smoke run on the CPU
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_forward import LLAMA_8B, PAGE_SIZE, TINY, decode_loop, random_bank  # noqa: E402
from bench_serving import bench_engine, engine_config  # noqa: E402
from serving_workload import write_adapters  # noqa: E402
from jlora.config import RuntimeConfig, parse_lora_modules  # noqa: E402
from jlora.engine.engine import EngineConfig  # noqa: E402
from jlora.model import KVCache, init_params  # noqa: E402
from jlora.model.llama import split_layers, split_layers_enabled  # noqa: E402
from jlora.sampling import SamplingParams  # noqa: E402

# Lines of a device plane that summarise the kernels of its stream lines again.
_SUMMARY_LINES = ("XLA Modules", "XLA Ops", "Launch Stats", "Steps", "TensorFlow Ops", "Source code")


def kernel_events(trace_dir: str):
    """[(name, start_ns, duration_ns)] of every kernel on the first device plane, or the host's XLA ops (CPU)."""
    paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if not paths:
        raise RuntimeError(f"the profiler wrote no trace under {trace_dir}")
    data = jax.profiler.ProfileData.from_file(paths[0])
    planes = [p for p in data.planes if p.name.startswith("/device:")]
    events = []
    for plane in planes[:1]:
        lines = list(plane.lines)
        print(f"{plane.name}: lines {[line.name for line in lines]}")
        streams = [line for line in lines if line.name.startswith("Stream")]
        for line in streams or [line for line in lines if line.name not in _SUMMARY_LINES]:
            events += [(e.name, e.start_ns, e.duration_ns) for e in line.events if e.duration_ns > 0]
    if not planes:  # the CPU: XLA's thunks on the host threads stand in for kernels
        for plane in data.planes:
            if plane.name == "/host:CPU":
                for line in plane.lines:
                    if line.name.startswith("tf_XLA"):
                        events += [(e.name, e.start_ns, e.duration_ns) for e in line.events if e.duration_ns > 0]
    return events


def summarise(events, steps: int) -> dict:
    """Per-step busy and idle device time, and kernels grouped by name."""
    if not events:
        return {"error": "no kernel events in the trace"}
    start = min(s for _, s, _ in events)
    end = max(s + d for _, s, d in events)
    # Busy time is the union of the kernels' intervals (streams may overlap).
    busy, cur_s, cur_e = 0.0, None, None
    for _, s, d in sorted(events, key=lambda e: e[1]):
        if cur_e is None or s > cur_e:
            busy += 0 if cur_e is None else cur_e - cur_s
            cur_s, cur_e = s, s + d
        else:
            cur_e = max(cur_e, s + d)
    busy += cur_e - cur_s
    by_name = collections.defaultdict(lambda: [0, 0.0])
    for name, _, d in events:
        by_name[name][0] += 1
        by_name[name][1] += d
    kernels = {n: {"count_per_step": c / steps, "us_per_step": t / steps / 1e3} for n, (c, t) in by_name.items()}
    return {"span_us_per_step": (end - start) / steps / 1e3, "busy_us_per_step": busy / steps / 1e3,
            "idle_us_per_step": (end - start - busy) / steps / 1e3,
            "kernels_per_step": len(events) / steps, "kernels": kernels}


def profile_variant(config, params, bank, batch, ctx, steps, trace_root, name) -> dict:
    pages_each = -(-(ctx + 3 * steps) // PAGE_SIZE)
    page_table = jnp.arange(batch * pages_each, dtype=jnp.int32).reshape(batch, pages_each)
    fn = decode_loop(config, RuntimeConfig.from_env(), steps, page_table)
    cache = KVCache.pages(config, batch * pages_each, PAGE_SIZE, params["embed"].dtype)
    tokens = jax.random.randint(jax.random.key(1), (batch, 1), 0, config.vocab_size, jnp.int32)
    lora_ids = jnp.arange(batch, dtype=jnp.int32)[:, None] if bank is not None else None
    cache, tokens = fn(params, bank, cache, tokens, ctx, lora_ids)  # compile and warm up outside the trace
    jax.block_until_ready(tokens)
    trace_dir = os.path.join(trace_root, name)
    with jax.profiler.trace(trace_dir):
        cache, tokens = fn(params, bank, cache, tokens, ctx + steps, lora_ids)
        jax.block_until_ready(tokens)
    return summarise(kernel_events(trace_dir), steps)


def profile_engine(config, params_fn, adapters: bool, batch: int, steps: int, trace_root: str, name: str,
                   tiny: bool, scheduler_steps: int) -> dict:
    """Traces `steps` decode steps of an engine with `batch` running requests (each on its own adapter, or none)."""
    ecfg = engine_config(0.25 if tiny else 40, 16, scheduler_steps, max_model_len=1040, max_num_seqs=batch)
    files = write_adapters(config, tempfile.mkdtemp(prefix="jlora-profile-"), 16, 16) if adapters else []
    names = [f"d{i}" for i in range(batch)] if adapters else None
    engine = bench_engine(config, params_fn, ecfg, files, names)
    names = names or [None] * batch
    rng = np.random.default_rng(0)
    # 160-token prompts: after the warm-up below, the traced steps stay inside one page-table bucket (16 pages of
    # 16 tokens) for up to 8 tokens per step, so nothing compiles inside the trace.
    for i in range(batch):
        engine.add_request(rng.integers(0, config.vocab_size, 160).tolist(),
                           SamplingParams(temperature=0.0, max_tokens=(steps + 10) * scheduler_steps + 8,
                                          ignore_eos=True), names[i])
    for _ in range(10):  # every prompt's prefill (5 steps of 2048 tokens), then steady decode
        engine.step()
    in_run = [0.0]
    run = engine.runner._run

    def timed_run(bank, a):
        t0 = time.perf_counter()
        out = run(bank, a)
        in_run[0] += time.perf_counter() - t0
        return out

    engine.runner._run = timed_run
    trace_dir = os.path.join(trace_root, name)
    tokens0 = engine.tokens_generated
    with jax.profiler.trace(trace_dir):
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        wall = time.perf_counter() - t0
    token_steps = (engine.tokens_generated - tokens0) / batch  # per decode token of every sequence
    row = summarise(kernel_events(trace_dir), token_steps)
    row.update(wall_us_per_step=wall / token_steps * 1e6, host_outside_step_us=(wall - in_run[0]) / token_steps * 1e6,
               engine_steps=steps, token_steps=token_steps)
    engine.close()
    return row


def print_table(name: str, row: dict, base: dict | None, top: int) -> None:
    if "error" in row:
        print(f"{name}: {row['error']}")
        return
    if "wall_us_per_step" in row:
        print(f"\n{name}: wall {row['wall_us_per_step']:.0f} us/step, of which the host outside the jitted step "
              f"{row['host_outside_step_us']:.0f}", end="")
    print(f"\n{name}: span {row['span_us_per_step']:.0f} us/step = busy {row['busy_us_per_step']:.0f} "
          f"+ idle {row['idle_us_per_step']:.0f}; {row['kernels_per_step']:.0f} kernels/step")
    print(f"  {'kernel':<60}{'n/step':>8}{'us/step':>10}{'us each':>9}  new")
    ranked = sorted(row["kernels"].items(), key=lambda kv: -kv[1]["us_per_step"])
    for kname, k in ranked[:top]:
        new = "" if base is None or kname in base.get("kernels", {}) else "  +"
        each = k["us_per_step"] / max(k["count_per_step"], 1e-9)
        print(f"  {kname[:60]:<60}{k['count_per_step']:>8.1f}{k['us_per_step']:>10.1f}{each:>9.2f}{new}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a tiny model, for a smoke run on the CPU")
    ap.add_argument("--batch", type=int, default=64, help="decoding sequences = distinct adapters")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--modules", default="all-linear", help="LoRA target modules, e.g. q_proj,k_proj,v_proj,o_proj")
    ap.add_argument("--ctx", type=int, default=512, help="tokens already in the cache")
    ap.add_argument("--steps", type=int, default=4, help="decode steps in the traced loop")
    ap.add_argument("--engine", action="store_true", help="trace the serving engine's decode steps instead")
    ap.add_argument("--scheduler-steps", type=int, default=EngineConfig.num_scheduler_steps,
                    help="with --engine: EngineConfig.num_scheduler_steps (default: %(default)s)")
    ap.add_argument("--top", type=int, default=25, help="kernels listed per variant")
    ap.add_argument("--out", default="benchmarks/results/profile_step_h100.json")
    args = ap.parse_args()
    config = TINY if args.tiny else LLAMA_8B
    modules = parse_lora_modules(args.modules)
    dtype = jnp.bfloat16
    init = jax.jit(lambda k: init_params(config, k, dtype))
    split = split_layers_enabled(RuntimeConfig.from_env())
    rows = {}
    with tempfile.TemporaryDirectory() as trace_root:
        if args.engine:
            modules = parse_lora_modules("q_proj,k_proj,v_proj,o_proj")
            for name, adapters in (("lora_off", False), ("lora_kernels", True)):
                rows[name] = profile_engine(config, lambda: init(jax.random.key(0)), adapters, args.batch,
                                            args.steps, trace_root, name, args.tiny, args.scheduler_steps)
        else:
            params = init(jax.random.key(0))
            if split:
                params = split_layers(params, donate=True)
            bank = random_bank(config, args.rank, args.batch, jax.random.key(2), dtype, modules)
            for name, b in (("lora_off", None), ("lora_kernels", bank)):
                rows[name] = profile_variant(config, params, b, args.batch, args.ctx, args.steps, trace_root, name)
    for name, row in rows.items():
        print_table(name, row, rows["lora_off"] if name != "lora_off" else None, args.top)
    off, on = rows["lora_off"], rows["lora_kernels"]
    if "error" not in off and "error" not in on:
        if args.engine:
            print(f"\nLoRA adds {on['wall_us_per_step'] - off['wall_us_per_step']:.0f} us/step of wall time; "
                  f"ratio {off['wall_us_per_step'] / on['wall_us_per_step']:.3f}")
        print(f"LoRA adds {on['span_us_per_step'] - off['span_us_per_step']:.0f} us/step of device span: busy "
              f"{on['busy_us_per_step'] - off['busy_us_per_step']:+.0f}, idle "
              f"{on['idle_us_per_step'] - off['idle_us_per_step']:+.0f}")
    result = {"device": jax.devices()[0].device_kind, "platform": jax.default_backend(), "jax": jax.__version__,
              "model": "tiny" if args.tiny else "llama-8b-shaped", "batch": args.batch, "rank": args.rank,
              "modules": list(modules), "ctx": "64 + decoded" if args.engine else args.ctx,
              "what": "serving engine decode steps" if args.engine else "jitted decode loop", "steps": args.steps,
              "layer_loop": "split" if split else "scan", "variants": rows,
              "num_scheduler_steps": args.scheduler_steps if args.engine else None,
              "command": "python3 scripts/profile_step.py " + " ".join(sys.argv[1:])}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
