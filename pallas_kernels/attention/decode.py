"""Paged decode attention on Pallas Mosaic GPU: one query per row, GQA-aware, split-K over the row's pages.

One program per (row b, kv head k, split s). It loads the G = N // K query heads of kv head k as G rows of a 64-row
wgmma tile (TMA wants the tile to start at a multiple of 8 rows; the other rows are other heads' queries, computed
and dropped), then walks blocks of
`block_kv` keys of its split: each block is `block_kv // page_size` TMA copies of whole pages, read in place through
the page table into a `stages`-deep shared-memory ring, so each KV page is read once for all G heads. Scores and
P @ V are wgmma (P goes through shared memory: interpret mode takes wgmma operands from refs only); the softmax is
online, in base 2. A ring slot of k is refilled as soon as the scores are read, v's after P @ V. Each split writes its
normalised output (in q's dtype) and its log-sum-exp; a small XLA pass combines the splits (none for one split).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.attention import common

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)


def _decode_kernel(len_ref, pt_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, q_smem, k_smem, v_smem, p_smem, o_smem,
                   lse_smem, q_bar, k_bar, v_bar, *, heads, group, page_size, block_kv, stages, splits, scale_log2,
                   window, dtype, offsets):
  b = lax.axis_index("batch")
  kv = lax.axis_index("kv")
  s = lax.axis_index("split")
  pages_per_block = block_kv // page_size
  max_pages = pt_ref.shape[1]

  length = len_ref[b]
  if window is None:
    lo = jnp.int32(0)
  else:  # first key kept is length - window; start at its page
    lo = lax.div(jnp.maximum(length - window, 0), jnp.int32(page_size)) * page_size
  per_split = pl.cdiv(pl.cdiv(length - lo, jnp.int32(splits)), jnp.int32(block_kv)) * block_kv
  start = lo + s * per_split
  end = jnp.minimum(length, start + per_split)
  num_blocks = jnp.maximum(pl.cdiv(end - start, jnp.int32(block_kv)), 0)
  # Pages past the row's last are never needed; re-reading the last one keeps every slot finite.
  last_page = jnp.clip(pl.cdiv(length, jnp.int32(page_size)) - 1, 0, max_pages - 1)

  def issue(i, slot, which):
    """TMA block i's pages of k and/or v into ring slot `slot`."""
    first = lax.div(start, jnp.int32(page_size)) + i * pages_per_block
    common.copy_pages(pt_ref, b, first, last_page, kv, (k_ref, v_ref)[which], (k_smem, v_smem)[which],
                      (k_bar, v_bar)[which], slot, page_size, pages_per_block)

  for st in range(stages):
    pl.when(st < num_blocks)(functools.partial(issue, st, st, slice(0, 2)))

  # TMA into a tiled tile needs a row start that is a multiple of 8: load from the aligned row at or before this
  # program's first head (clamped so the tile stays inside q); its heads sit at tile rows [r0, r0 + group).
  q_row = b * heads + kv * group
  tile_row = pl.multiple_of(jnp.minimum(lax.div(q_row, jnp.int32(8)) * 8, q_ref.shape[0] - common.TILE_M), 8)
  r0 = q_row - tile_row
  plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(tile_row, common.TILE_M)], q_smem, q_bar)
  plgpu.barrier_wait(q_bar)

  row_layout = plgpu.Layout.WGMMA.reduce(1)
  m_i = plgpu.layout_cast(jnp.full((common.TILE_M,), -jnp.inf, jnp.float32), row_layout)
  l_i = plgpu.layout_cast(jnp.full((common.TILE_M,), 0.0, jnp.float32), row_layout)
  acc = plgpu.layout_cast(jnp.full((common.TILE_M, q_smem.shape[-1]), 0.0, jnp.float32), plgpu.Layout.WGMMA)

  def body(i, carry):
    acc, m_i, l_i = carry
    slot = lax.rem(i, jnp.int32(stages))
    plgpu.barrier_wait(k_bar.at[slot])

    def scores(acc_ref):
      plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
      return acc_ref[...]

    qk = pl.run_scoped(scores, plgpu.ACC((common.TILE_M, block_kv), jnp.float32)) * scale_log2
    refill = i + stages < num_blocks
    pl.when(refill)(functools.partial(issue, i + stages, slot, slice(0, 1)))  # k's slot is free already
    pos = start + i * block_kv + plgpu.broadcasted_iota(jnp.int32, qk.shape, 1, layout=plgpu.Layout.WGMMA)
    valid = pos < end
    if window is not None:
      valid = valid & (pos >= length - window)
    qk = jnp.where(valid, qk, -jnp.inf)
    m_new = jnp.maximum(m_i, qk.max(axis=1))  # every block holds a valid key, so m_new is finite
    alpha = jnp.exp2(m_i - m_new)
    p = jnp.exp2(qk - lax.broadcast_in_dim(m_new, qk.shape, [0]))
    l_i = l_i * alpha + p.sum(axis=1)
    p_smem[...] = p.astype(dtype)
    plgpu.commit_smem()  # p is a wgmma operand: fence the stores for the async proxy
    plgpu.barrier_wait(v_bar.at[slot])

    def weighted(acc_ref):
      plgpu.wgmma(acc_ref, p_smem, v_smem.at[slot])
      return acc_ref[...]

    pv = pl.run_scoped(weighted, plgpu.ACC(acc.shape, jnp.float32))
    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv

    pl.when(refill)(functools.partial(issue, i + stages, slot, slice(1, 2)))
    return acc, m_new, l_i

  acc, m_i, l_i = lax.fori_loop(0, num_blocks, body, (acc, m_i, l_i))

  has_keys = l_i > 0.0
  inv = 1.0 / jnp.where(has_keys, l_i, 1.0)
  o_smem[...] = (acc * lax.broadcast_in_dim(inv, acc.shape, [0])).astype(o_smem.dtype)
  lse_smem[...] = jnp.where(has_keys, m_i + jnp.log(jnp.where(has_keys, l_i, 1.0)) * _LOG2E, -jnp.inf)
  plgpu.commit_smem()
  for r in offsets:  # static smem slices: one branch per r0 that some program has

    @pl.when(r0 == r)
    def _(r=r):
      plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(r, group)], o_ref.at[s, pl.ds(q_row, group)])

  plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[s, b * (heads // group) + kv])
  plgpu.wait_smem_to_gmem(0)


def _combine(o_split, lse_split, batch, kv_heads, group, out_dtype):
  """Merge split outputs: out = sum_s 2^(lse_s - m) o_s / sum_s 2^(lse_s - m). o_split [S, B*N, H] f32,
  lse_split [S, B*K, 64] f32 (base 2; -inf for a split with no keys) -> [B*N, H]."""
  rows = np.arange(batch * kv_heads * group)  # query row b * N + n sits at tile row r0(b, k) + n % group
  lse = lse_split[:, rows // group, common.tile_row_offset(rows - rows % group, lse_split.shape[1] * group)
                  + rows % group]  # [S, B*N]
  m = jnp.max(lse, axis=0)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  w = jnp.where(jnp.isfinite(lse), jnp.exp2(lse - m), 0.0)
  denom = jnp.sum(w, axis=0)
  out = jnp.einsum("sr,srh->rh", w, o_split) / jnp.where(denom > 0, denom, 1.0)[:, None]
  return out.astype(out_dtype)


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "k_splits", "block_kv", "stages",
                                             "interpret"))
