"""Benchmarks jlora's paged attention kernels (Mosaic GPU) against JAX's deprecated Pallas Triton paged-attention
kernel and the XLA paths, at 8B shapes (32 query heads, 8 kv heads, head_dim 128, page 16, bf16).

Prints a table and writes JSON (default benchmarks/results/attention_h200.json). Every figure comes from the same
run: the copy bandwidth that sets the KV-bytes floor (the better of XLA copies of 1 and 4 GiB and, where torch is
installed, a torch device-to-device copy of 4 GiB; each is reported), the kernels, and the baselines, timed with
`kernel_timing.py`'s looped device medians on random data.

  python3 scripts/bench_attention.py                 # decode and prefill rows
  python3 scripts/bench_attention.py --sweep         # also block_kv / stages / k_splits of the decode kernel
  python3 scripts/bench_attention.py --only decode   # or prefill
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from kernel_timing import LOOP_SECONDS, _looped, _median_time, copy_bandwidth  # noqa: E402
from pallas_kernels import attention as pa  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16
SPEC_BW = 4.8e12  # H200 datasheet
DTYPE = jnp.bfloat16
ROTATE_BYTES = 200e6  # > 3x the H200's 60 MB L2
DECODE_ROWS = [(64, 512), (64, 2048), (64, 8192), (1, 8192), (8, 8192)]
PREFILL_ROWS = [512, 2048, 8192]


def torch_copy_bandwidth(n_bytes: int = 4 << 30) -> float | None:
  try:
    import torch
  except ImportError:
    return None
  if not torch.cuda.is_available():
    return None
  x = torch.randn(n_bytes // 2, dtype=torch.bfloat16, device="cuda")
  y = torch.empty_like(x)
  for _ in range(3):
    y.copy_(x)
  times = []
  for _ in range(10):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    times.append(start.elapsed_time(end) / 1e3)
  del x, y
  torch.cuda.empty_cache()
  return 2 * n_bytes / statistics.median(times)


def decode_inputs(batch: int, ctx: int, key) -> tuple:
  """Random q [B, N, H], a pool of exactly the rows' pages (shuffled), tables [B, ctx / 16], lengths = ctx."""
  pages = ctx // PAGE
  kq, kk, kv, kp = jax.random.split(key, 4)
  shape = (KV_HEADS, batch * pages, PAGE, HEAD_DIM)
  q = jax.random.normal(kq, (batch, HEADS, HEAD_DIM), DTYPE)
  k = jax.random.normal(kk, shape, DTYPE)
  v = jax.random.normal(kv, shape, DTYPE)
  table = jax.random.permutation(kp, batch * pages).reshape(batch, pages).astype(jnp.int32)
  return q, k, v, jnp.full((batch,), ctx, jnp.int32), table


def triton_decode(q, k, v, lengths, table, programs: int = 512):
  """JAX's deprecated Pallas Triton kernel, partitioned as the engine partitions it."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from jax.experimental.pallas.ops.gpu import paged_attention as kernel
  batch, max_pages = table.shape
  k_splits = 1
  while k_splits < 16 and batch * KV_HEADS * k_splits < programs and max_pages % (2 * k_splits) == 0:
    k_splits *= 2
  return kernel.paged_attention((q * HEAD_DIM ** -0.5).astype(q.dtype), k, v, table, lengths, k_splits=k_splits,
                                pages_per_compute_block=math.gcd(max_pages // k_splits, 8))


def xla_decode(q, k, v, lengths, table):
  """Gather the rows' pages, then a dense masked softmax (f32 scores)."""
  batch = q.shape[0]
  keys = k[:, table].reshape(KV_HEADS, batch, -1, HEAD_DIM)    # [K, B, S, H]
  values = v[:, table].reshape(KV_HEADS, batch, -1, HEAD_DIM)
  qg = q.reshape(batch, KV_HEADS, HEADS // KV_HEADS, HEAD_DIM)
  s = jnp.einsum("bkgh,kbsh->bkgs", qg, keys, preferred_element_type=jnp.float32) * HEAD_DIM ** -0.5
  s = jnp.where(jnp.arange(keys.shape[2]) < lengths[:, None, None, None], s, -jnp.inf)
  p = jax.nn.softmax(s, axis=-1).astype(q.dtype)
  return jnp.einsum("bkgs,kbsh->bkgh", p, values).reshape(q.shape)


def prefill_inputs(tokens: int, key) -> tuple:
  pages = tokens // PAGE
  kq, kk, kv, kp = jax.random.split(key, 4)
  shape = (KV_HEADS, pages, PAGE, HEAD_DIM)
  q = jax.random.normal(kq, (1, tokens, HEADS, HEAD_DIM), DTYPE)
  table = jax.random.permutation(kp, pages).reshape(1, pages).astype(jnp.int32)
  return (q, jax.random.normal(kk, shape, DTYPE), jax.random.normal(kv, shape, DTYPE),
          jnp.arange(tokens, dtype=jnp.int32)[None], table)


def xla_prefill(q, k, v, positions, table):
  """Dense causal attention over the gathered table: [B, N, T, S] f32 scores."""
  batch, tokens = positions.shape
  keys = k[:, table].reshape(KV_HEADS, batch, -1, HEAD_DIM)
  values = v[:, table].reshape(KV_HEADS, batch, -1, HEAD_DIM)
  qg = q.reshape(batch, tokens, KV_HEADS, HEADS // KV_HEADS, HEAD_DIM)
  s = jnp.einsum("btkgh,kbsh->bkgts", qg, keys, preferred_element_type=jnp.float32) * HEAD_DIM ** -0.5
  mask = jnp.arange(keys.shape[2])[None, None] <= positions[:, :, None]
  s = jnp.where(mask[:, None, None], s, -jnp.inf)
  p = jax.nn.softmax(s, axis=-1).astype(q.dtype)
  return jnp.einsum("bkgts,kbsh->btkgh", p, values).reshape(q.shape)


def time_op(op, sets, per_call_guess: float) -> float:
  """Median µs per call of op over the rotating input sets (kernel_timing's looped timer)."""
  trips = int(max(2, min(200, LOOP_SECONDS / (max(per_call_guess, 10e-6) * len(sets)))))
  fn = _looped(op, len(sets), trips, None)
  init = tuple(jax.jit(op)(*s) for s in sets)
  return _median_time(fn, sets, init, trips * len(sets)) * 1e6


def timed(row: dict, name: str, op, sets, guess: float) -> None:
  try:
    row[f"{name}_us"] = time_op(op, sets, guess)
  except Exception as e:  # noqa: BLE001 - a variant that fails (OOM, lowering) is reported, not fatal
    row[f"{name}_us"] = None
    row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:400]}"
    print(f"  {name} failed: {row[f'{name}_error']}", flush=True)


