"""Pallas Triton (GPU) kernels for segmented multi-LoRA shrink and expand.

Both kernels walk the tile table of `metadata.SegmentMetadata` with a fixed grid: program p handles
tiles p, p + G, p + 2G, ... up to the dynamic tile count, so the grid is static while the number of
segments is not. Refs are whole arrays; rows are selected with masked loads at the tile's row offset,
so tiles need not be aligned to anything.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import stacked, tuning
from pallas_kernels.metadata import SegmentMetadata

# tl.dot needs every dimension >= 16; smaller ranks use a broadcast multiply-reduce instead.
_MIN_DOT = 16


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def _mm(lhs: jax.Array, rhs: jax.Array) -> jax.Array:
  """[m, k] @ [k, n] -> [m, n] float32, via tl.dot when all dims allow it."""
  if min(lhs.shape[0], lhs.shape[1], rhs.shape[1]) >= _MIN_DOT:
    return jax.lax.dot_general(lhs, rhs, (((1,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)
  return jnp.sum(lhs.astype(jnp.float32)[:, :, None] * rhs.astype(jnp.float32)[None, :, :], axis=1)


def _padded(n: int) -> int:
  """Power-of-two tensor size >= n and >= 16, so tl.dot applies (r=8 measured 4x slower without)."""
  return max(_MIN_DOT, pl.next_power_of_2(n))


def _trips(count, pid, nprog):
  """Iterations of `for i in range(pid, count, nprog)`, for a traced count."""
  return jax.lax.div(jnp.maximum(count - pid, 0) + nprog - 1, nprog)


# Up to this many table entries, each program takes one entry (empty ones return at once): no loop over the table
# and no wait on the tile count before the first loads, which is most of a decode kernel's fixed cost.
_ONE_TILE_EACH = 256


def _num_programs(meta: SegmentMetadata, num_slots: int) -> int:
  """Grid size: one program per table entry for small tables; else enough programs for sorted ids (row blocks +
  one partial tile per slot), capped by the table length M."""
  if meta.max_tiles <= _ONE_TILE_EACH:
    return meta.max_tiles
  return max(1, min(meta.max_tiles, _cdiv(meta.num_tokens, meta.block_t) + num_slots + 1))


def _for_each_tile(nt_ref, pid, nprog, one_each: bool, body) -> None:
  """Runs body(i) for this program's tiles: i = pid + k * nprog below the tile count. With one entry per program,
  body(pid) runs unless the entry is empty (body checks that), without reading the tile count first."""
  if one_each:
    body(pid)
    return

  def loop_body(it, carry):
    body(pid + it * nprog)
    return carry

  jax.lax.fori_loop(0, _trips(nt_ref[0], pid, nprog), loop_body, 0)


def _shrink_kernel(lo_ref, hi_ref, slot_ref, nt_ref, layer_ref, ids_ref, x_ref, a_ref, o_ref, *, bt, bk,
                   rank, rank_p, d_in, k_steps, num_tokens, num_slots, compute_dtype, zero_rows, one_each):
  pid = pl.program_id(0)
  split = pl.program_id(1)
  nprog = pl.num_programs(0)
  iota_t = jnp.arange(bt, dtype=jnp.int32)
  iota_k = jnp.arange(bk, dtype=jnp.int32)
  # Triton tensors have power-of-two sizes: R (3r for a fused qkv) is padded to rank_p and masked.
  full_r = jnp.arange(rank_p, dtype=jnp.int32)[None, :] < rank

  if zero_rows:
    # Rows of slot -1 belong to no tile: this program zeroes them in its share of row blocks.
    def zero_body(it, carry):
      r0 = (pid + it * nprog) * bt
      rows = r0 + iota_t
      ids = plgpu.load(ids_ref.at[pl.ds(r0, bt)], mask=rows < num_tokens, other=0)
      mask = ((ids < 0) & (rows < num_tokens))[:, None] & full_r
      plgpu.store(o_ref.at[split, pl.ds(r0, bt), pl.ds(0, rank_p)],
                  jnp.zeros((bt, rank_p), jnp.float32), mask=mask)
      return carry

    jax.lax.fori_loop(0, _trips(_cdiv(num_tokens, bt), pid, nprog), zero_body, 0)

  def tile_body(i):
    lo = lo_ref[i]
    hi = hi_ref[i]
    slot = layer_ref[0] * num_slots + slot_ref[i]  # row of the [L * S, d_in, R] view of A
    row_ok = (lo + iota_t) < hi

    @pl.when(hi > lo)
    def _():
      def k_body(kk, acc):
        k0 = (split * k_steps + kk) * bk
        col_ok = (k0 + iota_k) < d_in
        xb = plgpu.load(x_ref.at[pl.ds(lo, bt), pl.ds(k0, bk)],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        ab = plgpu.load(a_ref.at[slot, pl.ds(k0, bk), pl.ds(0, rank_p)],
                        mask=col_ok[:, None] & full_r, other=0.0)
        return acc + _mm(xb.astype(compute_dtype), ab.astype(compute_dtype))

      acc = jax.lax.fori_loop(0, k_steps, k_body, jnp.zeros((bt, rank_p), jnp.float32))
      plgpu.store(o_ref.at[split, pl.ds(lo, bt), pl.ds(0, rank_p)], acc,
                  mask=row_ok[:, None] & full_r)

  _for_each_tile(nt_ref, pid, nprog, one_each, tile_body)


@functools.partial(jax.jit, static_argnames=("interpret", "sum_splits"))
def shrink(x: jax.Array, a: jax.Array, slot_ids: jax.Array, meta: SegmentMetadata, layer=None, *,
           interpret: bool = False, sum_splits: bool = True) -> jax.Array:
  """Triton segmented shrink. Semantics and shapes as `dispatch.lora_shrink`; returns [T, R] f32.

  With sum_splits=False it returns the [K, T, R] partial sums of its K programs per tile over d_in (decode splits
  d_in to fill the GPU), for `expand` to add up: one launch fewer than summing them here. Rows of slot -1 are then
  left unwritten (`expand` reads only the rows of tiles), which saves each program a dependent load and store.
  """
  num_tokens, d_in = x.shape
  (a,), layer_arr, num_slots = stacked.in_place((a,), layer)
  rank = a.shape[2]
  bt = meta.block_t
  blocks = tuning.gpu_shrink_blocks(num_tokens, d_in, rank, jnp.promote_types(x.dtype, a.dtype).itemsize, bt)
  bk = min(blocks.block_k, max(16, pl.next_power_of_2(d_in)))
  k_total = _cdiv(d_in, bk)
  splits = max(1, min(blocks.k_splits, k_total))
  k_steps = _cdiv(k_total, splits)
  grid = (_num_programs(meta, num_slots), splits)
  compute_dtype = jnp.promote_types(x.dtype, a.dtype)
  kernel = functools.partial(_shrink_kernel, bt=bt, bk=bk, rank=rank,
                             rank_p=_padded(rank), d_in=d_in, k_steps=k_steps,
                             num_tokens=num_tokens, num_slots=num_slots, compute_dtype=compute_dtype,
                             zero_rows=sum_splits, one_each=grid[0] == meta.max_tiles)
  partials = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((splits, num_tokens, rank), jnp.float32),
      grid=grid,
      compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps,
                                           num_stages=blocks.num_stages),
      interpret=interpret,
      name="lora_shrink",
  )(meta.tile_lo, meta.tile_hi, meta.tile_slot, meta.num_tiles, layer_arr, slot_ids.astype(jnp.int32), x, a)
  if not sum_splits:
    return partials
  return partials[0] if splits == 1 else jnp.sum(partials, axis=0)


def _expand_kernel(lo_ref, hi_ref, slot_ref, nt_ref, layer_ref, v_ref, *refs, bt, bn, rank, rank_p, dims,
                   block_starts, num_slices, num_slots, v_splits, one_each):
  b_refs = refs[:num_slices]
  o_ref = refs[-1]  # aliases y: rows outside every tile keep y's values
  y_ref = refs[num_slices]
  pid = pl.program_id(0)
  col_block = pl.program_id(1)
  nprog = pl.num_programs(0)
  iota_t = jnp.arange(bt, dtype=jnp.int32)
  iota_n = jnp.arange(bn, dtype=jnp.int32)
  r_ok = jnp.arange(rank_p, dtype=jnp.int32) < rank  # ranks below 16 are padded and masked

  for j in range(num_slices):
    d_j = dims[j]
    off_j = sum(dims[:j])
    first, last = block_starts[j], block_starts[j + 1]

    @pl.when((col_block >= first) & (col_block < last))
    def _(j=j, d_j=d_j, off_j=off_j, first=first):
      n0 = (col_block - first) * bn
      col_ok = (n0 + iota_n) < d_j
      b_ref = b_refs[j]
      b_dtype = b_ref.dtype

      def tile_body(i):
        lo = lo_ref[i]
        hi = hi_ref[i]
        slot = layer_ref[0] * num_slots + slot_ref[i]
        row_ok = (lo + iota_t) < hi
        mask = row_ok[:, None] & col_ok[None, :]

        @pl.when(hi > lo)
        def _():
          # Traced split and column starts: a static column start would fail Pallas's bounds check when
          # rank_p > rank (although the padded columns are masked), a static split index interpret mode.
          vb = None
          for k in range(v_splits):  # the shrink's partial sums over d_in, added up here
            part = plgpu.load(v_ref.at[k + 0 * lo, pl.ds(lo, bt), pl.ds(j * rank + 0 * lo, rank_p)],
                              mask=row_ok[:, None] & r_ok[None, :], other=0.0)
            vb = part if vb is None else vb + part
          bb = plgpu.load(b_ref.at[slot, pl.ds(0, rank_p), pl.ds(n0, bn)],
                          mask=r_ok[:, None] & col_ok[None, :], other=0.0)
          # v is rounded to B's dtype so the dot runs on the tensor cores (as in Punica and vLLM).
          delta = _mm(vb.astype(b_dtype), bb)
          yb = plgpu.load(y_ref.at[pl.ds(lo, bt), pl.ds(off_j + n0, bn)], mask=mask, other=0.0)
          out = (yb.astype(jnp.float32) + delta).astype(o_ref.dtype)
          plgpu.store(o_ref.at[pl.ds(lo, bt), pl.ds(off_j + n0, bn)], out, mask=mask)

      _for_each_tile(nt_ref, pid, nprog, one_each, tile_body)


@functools.partial(jax.jit, static_argnames=("interpret",))
def expand(y: jax.Array, v: jax.Array, b_slices: tuple[jax.Array, ...], meta: SegmentMetadata, layer=None, *,
           interpret: bool = False) -> jax.Array:
  """Triton segmented fused expand. Semantics and shapes as `dispatch.lora_expand`; v may also be the [K, T, n r]
  partial sums of `shrink(..., sum_splits=False)`, added up here."""
  num_tokens, d_total = y.shape
  n = len(b_slices)
  if v.ndim == 2:
    v = v[None]
  rank = v.shape[2] // n
  b_slices, layer_arr, num_slots = stacked.in_place(tuple(b_slices), layer)
  dims = tuple(int(b.shape[2]) for b in b_slices)
  itemsize = jnp.promote_types(v.dtype, b_slices[0].dtype).itemsize
  blocks = tuning.gpu_expand_blocks(num_tokens, d_total, rank, itemsize)
  if pl.next_power_of_2(rank) != rank:
    raise ValueError(f"per-slice rank must be a power of two for the Triton kernel, got {rank}")
  bn = min(blocks.block_n, max(16, pl.next_power_of_2(max(dims))))
  block_starts = [0]
  for d in dims:
    block_starts.append(block_starts[-1] + _cdiv(d, bn))
  grid = (_num_programs(meta, num_slots), block_starts[-1])
  kernel = functools.partial(_expand_kernel, bt=meta.block_t, bn=bn, rank=rank,
                             rank_p=_padded(rank), dims=dims,
                             block_starts=tuple(block_starts), num_slices=n, num_slots=num_slots,
                             v_splits=v.shape[0], one_each=grid[0] == meta.max_tiles)
  y_index = 6 + n
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct(y.shape, y.dtype),
      grid=grid,
      input_output_aliases={y_index: 0},
      compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps,
                                           num_stages=blocks.num_stages),
      interpret=interpret,
      name="lora_expand",
  )(meta.tile_lo, meta.tile_hi, meta.tile_slot, meta.num_tiles, layer_arr, v, *b_slices, y)
