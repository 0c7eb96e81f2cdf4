"""Pallas Mosaic GPU kernels for segmented multi-LoRA shrink and expand (TMA and wgmma, Hopper).

Both kernels run one program per 64-row block of tokens (wgmma's fixed M) and column block. The tile table is built
with block_t = 64 and aligned=True, so the tiles of a row block are consecutive entries of it and never cross into
the next block; `block_bounds` gives each block its entries. A program walks them: every tile is one wgmma product of
the whole row block with the tile's adapter, and its rows are picked out of the product with a row mask, so rows of
slot -1 (in no tile) come out 0 (shrink) or y (expand), and every output row is written exactly once, by a full-tile
TMA store. A block shared by k segments computes k products.

Shrink: x and A tiles stream through `plgpu.emit_pipeline` (TMA into a ring of swizzled SMEM buffers); each x tile
in SMEM meets the A tiles of two of the block's tiles (one wgmma and fp32 accumulator each), so x is read once per
two segments of a block. Expand: the block's v columns of slice j are loaded once (TMA), y once, and B[slot] once
per tile, the next tile's B while this one's wgmma runs (two buffers); the sum is stored in y's dtype. v is rounded
to B's dtype first, as in the Triton expand.

Only 16-bit operands (bf16, f16) and shapes that fit wgmma's swizzled tiles take the kernels (`shrink_supported`,
`expand_supported`); the dispatcher sends other calls to the Triton-backend kernels. Float32 would run as TF32 on
the tensor cores, which misses a float32 tolerance.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import stacked, tuning
from pallas_kernels.metadata import SegmentMetadata

TILE_M = 64          # rows of a row block: wgmma's M, and the tile table's block_t for this backend
_MAX_N = 128         # widest column block: wgmma takes 256, but the fp32 accumulator and the carried output would
                     # then hold 256 registers per thread
_SWIZZLES = (128, 64, 32)  # bytes; wgmma takes no unswizzled operands
_DTYPES = (jnp.bfloat16, jnp.float16)


def _swizzle(minor_bytes: int) -> int | None:
  """The largest swizzle (bytes) that divides an operand's minor dimension, or None."""
  for s in _SWIZZLES:
    if minor_bytes % s == 0:
      return s
  return None


def _transforms(swizzle: int, itemsize: int) -> tuple:
  return plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle)


