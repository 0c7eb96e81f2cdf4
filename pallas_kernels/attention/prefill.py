"""Paged prefill (chunked-prompt) attention on Pallas Mosaic GPU: causal over a chunk's queries and the cached pages.

The queries of one kv head are laid out as rows t * G + g (token t, head g of the G = N // K sharing it), padded to
tiles of 64 rows (64 / G tokens). One program per (row b, kv head k, query tile): it walks only the key blocks that
some query of the tile can see (`prefill_block_metadata`: from the tile's lowest first visible key to its highest
position), each block `block_kv // page_size` pages TMA'd in place into a shared-memory ring, with scores and P @ V
on wgmma and an online softmax. Memory is O(T): nothing of size T x S is ever formed.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.attention import common

_LOG2E = math.log2(math.e)
_NEG = -1e30  # running max of a row that has seen no key yet: finite, so exp2(m_old - m_new) never meets inf - inf


class BlockMetadata(NamedTuple):
  """Per (row b, query tile): the key blocks its queries see, and the last page any of them reads.

  first_block [B, Q], num_blocks [B, Q], last_page [B, Q] int32; num_blocks is 0 for a tile of padding queries.
  """
  first_block: jax.Array
  num_blocks: jax.Array
  last_page: jax.Array


def prefill_block_metadata(positions: jax.Array, tile_tokens: int, block_kv: int, page_size: int,
                           sliding_window: int | None) -> BlockMetadata:
  """Pure jnp, jit-safe. positions [B, Tp] int32 (Tp a multiple of tile_tokens; < 0 = padding).

  1. A tile's queries see keys [max(0, p - window + 1), p] for each valid position p in it.
  2. first_block = (lowest such start) // block_kv; the last block holds the tile's highest position.
  3. A tile with no valid query gets num_blocks = 0 and reads nothing.
  """
  b, tp = positions.shape
  pos = positions.reshape(b, tp // tile_tokens, tile_tokens)
  valid = pos >= 0
  hi = jnp.max(jnp.where(valid, pos, -1), axis=-1)
  first_key = jnp.zeros_like(pos) if sliding_window is None else jnp.maximum(pos - sliding_window + 1, 0)
  lo = jnp.min(jnp.where(valid, first_key, jnp.iinfo(jnp.int32).max), axis=-1)
  any_valid = hi >= 0
  first = jnp.where(any_valid, lo // block_kv, 0)
  num = jnp.where(any_valid, hi // block_kv - first + 1, 0)
  return BlockMetadata(first.astype(jnp.int32), num.astype(jnp.int32),
                       jnp.where(any_valid, hi // page_size, 0).astype(jnp.int32))


def _prefill_kernel(first_ref, num_ref, last_ref, pt_ref, pos_ref, q_ref, k_ref, v_ref, o_ref, q_smem, k_smem,
                    v_smem, p_smem, pos_smem, q_bar, k_bar, v_bar, *, kv_heads, page_size, block_kv, stages,
                    scale_log2, window, dtype):
  b = lax.axis_index("batch")
  kv = lax.axis_index("kv")
  qt = lax.axis_index("tile")
  tiles = first_ref.shape[1]
  pages_per_block = block_kv // page_size
  first_block = first_ref[b, qt]
  num_blocks = num_ref[b, qt]
  last_page = last_ref[b, qt]

  def issue(i, slot, which):
    first_page = (first_block + i) * pages_per_block
    common.copy_pages(pt_ref, b, first_page, last_page, kv, (k_ref, v_ref)[which], (k_smem, v_smem)[which],
                      (k_bar, v_bar)[which], slot, page_size, pages_per_block)

  for st in range(stages):
    pl.when(st < num_blocks)(functools.partial(issue, st, st, slice(0, 2)))

  row0 = pl.multiple_of(((b * kv_heads + kv) * tiles + qt) * common.TILE_M, common.TILE_M)
  plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(row0, common.TILE_M)], q_smem, q_bar)
  plgpu.copy_gmem_to_smem(pos_ref.at[b, pl.ds(pl.multiple_of(qt * common.TILE_M, common.TILE_M), common.TILE_M)],
                          pos_smem, q_bar)
  plgpu.barrier_wait(q_bar)

  row_layout = plgpu.Layout.WGMMA.reduce(1)
  qpos = plgpu.load(pos_smem, layout=row_layout)
  m_i = plgpu.layout_cast(jnp.full((common.TILE_M,), _NEG, jnp.float32), row_layout)
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
    pl.when(refill)(functools.partial(issue, i + stages, slot, slice(0, 1)))
    kpos = (first_block + i) * block_kv + plgpu.broadcasted_iota(jnp.int32, qk.shape, 1,
                                                                 layout=plgpu.Layout.WGMMA)
    row_pos = lax.broadcast_in_dim(qpos, qk.shape, [0])
    visible = kpos <= row_pos  # padding rows (< 0) see nothing
    if window is not None:
      visible = visible & (kpos > row_pos - window)
    qk = jnp.where(visible, qk, -jnp.inf)
    m_new = jnp.maximum(m_i, qk.max(axis=1))
    alpha = jnp.exp2(m_i - m_new)
    p = jnp.exp2(qk - lax.broadcast_in_dim(m_new, qk.shape, [0]))
    l_i = l_i * alpha + p.sum(axis=1)
    p_smem[...] = p.astype(dtype)
    plgpu.commit_smem()
    plgpu.barrier_wait(v_bar.at[slot])

    def weighted(acc_ref):
      plgpu.wgmma(acc_ref, p_smem, v_smem.at[slot])
      return acc_ref[...]

    pv = pl.run_scoped(weighted, plgpu.ACC(acc.shape, jnp.float32))
    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv
    pl.when(refill)(functools.partial(issue, i + stages, slot, slice(1, 2)))
    return acc, m_new, l_i

  acc, m_i, l_i = lax.fori_loop(0, num_blocks, body, (acc, m_i, l_i))
  inv = 1.0 / jnp.where(l_i > 0.0, l_i, 1.0)  # rows that saw no key (padding) stay 0
  q_smem[...] = (acc * lax.broadcast_in_dim(inv, acc.shape, [0])).astype(q_smem.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(q_smem, o_ref.at[pl.ds(row0, common.TILE_M)])
  plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "block_kv", "stages", "interpret"))
def paged_prefill_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, positions: jax.Array,
                            page_table: jax.Array, *, sm_scale: float | None = None,
                            sliding_window: int | None = None, block_kv: int | None = None,
                            stages: int | None = None, interpret: bool = False) -> jax.Array:
  """Paged causal prefill attention (Mosaic GPU); the chunk's keys/values are already in the pages.

  Semantics: out[b, t, n] = softmax_j(q[b, t, n] . k[b, j] * sm_scale) @ v[b, j] over key positions j in
  [max(0, p - sliding_window + 1), p], p = positions[b, t], key j of row b at
  k_pages[n // (N // K), page_table[b, j // page_size], j % page_size]. Queries with p < 0 are padding: 0.

  Args:
    q: [B, T, N, H] bf16 or f16; H in {64, 128}; N // K divides 64.
    k_pages, v_pages: [K, P, page_size, H], q's dtype; page_size a multiple of 8 dividing block_kv.
    positions: [B, T] int32 absolute positions (< 0: padding).
    page_table: [B, M] int32; the entries up to page max(positions[b]) // page_size must be valid.
    sm_scale: score scale; None means H ** -0.5.
    sliding_window: keys more than sliding_window - 1 before the query are dropped; None keeps all.
    block_kv, stages: keys per pipeline step and ring depth (None: `common.PREFILL_BLOCKS`).
    interpret: run in Mosaic GPU interpret mode (CPU tests).
  Returns:
    [B, T, N, H] in q.dtype.
  """
  common.validate_prefill(q, k_pages, v_pages, positions, page_table, sliding_window)
  batch, tokens, heads, head_dim = q.shape
  kv_heads, _, page_size, _ = k_pages.shape
  group = heads // kv_heads
  if common.TILE_M % group:
    raise ValueError(f"query heads per kv head ({group}) must divide {common.TILE_M} for prefill")
  blocks = common.PREFILL_BLOCKS
  block_kv = block_kv or blocks.block_kv
  stages = stages or blocks.stages
  common.validate_blocks(block_kv, page_size, stages)
  tile_tokens = common.TILE_M // group
  padded = -(-tokens // tile_tokens) * tile_tokens
  tiles = padded // tile_tokens
  scale = head_dim ** -0.5 if sm_scale is None else sm_scale

  pos = jnp.pad(positions, ((0, 0), (0, padded - tokens)), constant_values=-1)
  meta = prefill_block_metadata(pos, tile_tokens, block_kv, page_size, sliding_window)
  pos_rows = jnp.repeat(pos, group, axis=1)  # [B, Tp * G]: row t * G + g holds token t's position
  # q rows of (b, k): t * G + g -> [B * K * Tp * G, H]
  q_rows = jnp.pad(q, ((0, 0), (0, padded - tokens), (0, 0), (0, 0))).reshape(batch, padded, kv_heads, group,
                                                                              head_dim)
  q_rows = q_rows.transpose(0, 2, 1, 3, 4).reshape(batch * kv_heads * padded * group, head_dim)
  kernel = functools.partial(
      _prefill_kernel, kv_heads=kv_heads, page_size=page_size, block_kv=block_kv, stages=stages,
      scale_log2=scale * _LOG2E, window=sliding_window, dtype=q.dtype)
  transforms = common.smem_transforms(q.dtype)
  out = plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct(q_rows.shape, q.dtype),
      scratch_types=(
          plgpu.SMEM((common.TILE_M, head_dim), q.dtype, transforms=transforms),
          plgpu.SMEM((stages, block_kv, head_dim), q.dtype, transforms=transforms),
          plgpu.SMEM((stages, block_kv, head_dim), q.dtype, transforms=transforms),
          plgpu.SMEM((common.TILE_M, block_kv), q.dtype, transforms=transforms),
          plgpu.SMEM((common.TILE_M,), jnp.int32),
          plgpu.Barrier(num_arrivals=2),
          plgpu.Barrier(num_arrivals=block_kv // page_size, num_barriers=stages),
          plgpu.Barrier(num_arrivals=block_kv // page_size, num_barriers=stages),
      ),
      grid=(batch, kv_heads, tiles),
      grid_names=("batch", "kv", "tile"),
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=common.interpret_params(interpret),
  )(meta.first_block, meta.num_blocks, meta.last_page, page_table, pos_rows, q_rows, k_pages, v_pages)
  out = out.reshape(batch, kv_heads, padded, group, head_dim).transpose(0, 2, 1, 3, 4)
  return out[:, :tokens].reshape(batch, tokens, heads, head_dim)
