"""Start-up time: wall seconds until the default model's params are on the device, three ways.

  (a) gguf:        convert the GGUF file from scratch (dequantize, un-permute Q/K, write safetensors), then load it
  (b) safetensors: load the converted Hugging Face directory (read, stack and fuse on the host, copy)
  (c) orbax:       restore the orbax checkpoint kept beside the converted model straight into device buffers

Each is timed `--repeats` times in this process (the file cache is warm after the first read, as on a
restart) until every array is ready. Prints a table and writes benchmarks/results/startup_<platform>.json.

Usage: python scripts/bench_startup.py [--model smollm2-135m-instruct] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp


def _timed(fn) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def main() -> None:
    from jlora.checkpoint.gguf import convert_gguf
    from jlora.checkpoint.hf import load_hf_dir
    from jlora.checkpoint.orbax_store import restore_params, save_params
    from jlora.checkpoint.resolve import ORBAX_DIR, default_gguf_path, resolve_model_dir
    from jlora.config import ModelConfig
    from jlora.model.llama import param_shapes

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="default name or a .gguf file")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/startup_<platform>.json)")
    args = parser.parse_args()

    gguf = default_gguf_path() if args.model in ("default", "smollm2-135m-instruct") else args.model
    converted = resolve_model_dir(args.model, progress=False)
    config = ModelConfig.from_json(os.path.join(converted, "config.json"))
    ckpt = os.path.join(converted, ORBAX_DIR)
    if not os.path.isdir(ckpt):
        save_params(load_hf_dir(converted)[1], ckpt)

    def from_gguf():
        with tempfile.TemporaryDirectory() as tmp:
            convert_gguf(gguf, tmp, progress=False)
            return load_hf_dir(tmp)[1]

    ways = [
        ("gguf", "convert GGUF from scratch + load", os.path.getsize(gguf), from_gguf),
        ("safetensors", "load converted HF dir (safetensors)", _dir_bytes(converted) - _dir_bytes(ckpt),
         lambda: load_hf_dir(converted)[1]),
        ("orbax", "orbax restore onto the device", _dir_bytes(ckpt), lambda: restore_params(ckpt, config)),
        ("orbax_bf16", "orbax restore, cast to bfloat16", _dir_bytes(ckpt),
         lambda: restore_params(ckpt, config, dtype=jnp.bfloat16)),
    ]
    rows = []
    for key, what, nbytes, fn in ways:
        times = [_timed(fn) for _ in range(args.repeats)]
        rows.append({"method": key, "what": what, "file_mb": round(nbytes / 2**20, 1), "first_s": round(times[0], 3),
                     "median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3),
                     "times_s": [round(t, 3) for t in times]})

    base = next(r for r in rows if r["method"] == "gguf")["median_s"]
    print(f"{'method':12s} {'what':38s} {'MB':>6s} {'first s':>8s} {'median s':>9s} {'vs gguf':>8s}")
    for r in rows:
        print(f"{r['method']:12s} {r['what']:38s} {r['file_mb']:6.1f} {r['first_s']:8.2f} {r['median_s']:9.2f} "
              f"{base / r['median_s']:7.1f}x")
    device = jax.devices()[0]
    result = {
        "benchmark": "startup", "command": f"python scripts/bench_startup.py --repeats {args.repeats}",
        "model": args.model, "gguf": os.path.basename(gguf),
        "params": sum(math.prod(s) for s in jax.tree.leaves(param_shapes(config),
                                                            is_leaf=lambda s: isinstance(s, tuple))),
        "device": {"platform": device.platform, "kind": device.device_kind, "cpu": _cpu_name(),
                   "cpu_count": os.cpu_count(), "jax": jax.__version__},
        "note": "in-process wall time until every param array is ready on the device; file cache warm after "
                "the first repeat",
        "rows": rows,
    }
    out = args.out or os.path.join("benchmarks", "results", f"startup_{device.platform}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
