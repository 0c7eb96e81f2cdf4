"""Benchmarks the multi-LoRA shrink/expand kernels against XLA baselines on the local device.

Prints a table and writes JSON (default benchmarks/results/kernels_h100.json).

Every figure is measured in the same run: the device-to-device copy bandwidth (the roofline), the
Pallas kernels, XLA gather-einsum and `jax.lax.ragged_dot`, timed by `kernel_timing.py`.

  python3 scripts/bench_kernels.py                # full sweep
  python3 scripts/bench_kernels.py --quick        # a few shapes
  python3 scripts/bench_kernels.py --tune         # also try alternative block sizes on key shapes
  python3 scripts/bench_kernels.py --tune-mid     # also sweep shrink tilings at 1024-4096 tokens
  python3 scripts/bench_kernels.py --tune-decode  # ... and at decode-sized steps (T <= 256)
  python3 scripts/bench_kernels.py --compare mosaic_gpu  # the Mosaic GPU kernels beside (the GPU default)

At T <= 256 the public expand runs XLA's gather-einsum (`tuning.DECODE_EXPAND`), so the tiled Triton expand is timed
beside it ("tiled"). Every run records the launch floor: the per-call time of a one-program Pallas kernel and of
one XLA op on a [16, 128] block.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import pallas_kernels as pk  # noqa: E402
from pallas_kernels import tuning  # noqa: E402
from kernel_timing import (Case, copy_bandwidth, launch_floor, time_case,  # noqa: E402
                           time_case_pallas_only)

_TRIVIAL = {"pjit", "jit", "closed_call", "convert_element_type", "reshape", "squeeze", "broadcast_in_dim", "slice",
            "concatenate"}


# A Pallas launch: pallas_call (Triton, TPU Mosaic), mpmd_map / core_map (`plgpu.kernel`, Mosaic GPU).
_KERNELS = {"pallas_call", "mpmd_map", "core_map"}


def count_ops(jaxpr) -> dict:
  """Counts the pallas_call ops and other non-trivial ops one run of a closed jaxpr executes: nested calls where
  they are used, scan bodies times their length, the larger branch of a cond."""

  def walk(jx) -> dict:
    counts = {"pallas_call": 0, "other": 0}
    for eqn in jx.eqns:
      name = eqn.primitive.name
      subs = [v for v in eqn.params.values() if hasattr(v, "jaxpr") or hasattr(v, "eqns")]
      subs += [b for v in eqn.params.values() if isinstance(v, tuple) for b in v if hasattr(b, "jaxpr")]
      if name in _KERNELS:
        counts["pallas_call"] += 1
      elif subs:
        inner = [walk(s.jaxpr if hasattr(s, "jaxpr") else s) for s in subs]
        times = eqn.params.get("length", 1) if name == "scan" else 1
        for key in counts:
          parts = [c[key] for c in inner]
          counts[key] += max(parts) if name == "cond" else times * sum(parts)
      elif name not in _TRIVIAL:
        counts["other"] += 1
    return counts
  return walk(jaxpr.jaxpr)


def launches_per_decode_step(backend: str, layers: int = 32, tokens: int = 256) -> dict:
  """LoRA kernel launches per decode step of a Llama-3-8B-shaped model (4 fused groups x L)."""
  groups = {  # name: (d_in, d_out slices), GQA 8 kv heads of 128
      "qkv": (4096, (4096, 1024, 1024)), "o": (4096, (4096,)),
      "gate_up": (4096, (14336, 14336)), "down": (14336, (4096,)),
  }
  r = 16
  ids = jnp.zeros((tokens,), jnp.int32)
  out = {"layers": layers, "tokens": tokens, "rank": r, "groups": {}}
  meta_jaxpr = jax.make_jaxpr(lambda i: pk.segment_metadata(i, backend=backend))(ids)
  total_p, total_o = 0, 0
  for name, (d_in, dims) in groups.items():
    n = len(dims)
    x = jax.ShapeDtypeStruct((tokens, d_in), jnp.bfloat16)
    a = jax.ShapeDtypeStruct((4, d_in, n * r), jnp.bfloat16)
    bs = tuple(jax.ShapeDtypeStruct((4, r, d), jnp.bfloat16) for d in dims)
    y = jax.ShapeDtypeStruct((tokens, sum(dims)), jnp.bfloat16)
    meta = jax.eval_shape(lambda i: pk.segment_metadata(i, backend=backend), ids)

    def group(x, a, bs, y, ids, meta):  # the model's call (its split-K partial sums need no reduction op)
      return pk.lora_shrink_expand(x, y, a, bs, ids, meta=meta, backend=backend)
    c = count_ops(jax.make_jaxpr(group)(x, a, bs, y, ids, meta))
    out["groups"][name] = c
    total_p += c["pallas_call"]
    total_o += c["other"]
  out["pallas_calls_per_layer"] = total_p
  out["other_xla_ops_per_layer"] = total_o
  out["pallas_calls_per_step"] = total_p * layers
  out["other_xla_ops_per_step"] = total_o * layers
  out["metadata_ops_per_step"] = count_ops(meta_jaxpr)["other"]
  return out


def sweep(quick: bool, smoke: bool = False) -> list[Case]:
  if smoke:  # tiny shapes to check the script itself on CPU
    return [Case(op, t, s, 256, 16) for op in ("shrink", "expand") for t, s in ((16, 16), (64, 2))]
  cases = []
  ts = (16, 256, 2048, 8192) if quick else (16, 64, 256, 1024, 2048, 8192)
  for op in ("shrink", "expand"):
    for d, r in ((4096, 16),) if quick else ((4096, 16), (4096, 8), (4096, 64), (14336, 16)):
      main = d == 4096 and r == 16
      for t in ts if main else (16, 256, 2048, 8192):
        ss = {1, min(t, 128), t if t <= 256 else 1024} if main else {1, min(t, 128)}
        for s in sorted(ss):
          cases.append(Case(op, t, s, d, r))
  return cases


def tune(backend: str, copy_bw: float) -> list[dict]:
  """Times alternative block sizes on key shapes by swapping the tuning table's entries."""
  rows = []
  shrink_opts = [(bk, ks, w, st) for bk in (128, 256) for ks in (1, 4) for w in (4, 8)
                 for st in (3, 4)]
  orig_s, orig_e, orig_t = tuning.gpu_shrink_blocks, tuning.gpu_expand_blocks, tuning.block_t
  for t, s in ((256, 256), (256, 1), (8192, 128)):
    for bt in (16, 32, 64) if t > 256 else (16,):
      for bk, ks, w, st in shrink_opts:
        if t > 256 and ks > 1:
          continue
        tuning.block_t = lambda n, b, bt=bt: bt
        tuning.gpu_shrink_blocks = lambda *a, o=(bk, ks, w, st): tuning.GpuShrinkBlocks(*o)
        jax.clear_caches()
        c = Case("shrink", t, s, 4096, 16)
        r = time_case_pallas_only(c, backend, copy_bw)
        rows.append(r | {"block_t": bt, "block_k": bk, "k_splits": ks, "warps": w, "stages": st})
        print(f"tune shrink T={t} S={s} bt={bt} bk={bk} ks={ks} w={w} st={st}: "
              f"{r['pallas_us']:.1f} us", flush=True)
      for bn in (64, 128, 256):
        for w in (4, 8):
          tuning.block_t = lambda n, b, bt=bt: bt
          tuning.gpu_expand_blocks = lambda *a, o=(bn, w, 2): tuning.GpuExpandBlocks(*o)
          jax.clear_caches()
          c = Case("expand", t, s, 4096, 16)
          r = time_case_pallas_only(c, backend, copy_bw)
          rows.append(r | {"block_t": bt, "block_n": bn, "warps": w})
          print(f"tune expand T={t} S={s} bt={bt} bn={bn} w={w}: {r['pallas_us']:.1f} us",
                flush=True)
  tuning.gpu_shrink_blocks, tuning.gpu_expand_blocks, tuning.block_t = orig_s, orig_e, orig_t
  jax.clear_caches()
  return rows