def decode_row(batch: int, ctx: int, copy_bw: float, variants: dict) -> dict:
  kv_bytes = batch * ctx * KV_HEADS * HEAD_DIM * 2 * 2
  nbytes = kv_bytes + 2 * batch * HEADS * HEAD_DIM * 2  # + q in, out
  num_sets = int(max(1, min(8, ROTATE_BYTES // nbytes)))
  sets = [decode_inputs(batch, ctx, jax.random.key(batch * 7919 + ctx + s)) for s in range(num_sets)]
  floor = nbytes / copy_bw
  row = {"kind": "decode", "batch": batch, "ctx": ctx, "bytes": nbytes, "rotate_sets": num_sets,
         "floor_us": floor * 1e6, "splits": pa.decode_splits(batch, KV_HEADS, ctx // 64)}
  q, k, v, lengths, table = sets[0]
  err = np.abs(np.asarray(pa.paged_decode_attention(q, k, v, lengths, table), np.float32)
               - np.asarray(pa.ref_paged_decode_attention(q, k, v, lengths, table))).max()
  row["max_abs_err_vs_ref"] = float(err)
  for name, op in variants.items():
    timed(row, name, op, sets, 2 * floor)
  timed(row, "triton_deprecated", triton_decode, sets, 5 * floor)
  timed(row, "xla", xla_decode, sets, 10 * floor)
  if row.get("mosaic_us"):
    row["pct_floor"] = 100 * row["floor_us"] / row["mosaic_us"]
    for base in ("triton_deprecated", "xla"):
      row[f"speedup_vs_{base}"] = row[f"{base}_us"] / row["mosaic_us"] if row.get(f"{base}_us") else None
  else:
    row["pct_floor"] = None
  return row


def prefill_row(tokens: int, copy_bw: float, variants: dict) -> dict:
  sets = [prefill_inputs(tokens, jax.random.key(tokens))]
  flops = 4 * HEADS * HEAD_DIM * tokens * (tokens + 1) / 2  # causal QK^T and PV
  kv_bytes = tokens * KV_HEADS * HEAD_DIM * 2 * 2
  row = {"kind": "prefill", "batch": 1, "ctx": tokens, "tokens": tokens, "flops": flops,
         "floor_us": (kv_bytes + 2 * sets[0][0].nbytes) / copy_bw * 1e6}
  q, k, v, pos, table = sets[0]
  if tokens <= 2048:  # the reference's f32 scores [T, N, T] fit
    row["max_abs_err_vs_ref"] = float(np.abs(np.asarray(pa.paged_prefill_attention(q, k, v, pos, table), np.float32)
                                             - np.asarray(pa.ref_paged_prefill_attention(q, k, v, pos, table))).max())
  for name, op in variants.items():
    timed(row, name, op, sets, flops / 300e12)
  timed(row, "xla_dense", xla_prefill, sets, flops / 50e12)
  if row.get("mosaic_us"):
    row["mosaic_tflops"] = flops / row["mosaic_us"] / 1e6
    row["pct_floor"] = 100 * row["floor_us"] / row["mosaic_us"]
    row["speedup_vs_xla_dense"] = row["xla_dense_us"] / row["mosaic_us"] if row.get("xla_dense_us") else None
  return row


def sweep_variants(fn, blocks, splits=()) -> dict:
  """name -> op: the default, then other (block_kv, stages) and k_splits of `fn`."""
  out = {"mosaic": fn}
  for bkv, stages in blocks:
    out[f"mosaic_b{bkv}_s{stages}"] = (lambda *a, bkv=bkv, stages=stages: fn(*a, block_kv=bkv, stages=stages))
  for k in splits:
    out[f"mosaic_splits{k}"] = lambda *a, k=k: fn(*a, k_splits=k)
  return out


def fmt(x, spec=".1f"):
  return "-" if x is None else format(x, spec)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results",
                                                "attention_h200.json"))
  ap.add_argument("--only", choices=("decode", "prefill"), default=None)
  ap.add_argument("--sweep", action="store_true")
  args = ap.parse_args()

  dev = jax.devices()[0]
  copies = {"xla_copy_1GiB": copy_bandwidth(512 << 20), "xla_copy_4GiB": copy_bandwidth(2048 << 20)}
  copies["torch_copy_4GiB"] = torch_copy_bandwidth()
  copy_bw = max(v for v in copies.values() if v)
  print("copy bandwidth (TB/s): " + ", ".join(f"{k} {fmt(v and v / 1e12, '.2f')}" for k, v in copies.items())
        + f"; floor uses {copy_bw / 1e12:.2f} (spec {SPEC_BW / 1e12:.1f})", flush=True)
  result = {"device": dev.device_kind, "jax": jax.__version__, "copy_bandwidth": copies,
            "floor_bandwidth": copy_bw, "spec_bandwidth": SPEC_BW,
            "shapes": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "page_size": PAGE,
                       "dtype": "bfloat16"}, "rows": []}

  def save():
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)

  decode_variants = (sweep_variants(pa.paged_decode_attention, ((128, 2),), (2,)) if args.sweep
                     else {"mosaic": pa.paged_decode_attention})
  prefill_variants = (sweep_variants(pa.paged_prefill_attention, ((128, 2),)) if args.sweep
                      else {"mosaic": pa.paged_prefill_attention})
  if args.only in (None, "decode"):
    for batch, ctx in DECODE_ROWS:
      t0 = time.time()
      row = decode_row(batch, ctx, copy_bw, decode_variants)
      result["rows"].append(row)
      save()
      extra = " ".join(f"{k[7:-3]}={fmt(v)}" for k, v in row.items()
                       if k.startswith("mosaic_") and k.endswith("_us"))
      print(f"decode B={batch:3d} ctx={ctx:5d} floor {row['floor_us']:8.1f} us  mosaic {fmt(row.get('mosaic_us'))}"
            f" ({fmt(row['pct_floor'])}% floor)  triton {fmt(row.get('triton_deprecated_us'))}  xla "
            f"{fmt(row.get('xla_us'))}  err {row['max_abs_err_vs_ref']:.3g}  {extra}  [{time.time() - t0:.0f}s]",
            flush=True)
  if args.only in (None, "prefill"):
    for tokens in PREFILL_ROWS:
      row = prefill_row(tokens, copy_bw, prefill_variants)
      result["rows"].append(row)
      save()
      extra = " ".join(f"{k[7:-3]}={fmt(v)}" for k, v in row.items()
                       if k.startswith("mosaic_") and k.endswith("_us"))
      print(f"prefill T={tokens:5d} mosaic {fmt(row.get('mosaic_us'))} us ({fmt(row.get('mosaic_tflops'))} TFLOP/s)"
            f"  xla_dense {fmt(row.get('xla_dense_us'))} us  speedup {fmt(row.get('speedup_vs_xla_dense'), '.2f')}"
            f"  err {row.get('max_abs_err_vs_ref')}  {extra}", flush=True)

  print("\n| kind | batch | ctx | floor µs | mosaic µs | % floor | triton (deprecated) µs | xla µs |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- |")
  for r in result["rows"]:
    base = r.get("triton_deprecated_us") if r["kind"] == "decode" else None
    xla = r.get("xla_us") if r["kind"] == "decode" else r.get("xla_dense_us")
    print(f"| {r['kind']} | {r['batch']} | {r['ctx']} | {r['floor_us']:.1f} | {fmt(r.get('mosaic_us'))} | "
          f"{fmt(r.get('pct_floor'))} | {fmt(base)} | {fmt(xla)} |")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
