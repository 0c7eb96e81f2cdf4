"""The timing harness of `bench_kernels.py`: cases, input sets, the looped median timer and the baselines.

Each timing is the median over repeats of one jitted `fori_loop` that issues N calls, rotating over K input sets (so
repeated calls do not hit L2 where the inputs are large enough to rotate) and carrying outputs so nothing is
hoisted or dropped. The copy bandwidth measured here is the roofline.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import pallas_kernels as pk  # noqa: E402
from pallas_kernels import triton_lora  # noqa: E402

ROTATE_BYTES = 160e6  # > 3x the H100's 50 MB L2
MAX_ROTATE = 32
LOOP_SECONDS = 0.03


@dataclasses.dataclass(frozen=True)
class Case:
  op: str        # "shrink" or "expand"
  tokens: int    # T
  adapters: int  # S distinct adapters, tokens sorted by slot
  d: int         # d_in (shrink) or d_out (expand)
  rank: int


def _median_time(fn, sets, state, calls: int) -> float:
  """Seconds per call: median of 5 timed runs of fn(sets, state) -> state, a loop of `calls` calls."""
  state = fn(sets, state)  # compile and warm up
  jax.block_until_ready(state)
  times = []
  for _ in range(5):
    t0 = time.perf_counter()
    state = fn(sets, state)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t0)
  return statistics.median(times) / calls


def _looped(op, num_sets: int, trips: int, carry_index: int | None):
  """jit(loop of trips x num_sets calls of op(*set_k)); the output (or input carry_index) is carried."""
  def run(sets, init):
    def body(i, carry):
      new = []
      for k in range(num_sets):
        args = list(sets[k])
        if carry_index is not None:
          args[carry_index] = carry[k]
        else:  # make an input loop-variant, so XLA cannot hoist the call out of the loop
          args[0], _ = jax.lax.optimization_barrier((args[0], i))
        new.append(op(*args))
      return tuple(new)
    return jax.lax.fori_loop(0, trips, body, init)
  return jax.jit(run, donate_argnums=(1,))


def sorted_ids(tokens: int, adapters: int) -> np.ndarray:
  """Sorted slot ids: `adapters` segments of near-equal length."""
  return np.repeat(np.arange(adapters, dtype=np.int32),
                   np.diff(np.linspace(0, tokens, adapters + 1).astype(np.int64)))


def case_bytes(c: Case) -> float:
  """Fewest bytes each call must move: inputs once, outputs once (bf16 data, f32 v)."""
  if c.op == "shrink":
    return c.tokens * c.d * 2 + c.adapters * c.d * c.rank * 2 + c.tokens * c.rank * 4
  return 2 * c.tokens * c.d * 2 + c.adapters * c.rank * c.d * 2 + c.tokens * c.rank * 4


def make_sets(c: Case, num_sets: int, key):
  ids = jnp.asarray(sorted_ids(c.tokens, c.adapters))
  sets = []
  for k in range(num_sets):
    k1, k2, key = jax.random.split(jax.random.fold_in(key, k), 3)
    if c.op == "shrink":
      x = jax.random.normal(k1, (c.tokens, c.d), jnp.bfloat16)
      a = (jax.random.normal(k2, (c.adapters, c.d, c.rank), jnp.float32) / np.sqrt(c.d))
      sets.append((x, a.astype(jnp.bfloat16)))
    else:
      v = jax.random.normal(k1, (c.tokens, c.rank), jnp.float32)
      b = (0.01 * jax.random.normal(k2, (c.adapters, c.rank, c.d))).astype(jnp.bfloat16)
      y = jax.random.normal(key, (c.tokens, c.d), jnp.bfloat16)
      sets.append((y, v, b))
  return ids, sets


def impls(c: Case, ids, backend: str, compare: tuple[str, ...] = ()):
  """name -> (op(*set) with ids/meta closed over, index of the carried arg or None). Each backend of `compare` adds
  "pallas_<backend>": its kernels (the tiled expand at every size), with its own tile table."""
  out = _impls(c, ids, backend)
  for other in compare:
    m = pk.segment_metadata(ids, backend=other)
    if c.op == "shrink":
      out[f"pallas_{other}"] = (lambda x, a, m=m, o=other: pk.lora_shrink(x, a, ids, meta=m, backend=o), None)
    else:
      out[f"pallas_{other}"] = (lambda y, v, b, m=m, o=other: pk.lora_expand(y, v, (b,), ids, meta=m, backend=o,
                                                                             decode_expand="triton"), 0)
  return out


def _impls(c: Case, ids, backend: str):
  meta = pk.segment_metadata(ids, backend=backend)
  group_sizes = jnp.bincount(ids, length=c.adapters).astype(jnp.int32)
  if c.op == "shrink":
    return {
        "pallas": (lambda x, a: pk.lora_shrink(x, a, ids, meta=meta, backend=backend), None),
        "gather_einsum": (lambda x, a: jnp.einsum("td,tdr->tr", x, a[ids],
                                                  preferred_element_type=jnp.float32), None),
        "ragged_dot": (lambda x, a: jax.lax.ragged_dot(x, a, group_sizes,
                                                       preferred_element_type=jnp.float32), None),
    }

  def einsum_expand(y, v, b):
    d = jnp.einsum("tr,tro->to", v.astype(b.dtype), b[ids], preferred_element_type=jnp.float32)
    return (y.astype(jnp.float32) + d).astype(y.dtype)

  def ragged_expand(y, v, b):
    d = jax.lax.ragged_dot(v.astype(b.dtype), b, group_sizes, preferred_element_type=jnp.float32)
    return (y.astype(jnp.float32) + d).astype(y.dtype)

  out = {
      "pallas": (lambda y, v, b: pk.lora_expand(y, v, (b,), ids, meta=meta, backend=backend), 0),
      "gather_einsum": (einsum_expand, 0),
      "ragged_dot": (ragged_expand, 0),
  }
  if c.tokens <= 256 and backend in ("triton", "interpret"):
    # The tiled Triton expand, which decode-sized steps skip by default (tuning.DECODE_EXPAND).
    out["pallas_tiled"] = (lambda y, v, b: triton_lora.expand(y, v, (b,), meta, interpret=backend == "interpret"), 0)
  return out


def _init(op, sets, carry_index):
  """The loop's first carry: fresh outputs, or copies of the carried inputs (they are donated)."""
  if carry_index is None:
    return tuple(jax.jit(op)(*s) for s in sets)
  return tuple(jnp.array(s[carry_index], copy=True) for s in sets)


