"""Pallas Mosaic (TPU) kernels for segmented multi-LoRA shrink and expand.

The tile table (built with aligned=True, so no tile crosses a block_t row block) is scalar-prefetched
into SMEM; index maps read it to pick each grid step's row block and adapter slot. Consecutive tiles of
one row block keep the output block resident, so a block shared by several segments is written once.
Padding entries of the table repeat the last tile's blocks, so they fetch nothing new.

Only checked in interpret mode: no TPU was available.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import stacked, tuning
from pallas_kernels.metadata import SegmentMetadata

_LANE = 128


def _lane_block(dim: int, preferred: int) -> int:
  """Largest multiple of 128 that divides `dim` and is <= preferred, or `dim` itself."""
  for b in range(preferred - preferred % _LANE, 0, -_LANE):
    if dim % b == 0:
      return b
  return dim


def _row_padding(num_tokens: int, bt: int) -> int:
  """Rows to add so that bt divides T (0 unless bt is neither a divisor nor T itself)."""
  return 0 if num_tokens % bt == 0 else -num_tokens % bt


def _first_visit(i, lo_ref, bt):
  """True at the first tile of a row block (tiles of one block are consecutive)."""
  prev = jnp.maximum(i - 1, 0)
  return (i == 0) | (lo_ref[i] // bt != lo_ref[prev] // bt)


def _row_mask(i, lo_ref, hi_ref, bt, width):
  rows = (lo_ref[i] // bt) * bt + jax.lax.broadcasted_iota(jnp.int32, (bt, width), 0)
  return (rows >= lo_ref[i]) & (rows < hi_ref[i])


def _shrink_kernel(lo_ref, hi_ref, slot_ref, nt_ref, layer_ref, x_ref, a_ref, zeros_ref, o_ref, *, bt, rank,
                   compute_dtype):
  del slot_ref, nt_ref, layer_ref, zeros_ref
  i, k = pl.program_id(0), pl.program_id(1)

  @pl.when((k == 0) & _first_visit(i, lo_ref, bt))
  def _():
    o_ref[...] = jnp.zeros_like(o_ref)

  part = jnp.dot(x_ref[...].astype(compute_dtype), a_ref[...].astype(compute_dtype),
                 preferred_element_type=jnp.float32)
  o_ref[...] += jnp.where(_row_mask(i, lo_ref, hi_ref, bt, rank), part, 0.0)


@functools.partial(jax.jit, static_argnames=("interpret",))
def shrink(x: jax.Array, a: jax.Array, slot_ids: jax.Array, meta: SegmentMetadata, layer=None, *,
           interpret: bool = False) -> jax.Array:
  """Mosaic segmented shrink. Semantics and shapes as `dispatch.lora_shrink`; returns [T, R] f32."""
  del slot_ids  # rows of slot -1 keep the aliased zeros
  pad = _row_padding(x.shape[0], meta.block_t)
  if pad:  # slow path for a T that no block size divides
    return shrink(jnp.pad(x, ((0, pad), (0, 0))), a, None, meta, layer, interpret=interpret)[:x.shape[0]]
  num_tokens, d_in = x.shape
  (a,), layer_arr, num_slots = stacked.in_place((a,), layer)
  rank = a.shape[2]
  bt = meta.block_t
  bk = _lane_block(d_in, tuning.tpu_blocks(d_in, d_in).block_k)
  grid = (meta.max_tiles, d_in // bk)

  def row_block(i, k, lo, hi, slot, nt, layer):
    return lo[i] // bt, k

  def a_block(i, k, lo, hi, slot, nt, layer):
    return layer[0] * num_slots + slot[i], k, 0

  def o_block(i, k, lo, hi, slot, nt, layer):
    return lo[i] // bt, 0

  kernel = functools.partial(_shrink_kernel, bt=bt, rank=rank,
                             compute_dtype=jnp.promote_types(x.dtype, a.dtype))
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((num_tokens, rank), jnp.float32),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=5,
          grid=grid,
          in_specs=[pl.BlockSpec((bt, bk), row_block),
                    pl.BlockSpec((None, bk, rank), a_block),
                    pl.BlockSpec(memory_space=pl.ANY)],
          out_specs=pl.BlockSpec((bt, rank), o_block)),
      input_output_aliases={7: 0},  # zeros -> v: row blocks no tile visits stay zero
      compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary", "arbitrary")),
      interpret=interpret,
      name="lora_shrink_tpu",
  )(meta.tile_lo, meta.tile_hi, meta.tile_slot, meta.num_tiles, layer_arr, x, a,
    jnp.zeros((num_tokens, rank), jnp.float32))


def _expand_kernel(lo_ref, hi_ref, slot_ref, nt_ref, layer_ref, v_ref, *refs, bt, bn, rank, block_starts,
                   num_slices):
  del slot_ref, nt_ref, layer_ref
  b_refs = refs[:num_slices]
  y_ref, o_ref = refs[num_slices], refs[num_slices + 1]
  c, i = pl.program_id(0), pl.program_id(1)

  @pl.when(_first_visit(i, lo_ref, bt))
  def _():
    o_ref[...] = y_ref[...]

  mask = _row_mask(i, lo_ref, hi_ref, bt, bn)
  for j in range(num_slices):

    @pl.when((c >= block_starts[j]) & (c < block_starts[j + 1]))
    def _(j=j):
      b = b_refs[j][...]
      vj = v_ref[:, j * rank:(j + 1) * rank].astype(b.dtype)
      delta = jnp.dot(vj, b, preferred_element_type=jnp.float32)
      out = o_ref[...].astype(jnp.float32) + delta
      o_ref[...] = jnp.where(mask, out.astype(o_ref.dtype), o_ref[...])


@functools.partial(jax.jit, static_argnames=("interpret",))
def expand(y: jax.Array, v: jax.Array, b_slices: tuple[jax.Array, ...], meta: SegmentMetadata, layer=None, *,
           interpret: bool = False) -> jax.Array:
  """Mosaic segmented fused expand. Semantics and shapes as `dispatch.lora_expand`.

  Every d_j must share a block width that is a multiple of 128 (true for Llama-family shapes).
  """
  pad = _row_padding(y.shape[0], meta.block_t)
  if pad:  # slow path for a T that no block size divides
    rows = ((0, pad), (0, 0))
    return expand(jnp.pad(y, rows), jnp.pad(v, rows), b_slices, meta, layer,
                  interpret=interpret)[:y.shape[0]]
  num_tokens, d_total = y.shape
  n = len(b_slices)
  b_slices, layer_arr, num_slots = stacked.in_place(tuple(b_slices), layer)
  rank = v.shape[1] // n
  dims = tuple(int(b.shape[2]) for b in b_slices)
  bn = tuning.tpu_blocks(d_total, d_total).block_n
  while bn > _LANE and any(d % bn for d in dims):
    bn -= _LANE
  if any(d % bn for d in dims):
    raise ValueError(f"every b_slices d_j must be a multiple of {_LANE} for the Mosaic kernel, "
                     f"got {dims}")
  block_starts = [0]
  for d in dims:
    block_starts.append(block_starts[-1] + d // bn)
  bt = meta.block_t
  grid = (block_starts[-1], meta.max_tiles)  # tiles innermost: the output block stays resident

  def row_block(c, i, lo, hi, slot, nt, layer):
    return lo[i] // bt, c

  def v_block(c, i, lo, hi, slot, nt, layer):
    return lo[i] // bt, 0

  def b_block(j):
    first, count = block_starts[j], block_starts[j + 1] - block_starts[j]

    def index(c, i, lo, hi, slot, nt, layer):
      active = (c >= first) & (c < first + count)
      # Inactive slices keep a fixed block, so they are not fetched again.
      return layer[0] * num_slots + jnp.where(active, slot[i], 0), 0, jnp.clip(c - first, 0, count - 1)
    return index

  kernel = functools.partial(_expand_kernel, bt=bt, bn=bn, rank=rank,
                             block_starts=tuple(block_starts), num_slices=n)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct(y.shape, y.dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=5,
          grid=grid,
          in_specs=[pl.BlockSpec((bt, n * rank), v_block)]
          + [pl.BlockSpec((None, rank, bn), b_block(j)) for j in range(n)]
          + [pl.BlockSpec((bt, bn), row_block)],
          out_specs=pl.BlockSpec((bt, bn), row_block)),
      input_output_aliases={6 + n: 0},  # y -> y_out: row blocks no tile visits keep y
      compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary", "arbitrary")),
      interpret=interpret,
      name="lora_expand_tpu",
  )(meta.tile_lo, meta.tile_hi, meta.tile_slot, meta.num_tiles, layer_arr, v, *b_slices, y)