MID_SHAPES = ((2048, 1, 4096, 16), (2048, 128, 4096, 8), (2048, 128, 4096, 16), (1024, 1, 4096, 16),
              (4096, 1, 4096, 16))
MID_TILINGS = tuple((bk, ks, w, 3) for bk in (64, 128, 256) for ks in (2, 4, 8) for w in (4, 8))
# Decode-sized steps: one adapter (few programs per tile), the model's fused q|k|v (R=48) and o groups at batch 64
# with 64 adapters, and 128 adapters over 256 tokens. Larger K blocks with fewer splits, or more splits.
DECODE_SHAPES = ((16, 1, 4096, 16), (64, 1, 4096, 16), (16, 1, 14336, 16), (64, 64, 4096, 48), (64, 64, 4096, 16),
                 (256, 128, 4096, 16))
DECODE_TILINGS = ((256, 2, 4, 4), (512, 1, 4, 2), (512, 2, 4, 2), (1024, 1, 4, 2), (1024, 1, 8, 2), (512, 4, 4, 2),
                  (256, 8, 4, 2), (128, 16, 4, 2))


def tune_shrink(label: str, shapes, tilings, backend: str, copy_bw: float, rows=None, save=None) -> list[dict]:
  """Times every shrink tiling (block_k, k_splits, warps, stages) on each (T, S, d_in, R) shape by swapping the
  tuning table's entry; a tiling that fails to compile (shared memory) is recorded as such. Rows are appended to
  `rows` (a new list by default) and save(), if given, runs after each, so a run cut short keeps what it measured."""
  rows = [] if rows is None else rows
  orig = tuning.gpu_shrink_blocks
  for t, s, d, r in shapes:
    for tiling in tilings:
      tuning.gpu_shrink_blocks = lambda *a, o=tiling: tuning.GpuShrinkBlocks(*o)
      jax.clear_caches()
      row = {"tokens": t, "adapters": s, "d": d, "rank": r, "block_k": tiling[0], "k_splits": tiling[1],
             "warps": tiling[2], "stages": tiling[3]}
      try:
        res = time_case_pallas_only(Case("shrink", t, s, d, r), backend, copy_bw)
      except Exception as e:  # noqa: BLE001 - e.g. a block too large for shared memory
        res = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        print(f"{label} shrink T={t} S={s} d={d} R={r} {tiling}: failed", flush=True)
      else:
        res["pct_roofline"] = 100.0 * res["roofline_us"] / res["pallas_us"]
        print(f"{label} shrink T={t} S={s} d={d} R={r} {tiling}: {res['pallas_us']:.1f} us "
              f"({res['pct_roofline']:.0f}%)", flush=True)
      rows.append(row | res)
      if save is not None:
        save()
  tuning.gpu_shrink_blocks = orig
  jax.clear_caches()
  return rows


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true")
  p.add_argument("--tune", action="store_true", help="also try alternative block sizes on key shapes")
  p.add_argument("--tune-mid", action="store_true", help="also sweep shrink tilings at 1024-4096 tokens")
  p.add_argument("--tune-decode", action="store_true", help="also sweep shrink tilings at decode-sized steps")
  p.add_argument("--backend", default=None, help="kernel backend (default: by platform)")
  p.add_argument("--compare", default=None,
                 help="comma-separated kernel backends timed beside --backend in every case, as pallas_<name>_us "
                      "(default on GPU: mosaic_gpu, the Mosaic GPU kernels beside the Triton ones; 'none': none)")
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "benchmarks",
                                               "results", "kernels_h100.json"))
  p.add_argument("--ranks", default=None, help="comma-separated ranks to keep from the sweep")
  p.add_argument("--smoke", action="store_true", help="tiny shapes, to check the script on CPU")
  p.add_argument("--max-seconds", type=float, default=1e9,
                 help="stop the sweep after this long (the JSON keeps what was measured)")
  p.add_argument("--skip-ragged-above", type=int, default=8192,
                 help="skip ragged_dot above this many tokens (it is very slow)")
  args = p.parse_args()
  backend = pk.resolve_backend(args.backend)
  compare = _compare_backends(args.compare, backend)
  dev = jax.devices()[0]
  start = time.perf_counter()
  copy_bw = copy_bandwidth(1 << 22) if args.smoke else copy_bandwidth()
  print(f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}, backend {backend}, "
        f"copy roofline {copy_bw / 1e12:.2f} TB/s (read+write)", flush=True)
  result = {"device": dev.device_kind, "platform": dev.platform, "jax": jax.__version__,
            "backend": backend, "dtype": "bfloat16", "copy_bandwidth_GBps": copy_bw / 1e9,
            "compare_backends": list(compare), "command": "python3 " + " ".join(sys.argv)}
  result["launches_per_decode_step"] = launches_per_decode_step(backend)
  for other in compare:
    result[f"launches_per_decode_step_{other}"] = launches_per_decode_step(other)
  result["cases"] = []
  print("launches per decode step (Llama-3-8B shapes, L=32):",
        json.dumps(result["launches_per_decode_step"]), flush=True)
  result["launch_floor"] = launch_floor(backend)
  print("launch floor (us per call):", json.dumps(result["launch_floor"]), flush=True)
  if args.tune:
    result["tune"] = tune(backend, copy_bw)
  for flag, key, shapes, tilings in ((args.tune_mid, "tune_mid", MID_SHAPES, MID_TILINGS),
                                     (args.tune_decode, "tune_decode", DECODE_SHAPES, DECODE_TILINGS)):
    if flag:  # the rows land in result[key] as they are timed, and the JSON is rewritten after each
      tune_shrink(key.replace("_", "-"), shapes, tilings, backend, copy_bw, rows=result.setdefault(key, []),
                  save=lambda: _write(args.out, result))
  rows = result["cases"]
  hdr = (f"{'op':6} {'T':>5} {'S':>5} {'d':>6} {'r':>3} | {'pallas us':>9} {'GB/s':>6} {'%roof':>5} "
         f"| {'einsum us':>9} {'x':>5} | {'ragged us':>9} {'x':>6}")
  print(hdr, flush=True)
  keep = {int(r) for r in args.ranks.split(",")} if args.ranks else None
  for c in sweep(args.quick, args.smoke):
    if keep is not None and c.rank not in keep:
      continue
    if time.perf_counter() - start > args.max_seconds:
      print(f"stopping: --max-seconds {args.max_seconds} reached", flush=True)
      result["stopped_early"] = True
      break
    row = time_case(c, backend, copy_bw, args.skip_ragged_above, compare)
    rows.append(row)

    def f(v, w, p=1):
      return f"{v:{w}.{p}f}" if v is not None else f"{'-':>{w}}"
    print(f"{c.op:6} {c.tokens:5d} {c.adapters:5d} {c.d:6d} {c.rank:3d} | {f(row['pallas_us'], 9)} "
          f"{f(row['pallas_GBps'], 6, 0)} {f(row['pallas_pct_roofline'], 5, 0)} | "
          f"{f(row['gather_einsum_us'], 9)} {f(row['speedup_vs_gather_einsum'], 5, 2)} | "
          f"{f(row['ragged_dot_us'], 9)} {f(row['speedup_vs_ragged_dot'], 6, 1)}"
          + (f" | tiled {row['pallas_tiled_us']:.1f} us, x{row['tiled_speedup_vs_gather_einsum']:.2f}"
             if row.get("pallas_tiled_us") else "")
          + "".join(f" | {o} {f(row[f'pallas_{o}_us'], 1)} us, x{f(row[f'pallas_{o}_speedup'], 1, 2)}"
                    for o in compare), flush=True)
    _write(args.out, result)
  _write(args.out, result)
  print(f"wrote {args.out}")


def _compare_backends(arg: str | None, backend: str) -> tuple[str, ...]:
  """The backends of --compare: by default the Mosaic GPU kernels when the Triton ones are timed."""
  if arg is None:
    return ("mosaic_gpu",) if backend == "triton" else ()
  names = tuple(n for n in arg.split(",") if n and n != "none")
  for n in names:
    if pk.resolve_backend(n) in ("xla", "reference") or n == backend:
      raise SystemExit(f"--compare takes other kernel backends than --backend {backend!r}, got {n!r}")
  return names


def _write(path: str, result: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as fh:
    json.dump(result, fh, indent=1)


if __name__ == "__main__":
  main()