def time_op(op, sets, per_call_guess: float, carry_index: int | None = None) -> float:
  """Seconds per call of op(*sets[k]), looped over the input sets for about LOOP_SECONDS per timed run."""
  trips = int(max(2, min(200, LOOP_SECONDS / (per_call_guess * len(sets)))))
  fn = _looped(op, len(sets), trips, carry_index)
  return _median_time(fn, sets, _init(op, sets, carry_index), trips * len(sets))


def time_case(c: Case, backend: str, copy_bw: float, skip_ragged_above: int, compare: tuple[str, ...] = ()) -> dict:
  nbytes = case_bytes(c)
  num_sets = int(max(1, min(MAX_ROTATE, ROTATE_BYTES // nbytes)))
  ids, sets = make_sets(c, num_sets, jax.random.key(c.tokens * 7 + c.adapters * 13 + c.d + c.rank))
  row = dataclasses.asdict(c) | {"bytes": nbytes, "rotate_sets": num_sets,
                                 "roofline_us": nbytes / copy_bw * 1e6}
  for name, (op, carry_index) in impls(c, ids, backend, compare).items():
    if name == "ragged_dot" and c.tokens > skip_ragged_above:
      row[f"{name}_us"] = None
      continue
    guess = {"gather_einsum": 10.0, "ragged_dot": 100.0}.get(name, 3.0)
    per_call = max(nbytes / copy_bw * guess, 10e-6)
    try:
      row[f"{name}_us"] = time_op(op, sets, per_call, carry_index) * 1e6
    except Exception as e:  # noqa: BLE001 - a baseline that fails to run is reported, not fatal
      row[f"{name}_us"] = None
      row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
      print(f"  {name} failed: {row[f'{name}_error']}", flush=True)
  p = row["pallas_us"]
  row["pallas_GBps"] = nbytes / (p * 1e-6) / 1e9
  row["pallas_pct_roofline"] = 100.0 * row["roofline_us"] / p
  for base in ("gather_einsum", "ragged_dot"):
    row[f"speedup_vs_{base}"] = (row[f"{base}_us"] / p) if row.get(f"{base}_us") else None
  for other in compare:  # > 1: the other backend is faster than `backend`'s kernels
    q = row.get(f"pallas_{other}_us")
    row[f"pallas_{other}_speedup"] = p / q if q else None
  if row.get("pallas_tiled_us"):
    row["tiled_speedup_vs_gather_einsum"] = row["gather_einsum_us"] / row["pallas_tiled_us"]
  return row


def launch_floor(backend: str) -> dict:
  """Per-call µs of the smallest calls, timed like the cases: a one-program Pallas kernel that adds 1 to a
  [16, 128] bf16 block in place, and the same add as an XLA op. What a kernel of a few µs cannot go below."""
  from jax.experimental import pallas as pl

  def bump(x_ref, o_ref):
    o_ref[...] = x_ref[...] + jnp.ones_like(x_ref[...])

  def pallas_add(x):
    return pl.pallas_call(bump, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), input_output_aliases={0: 0},
                          interpret=backend == "interpret", name="floor")(x)

  sets = tuple((jax.random.normal(jax.random.key(k), (16, 128), jnp.bfloat16),) for k in range(8))
  out = {}
  for name, op in (("pallas", pallas_add), ("xla", lambda x: x + jnp.ones_like(x))):
    fn = _looped(op, len(sets), 200, 0)
    out[f"{name}_us"] = _median_time(fn, sets, _init(op, sets, 0), 200 * len(sets)) * 1e6
  return out


def copy_bandwidth(n: int = 1 << 30) -> float:
  """Bytes/s of a large in-place elementwise pass over n float32 values (read + write): the roofline.

  On the H200 a 4 GiB float32 pass reached 4.16 TB/s (the device-to-device copy figure, 4.2 TB/s), where the same
  pass over bf16 values reached only 3.22 TB/s: XLA's bf16 elementwise kernels are not bandwidth-bound there
  (benchmarks/results/copy_bandwidth_h200.txt). The spec is 4.8 TB/s.
  """
  x = jax.random.normal(jax.random.key(0), (n,), jnp.float32)
  trips = 10
  fn = jax.jit(lambda x: jax.lax.fori_loop(0, trips, lambda i, x: x + jnp.float32(1), x),
               donate_argnums=0)
  x = fn(x)
  jax.block_until_ready(x)
  times = []
  for _ in range(5):
    t0 = time.perf_counter()
    x = fn(x)
    jax.block_until_ready(x)
    times.append(time.perf_counter() - t0)
  return 2 * n * 4 * trips / statistics.median(times)


def time_case_pallas_only(c: Case, backend: str, copy_bw: float) -> dict:
  nbytes = case_bytes(c)
  num_sets = int(max(1, min(MAX_ROTATE, ROTATE_BYTES // nbytes)))
  ids, sets = make_sets(c, num_sets, jax.random.key(1))
  op, carry_index = impls(c, ids, backend)["pallas"]
  trips = int(max(2, min(200, LOOP_SECONDS / (max(nbytes / copy_bw * 3, 10e-6) * num_sets))))
  fn = _looped(op, num_sets, trips, carry_index)
  us = _median_time(fn, sets, _init(op, sets, carry_index), trips * num_sets) * 1e6
  return {"pallas_us": us, "roofline_us": nbytes / copy_bw * 1e6}