def paged_decode_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, lengths: jax.Array,
                           page_table: jax.Array, *, sm_scale: float | None = None,
                           sliding_window: int | None = None, k_splits: int | None = None,
                           block_kv: int | None = None, stages: int | None = None,
                           interpret: bool = False) -> jax.Array:
  """Paged decode attention (Mosaic GPU).

  Semantics: out[b, n] = softmax_j(q[b, n] . k[b, j] * sm_scale) @ v[b, j] over key positions j in
  [max(0, lengths[b] - sliding_window), lengths[b]), where key j of row b is
  k_pages[n // (N // K), page_table[b, j // page_size], j % page_size] (v likewise). Rows with lengths[b] == 0
  are 0 and read no pages.

  Args:
    q: [B, N, H] bf16 or f16, one query per row; H in {64, 128}.
    k_pages, v_pages: [K, P, page_size, H], q's dtype, kv-head major; page_size a multiple of 8. Keys past a row's
      length may hold any finite values.
    lengths: [B] int32 in [0, M * page_size].
    page_table: [B, M] int32 page ids in [0, P) (entries past a row's last page are not read).
    sm_scale: score scale; None means H ** -0.5.
    sliding_window: keep only the last `sliding_window` keys of each row; None keeps all.
    k_splits: splits of each row's keys (None: `common.decode_splits`).
    block_kv, stages: keys per pipeline step and ring depth (None: `common.DECODE_BLOCKS`).
    interpret: run in Mosaic GPU interpret mode (CPU tests).
  Returns:
    [B, N, H] in q.dtype.
  """
  common.validate_decode(q, k_pages, v_pages, lengths, page_table, sliding_window)
  batch, heads, head_dim = q.shape
  kv_heads, _, page_size, _ = k_pages.shape
  group = heads // kv_heads
  max_pages = page_table.shape[1]
  blocks = common.DECODE_BLOCKS
  block_kv = block_kv or blocks.block_kv
  stages = stages or blocks.stages
  common.validate_blocks(block_kv, page_size, stages)
  splits = k_splits or common.decode_splits(batch, kv_heads, pl.cdiv(max_pages * page_size, block_kv))
  scale = head_dim ** -0.5 if sm_scale is None else sm_scale
  out_dtype = q.dtype  # also for split partials: an f32 o tile would leave one program per SM, not two

  q_flat = common.pad_rows(q.reshape(batch * heads, head_dim))
  kernel = functools.partial(
      _decode_kernel, heads=heads, group=group, page_size=page_size, block_kv=block_kv, stages=stages,
      splits=splits, scale_log2=scale * _LOG2E, window=sliding_window, dtype=q.dtype,
      offsets=common.tile_offsets(batch * heads, group))
  transforms = common.smem_transforms(q.dtype)
  o_split, lse_split = plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct((splits, batch * heads, head_dim), out_dtype),
                jax.ShapeDtypeStruct((splits, batch * kv_heads, common.TILE_M), jnp.float32)),
      scratch_types=(
          plgpu.SMEM((common.TILE_M, head_dim), q.dtype, transforms=transforms),
          plgpu.SMEM((stages, block_kv, head_dim), q.dtype, transforms=transforms),
          plgpu.SMEM((stages, block_kv, head_dim), q.dtype, transforms=transforms),
          plgpu.SMEM((common.TILE_M, block_kv), q.dtype, transforms=transforms),
          plgpu.SMEM((common.TILE_M, head_dim), out_dtype),
          plgpu.SMEM((common.TILE_M,), jnp.float32),
          plgpu.Barrier(),
          plgpu.Barrier(num_arrivals=block_kv // page_size, num_barriers=stages),
          plgpu.Barrier(num_arrivals=block_kv // page_size, num_barriers=stages),
      ),
      grid=(batch, kv_heads, splits),
      grid_names=("batch", "kv", "split"),
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=common.interpret_params(interpret),
  )(lengths, page_table, q_flat, k_pages, v_pages)
  if splits == 1:
    return o_split[0].reshape(batch, heads, head_dim)
  return _combine(o_split, lse_split, batch, kv_heads, group, q.dtype).reshape(batch, heads, head_dim)