def _col_block(width: int, itemsize: int, preferred: int) -> int | None:
  """Widest divisor of `width` that is <= preferred and a multiple of 32 bytes (a wgmma N tile), or None."""
  step = 32 // itemsize
  for bn in range(min(preferred, width) // step * step, 0, -step):
    if width % bn == 0:
      return bn
  return None


def _is_16bit(*dtypes) -> bool:
  return all(any(jnp.dtype(d) == t for t in _DTYPES) for d in dtypes) and len({jnp.dtype(d) for d in dtypes}) == 1


def shrink_supported(x_dtype, a_dtype, d_in: int, rank: int) -> bool:
  """Whether the Mosaic shrink takes x [T, d_in] @ A [., d_in, rank]: equal 16-bit dtypes, d_in a multiple of
  64, rank a multiple of 16."""
  itemsize = jnp.dtype(x_dtype).itemsize
  return (_is_16bit(x_dtype, a_dtype) and d_in % (128 // itemsize) == 0
          and _col_block(rank, itemsize, _MAX_N) is not None)


def expand_supported(b_dtypes, v_rank: int, dims) -> bool:
  """Whether the Mosaic expand takes slices B_j [., r, d_j]: 16-bit dtypes, r and every d_j multiples of 16."""
  itemsize = jnp.dtype(b_dtypes[0]).itemsize
  bn = _col_block_all(dims, itemsize)
  return (_is_16bit(*b_dtypes) and bn is not None and v_rank % 8 == 0
          and _swizzle(math.gcd(v_rank, bn) * itemsize) is not None)


def _col_block_all(dims, itemsize: int) -> int | None:
  """One column block for every slice: the widest of 128, 64, 32, 16 elements that divides each d_j."""
  for bn in (128, 64, 32, 16):
    if bn * itemsize % 32 == 0 and all(d % bn == 0 for d in dims):
      return bn
  return None


def block_bounds(meta: SegmentMetadata, num_blocks: int) -> jax.Array:
  """[num_blocks + 1] int32: the tiles of row block b are entries [bounds[b], bounds[b + 1]) of the table.

  Real tiles are in token order and never cross a multiple of TILE_M (aligned metadata), so they are the ones whose
  first token lies in the block; padding entries (i >= num_tiles) sort past every block.
  """
  i = jnp.arange(meta.max_tiles, dtype=jnp.int32)
  lo = jnp.where(i < meta.num_tiles[0], meta.tile_lo, jnp.iinfo(jnp.int32).max)
  edges = jnp.arange(num_blocks + 1, dtype=jnp.int32) * TILE_M
  return jnp.searchsorted(lo, edges, side="left", method="compare_all").astype(jnp.int32)


def _pad_rows(arr: jax.Array, rows: int) -> jax.Array:
  return arr if arr.shape[0] == rows else jnp.pad(arr, ((0, rows - arr.shape[0]), (0, 0)))


def _check_meta(meta: SegmentMetadata) -> None:
  if meta.block_t != TILE_M or not meta.aligned:
    raise ValueError(f"meta must be built with block_t={TILE_M} and aligned=True for the Mosaic GPU kernels "
                     f"(segment_metadata(..., backend='mosaic_gpu')), got block_t={meta.block_t}, "
                     f"aligned={meta.aligned}")


def _params(interpret: bool):
  return plgpu.InterpretGPUParams() if interpret else None


def _shrink_kernel(bounds_ref, lo_ref, hi_ref, slot_ref, layer_ref, x_ref, a_ref, o_ref, o_smem, *, bk, bn,
                   k_steps, num_slots, stages, transforms, group, release):
  rb = lax.axis_index("rows")
  cb = lax.axis_index("cols")
  split = lax.axis_index("split")  # this program's share of d_in: K steps [split * k_steps, (split + 1) * k_steps)
  rows = rb * TILE_M + plgpu.broadcasted_iota(jnp.int32, (TILE_M, bn), 0, layout=plgpu.Layout.WGMMA)

  first, last = bounds_ref[rb], bounds_ref[rb + 1]
  # wgmma is asynchronous: a step's buffers are released one step later (`release`), when its products are done.
  x_spec = plgpu.BlockSpec((TILE_M, bk), lambda k: (rb, split * k_steps + k), transforms=transforms,
                           delay_release=release)
  a_spec = plgpu.BlockSpec((bk, bn), lambda k: (split * k_steps + k, cb), transforms=transforms,
                           delay_release=release)

  def tile_pass(p, out):
    """Tiles first + p * G ... of the block against one pass over x: G products per x tile in smem. Entries past
    the block's last tile repeat it (an L2 hit) and are masked out."""
    base = first + p * group
    idx = [jnp.minimum(base + g, last - 1) for g in range(group)]
    ws = [layer_ref[0] * num_slots + slot_ref[i] for i in idx]  # rows of the [L * S, d_in, R] view of A

    def product(*acc_refs):
      def step(_, x_smem, *a_smems):
        for acc_ref, a_smem in zip(acc_refs, a_smems):
          plgpu.wgmma(acc_ref, x_smem, a_smem)

      plgpu.emit_pipeline(step, grid=(k_steps,), in_specs=[x_spec] + [a_spec] * group,
                          max_concurrent_steps=stages)(x_ref, *(a_ref.at[w] for w in ws))
      return tuple(acc_ref[...] for acc_ref in acc_refs)

    accs = pl.run_scoped(product, *(plgpu.ACC((TILE_M, bn), jnp.float32) for _ in range(group)))
    for g in range(group):
      lo = jnp.where(base + g < last, lo_ref[idx[g]], 0)  # a repeated entry keeps no row
      hi = jnp.where(base + g < last, hi_ref[idx[g]], 0)
      out = jnp.where((rows >= lo) & (rows < hi), accs[g], out)
    return out

  zeros = plgpu.layout_cast(jnp.full((TILE_M, bn), 0.0, jnp.float32), plgpu.Layout.WGMMA)
  out = lax.fori_loop(0, pl.cdiv(last - first, jnp.int32(group)), tile_pass, zeros)
  o_smem[...] = out
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(o_smem, o_ref.at[split, pl.ds(rb * TILE_M, TILE_M), pl.ds(cb * bn, bn)])
  plgpu.wait_smem_to_gmem(0)


def _tiles_per_pass(bn: int) -> int:
  """Tiles of a row block multiplied in one pass over its x: 2 (1 when two [64, bn] f32 accumulators and the
  carried output would not fit in registers), so a block shared by two segments reads x once, not twice. A block
  with one tile pays a second read of the same A tile per K step (from L2: a quarter of x's bytes at R = 16)."""
  return 2 if 3 * bn <= 256 else 1


def _divisor_at_most(n: int, most: int) -> int:
  return max(d for d in range(1, min(n, most) + 1) if n % d == 0)


@functools.partial(jax.jit, static_argnames=("interpret", "stages", "k_splits", "sum_splits"))
def shrink(x: jax.Array, a: jax.Array, meta: SegmentMetadata, layer=None, *, interpret: bool = False,
           stages: int = 3, k_splits: int | None = None, sum_splits: bool = True) -> jax.Array:
  """Mosaic GPU segmented shrink. Semantics and shapes as `dispatch.lora_shrink` (only shapes that
  `shrink_supported` takes); returns [T, R] float32.

  k_splits programs share each row block's d_in (None: `tuning.mosaic_gpu_shrink_splits`; rounded down to a
  divisor of d_in / 64 that leaves each at least 2 K steps); their partial sums are added up here, or with
  sum_splits=False returned as [K, T, R] (every row written: 0 for slot -1) for `xla.gather_lora_expand`, which
  adds them up itself.
  """
  _check_meta(meta)
  num_tokens, d_in = x.shape
  (a,), layer_arr, num_slots = stacked.in_place((a,), layer)
  rank = a.shape[2]
  itemsize = x.dtype.itemsize
  bn = _col_block(rank, itemsize, _MAX_N)
  swizzle = _swizzle(bn * itemsize)
  bk = 128 // itemsize  # 64 elements per K step
  num_blocks = pl.cdiv(num_tokens, TILE_M)
  padded = num_blocks * TILE_M
  k_total = d_in // bk
  if k_splits is None:
    k_splits = tuning.mosaic_gpu_shrink_splits(num_tokens, d_in)
  splits = _divisor_at_most(k_total, max(1, min(k_splits, k_total // 2)))  # >= 2 K steps each where d_in allows
  k_steps = k_total // splits
  kernel = functools.partial(_shrink_kernel, bk=bk, bn=bn, k_steps=k_steps, num_slots=num_slots,
                             stages=max(2, stages), transforms=_transforms(swizzle, itemsize),
                             group=_tiles_per_pass(bn), release=1 if k_steps > 1 else 0)
  out = plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((splits, padded, rank), jnp.float32),
      scratch_types=(plgpu.SMEM((TILE_M, bn), jnp.float32),),
      grid=(num_blocks, rank // bn, splits),
      grid_names=("rows", "cols", "split"),
      interpret=_params(interpret),
  )(block_bounds(meta, num_blocks), meta.tile_lo, meta.tile_hi, meta.tile_slot, layer_arr,
    _pad_rows(x, padded), a)
  out = out[:, :num_tokens]
  if not sum_splits:
    return out
  return out[0] if splits == 1 else jnp.sum(out, axis=0)


def _expand_kernel(bounds_ref, lo_ref, hi_ref, slot_ref, layer_ref, v_ref, *refs, bn, rank, dims, col_starts,
                   num_slots):
  n = len(dims)
  b_refs, y_ref, o_ref = refs[:n], refs[n], refs[n + 1]
  v_smem, b_smem, y_smem, v_bar, b_bar, y_bar = refs[n + 2:]
  rb = lax.axis_index("rows")
  cb = lax.axis_index("cols")
  row0 = rb * TILE_M
  rows = row0 + plgpu.broadcasted_iota(jnp.int32, (TILE_M, bn), 0, layout=plgpu.Layout.WGMMA)
  first, last = bounds_ref[rb], bounds_ref[rb + 1]

  for j in range(n):
    @pl.when((cb >= col_starts[j]) & (cb < col_starts[j + 1]))
    def _(j=j):
      n0 = (cb - col_starts[j]) * bn
      cols = pl.ds(sum(dims[:j]) + n0, bn)
      plgpu.copy_gmem_to_smem(y_ref.at[pl.ds(row0, TILE_M), cols], y_smem, y_bar)

      @pl.when(last > first)
      def _():
        plgpu.copy_gmem_to_smem(v_ref.at[pl.ds(row0, TILE_M), pl.ds(j * rank, rank)], v_smem, v_bar)

      plgpu.barrier_wait(y_bar)
      out = plgpu.load(y_smem, layout=plgpu.Layout.WGMMA, optimized=False).astype(jnp.float32)

      def fetch(i, buf):
        w = layer_ref[0] * num_slots + slot_ref[i]
        plgpu.copy_gmem_to_smem(b_refs[j].at[w, :, pl.ds(n0, bn)], b_smem.at[buf], b_bar.at[buf])

      def tile(i, out):
        buf = lax.rem(i - first, 2)
        # The other buffer's last reader, tile i - 1's wgmma, has finished: fetch tile i + 1's B into it.
        pl.when(i + 1 < last)(functools.partial(fetch, i + 1, 1 - buf))
        plgpu.barrier_wait(b_bar.at[buf])

        def product(acc_ref):
          plgpu.wgmma(acc_ref, v_smem, b_smem.at[buf])
          return acc_ref[...]

        delta = pl.run_scoped(product, plgpu.ACC((TILE_M, bn), jnp.float32))
        return jnp.where((rows >= lo_ref[i]) & (rows < hi_ref[i]), out + delta, out)

      @pl.when(last > first)
      def _():
        fetch(first, 0)
        plgpu.barrier_wait(v_bar)

      out = lax.fori_loop(first, last, tile, out)
      y_smem[...] = out.astype(y_smem.dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(y_smem, o_ref.at[pl.ds(row0, TILE_M), cols])
      plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("interpret",))
def expand(y: jax.Array, v: jax.Array, b_slices: tuple[jax.Array, ...], meta: SegmentMetadata, layer=None, *,
           interpret: bool = False) -> jax.Array:
  """Mosaic GPU segmented fused expand. Semantics and shapes as `dispatch.lora_expand` (only shapes that
  `expand_supported` takes); returns y_out [T, sum d_j] in y.dtype."""
  _check_meta(meta)
  num_tokens, d_total = y.shape
  n = len(b_slices)
  rank = v.shape[1] // n
  b_slices, layer_arr, num_slots = stacked.in_place(tuple(b_slices), layer)
  dtype = b_slices[0].dtype
  itemsize = jnp.dtype(dtype).itemsize
  dims = tuple(int(b.shape[2]) for b in b_slices)
  bn = _col_block_all(dims, itemsize)
  col_starts = [0]
  for d in dims:
    col_starts.append(col_starts[-1] + d // bn)
  num_blocks = pl.cdiv(num_tokens, TILE_M)
  padded = num_blocks * TILE_M
  kernel = functools.partial(_expand_kernel, bn=bn, rank=rank, dims=dims, col_starts=tuple(col_starts),
                             num_slots=num_slots)
  transforms = _transforms(_swizzle(math.gcd(rank, bn) * itemsize), itemsize)  # wgmma: one swizzle for v and B
  out = plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((padded, d_total), y.dtype),
      scratch_types=(
          plgpu.SMEM((TILE_M, rank), dtype, transforms=transforms),
          plgpu.SMEM((2, rank, bn), dtype, transforms=transforms),  # B of this tile and the next
          plgpu.SMEM((TILE_M, bn), y.dtype),
          plgpu.Barrier(),
          plgpu.Barrier(num_barriers=2),
          plgpu.Barrier(),
      ),
      grid=(num_blocks, col_starts[-1]),
      grid_names=("rows", "cols"),
      interpret=_params(interpret),
  )(block_bounds(meta, num_blocks), meta.tile_lo, meta.tile_hi, meta.tile_slot, layer_arr,
    _pad_rows(v.astype(dtype), padded), *b_slices, _pad_rows(y, padded))
  return out[:num_tokens]
