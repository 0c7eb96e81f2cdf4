"""Restart time: an engine's start with warm-up (every step shape compiled), with and without the persistent
compilation cache that `jlora serve` and `jlora generate` use on GPU and TPU (`jlora/compile_cache.py`).

Three fresh processes in a row, each building the same engine (8B-shaped Llama, random bf16 weights, rank-16 bank;
`--tiny` for a small model) and warming it up:
  (a) no cache           the baseline: every program compiled
  (b) cold cache         an empty cache directory: compiled and written
  (c) warm cache         the same directory again: a restart, programs loaded from disk
Each reports its seconds to build the engine and to warm it up, and how many programs it compiled or loaded.
The figure is (c)'s start against (a)'s; the issue's target for the 8B engine is 60 s. Prints a table and writes
benchmarks/results/restart_<platform>.json.

  python scripts/bench_restart.py                   # on a GPU
  python scripts/bench_restart.py --tiny --out /tmp/r.json   # a CPU smoke run (the cache is forced on)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def child(args) -> dict:
    """One start: build the engine and warm it up; the cache as the parent set it."""
    if args.cache_dir:
        from jlora import compile_cache
        compile_cache.enable(args.cache_dir)
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, HERE)
    from bench_forward import LLAMA_8B, TINY
    from jlora.config import LoraBankConfig
    from jlora.engine.compiles import compile_count, compile_seconds
    from jlora.engine.engine import Engine, EngineConfig
    from jlora.model import Llama, init_params

    config = TINY if args.tiny else LLAMA_8B
    dtype = jnp.bfloat16 if jax.default_backend() != "cpu" else jnp.float32
    t0 = time.perf_counter()
    params = jax.jit(lambda k: init_params(config, k, dtype))(jax.random.key(0))
    engine = Engine(Llama(config, params), None, EngineConfig(
        max_num_seqs=args.max_num_seqs, num_pages=args.num_pages, max_model_len=args.max_model_len,
        bank=LoraBankConfig(buckets=(16,), slots=(8,))))
    build_s = time.perf_counter() - t0
    before = compile_count()
    events = {"hits": 0, "compiles": 0}

    def count(event, *a, **kw):
        if event == "/jax/compilation_cache/cache_hits":
            events["hits"] += 1
        elif event == "/jax/core/compile/backend_compile_duration":
            events["compiles"] += 1

    jax.monitoring.register_event_listener(count)
    jax.monitoring.register_event_duration_secs_listener(count)
    t1 = time.perf_counter()
    shapes = engine.warmup()
    warmup_s = time.perf_counter() - t1
    return {"build_s": round(build_s, 3), "warmup_s": round(warmup_s, 3), "start_s": round(build_s + warmup_s, 3),
            "shapes": shapes, "programs": compile_count() - before, "compile_s": round(compile_seconds(), 3),
            "cache_hits": events["hits"], "compiled": events["compiles"],
            "platform": jax.default_backend(), "device": jax.devices()[0].device_kind}


def _run(argv: list[str], cache_dir: str | None, log: str | None = None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", *argv] + (["--cache-dir", cache_dir] if cache_dir else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if log:
        with open(log, "w") as f:
            f.write(r.stderr)
    if r.returncode != 0:
        return {"error": f"exit {r.returncode}: {r.stderr.strip()[-2000:]}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a small model (CPU smoke runs)")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--num-pages", type=int, default=2048)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--skip-no-cache", action="store_true",
                   help="skip run (a): the cold-cache run, which compiles every program too, is then the baseline")
    p.add_argument("--log-dir", default=None, help="keep each start's stderr here (e.g. with JAX_DEBUG_LOG_MODULES)")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/restart_<platform>.json)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    sizes = ["--max-num-seqs", str(args.max_num_seqs), "--num-pages", str(args.num_pages),
             "--max-model-len", str(args.max_model_len)] + (["--tiny"] if args.tiny else [])
    names = ["cold cache", "warm cache"] if args.skip_no_cache else ["no cache", "cold cache", "warm cache"]
    runs = {}
    if args.log_dir:
        os.makedirs(args.log_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="jlora-xla-") as cache:
        for name in names:  # the JSON is rewritten after each run, so a run cut short keeps the ones before
            t0 = time.perf_counter()
            log = os.path.join(args.log_dir, name.replace(" ", "_") + ".log") if args.log_dir else None
            runs[name] = _run(sizes, None if name == "no cache" else cache, log)
            print(f"{name}: {time.perf_counter() - t0:.1f} s wall", flush=True)
            _write(args, runs)
    print(f"{'start':<12}{'build s':>10}{'warm-up s':>11}{'total s':>10}{'programs':>10}")
    for name, r in runs.items():
        if "error" in r:
            print(f"{name:<12} failed: {r['error'][:300]}")
        else:
            print(f"{name:<12}{r['build_s']:>10.2f}{r['warmup_s']:>11.2f}{r['start_s']:>10.2f}{r['programs']:>10}")
    summary = _write(args, runs)
    if summary:
        print(f"restart with the cache: {summary['restart_s']:.1f} s against {summary['baseline_s']:.1f} s "
              f"({summary['baseline']}, {summary['speedup']}x); target for the 8B engine: 60 s")


def _write(args, runs: dict) -> dict:
    """Writes the runs so far and their summary; returns the summary (empty until the warm run is in)."""
    base = runs.get("no cache", runs.get("cold cache", {"error": "not run"}))
    warm = runs.get("warm cache", {"error": "not run"})
    summary = {}
    if "error" not in base and "error" not in warm:
        summary = {"restart_s": warm["start_s"], "baseline_s": base["start_s"],
                   "baseline": "no cache" if "no cache" in runs else "cold cache (compiles every program)",
                   "speedup": round(base["start_s"] / warm["start_s"], 2), "target_s": 60.0}
    platform = next((r["platform"] for r in runs.values() if "platform" in r), "unknown")
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"restart_{platform}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"command": " ".join(["scripts/bench_restart.py", *sys.argv[1:]]), "model": "tiny" if args.tiny
                   else "llama-8b-shaped", "runs": runs, "summary": summary}, f, indent=2)
    return summary


if __name__ == "__main__":
    main()
