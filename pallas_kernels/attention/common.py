"""Shared pieces of the paged attention kernels: block sizes, the split choice, validation, smem layouts."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

TILE_M = 64          # wgmma's fixed M: rows of one query tile
NUM_SMS = 132        # H100 / H200 SXM
PROGRAMS_PER_SM = 2  # decode programs that fill the chip: enough TMA bytes in flight per SM
_DTYPES = (jnp.bfloat16, jnp.float16)
_HEAD_DIMS = (64, 128)


@dataclasses.dataclass(frozen=True)
class Blocks:
  """Keys per pipeline step (a multiple of 64 and of the page size) and the depth of the TMA ring."""
  block_kv: int
  stages: int


DECODE_BLOCKS = Blocks(block_kv=64, stages=2)  # H200: ~104 KiB of smem, two programs per SM
PREFILL_BLOCKS = Blocks(block_kv=64, stages=2)


def decode_splits(batch: int, kv_heads: int, max_blocks: int) -> int:
  """Splits of each row's keys so that batch * kv_heads * splits programs fill the SMs, at most one per block."""
  programs = batch * kv_heads
  want = -(-NUM_SMS * PROGRAMS_PER_SM // programs)
  return int(max(1, min(want, max_blocks)))


def pad_rows(x: jax.Array) -> jax.Array:
  """[R, H] -> [R', H], zero rows appended (none when R >= 64 and R % 8 == 0) so that every query tile of 64 rows
  can start at a multiple of 8 inside it."""
  rows = x.shape[0]
  want = max(TILE_M, -(-rows // 8) * 8)
  return x if want == rows else jnp.pad(x, ((0, want - rows), (0, 0)))


def tile_row_offset(first_row, num_rows: int):
  """Row of query row `first_row` (a program's first head) inside its 64-row tile of a [num_rows, H] q: the tile
  starts at the multiple of 8 at or before it, clamped to the last full tile of the padded rows."""
  padded = max(TILE_M, -(-num_rows // 8) * 8)
  return first_row - np.minimum(first_row // 8 * 8, padded - TILE_M)


def tile_offsets(num_rows: int, group: int) -> tuple[int, ...]:
  """The distinct tile_row_offset values of the programs (first rows 0, group, 2 * group, ...), static."""
  return tuple(sorted({int(r) for r in tile_row_offset(np.arange(0, num_rows, group), num_rows)}))


def copy_pages(pt_ref, row, first_page, last_page, kv, pages, smem, barriers, slot, page_size, num_pages) -> None:
  """Issues TMA copies of `num_pages` consecutive table entries of row `row`, from entry `first_page` on, of kv head
  `kv`: pages[kv, page_table[row, min(first_page + j, last_page)]] -> smem[slot, j * page_size:...], each arriving on
  barriers[slot] (built with num_arrivals = num_pages per pool). `pages`/`smem`/`barriers` are tuples (k, v or one
  of them). Entries past last_page are never read: their slots get the last page again (finite, masked later)."""
  for j in range(num_pages):
    page = pt_ref[row, jax.numpy.minimum(first_page + j, last_page)]
    rows = pl.ds(j * page_size, page_size)
    for src, dst, bar in zip(pages, smem, barriers):
      plgpu.copy_gmem_to_smem(src.at[kv, page], dst.at[slot, rows], bar.at[slot])


def smem_transforms(dtype) -> tuple:
  """Tiling and 128-byte swizzle of a wgmma operand in shared memory."""
  return (plgpu.TilingTransform((8, 128 // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(128))


def interpret_params(interpret: bool):
  return plgpu.InterpretGPUParams() if interpret else None


def validate_blocks(block_kv: int, page_size: int, stages: int) -> None:
  if block_kv % 64 or block_kv % page_size or block_kv > 256:
    raise ValueError(f"block_kv must be a multiple of 64 and of page_size ({page_size}), at most 256; "
                     f"got {block_kv}")
  if stages < 1:
    raise ValueError(f"stages must be >= 1, got {stages}")


def supports(num_heads: int, num_kv_heads: int, head_dim: int, page_size: int, dtype) -> bool:
  """Whether both kernels (decode and prefill) take these shapes: the checks `validate_decode` and
  `validate_prefill` make, plus prefill's query heads per kv head dividing the 64-row tile."""
  group = num_heads // num_kv_heads
  return (any(jnp.dtype(dtype) == d for d in _DTYPES) and head_dim in _HEAD_DIMS and page_size % 8 == 0
          and TILE_M % group == 0)


def _validate_pages(q, k_pages, v_pages, page_table, sliding_window, q_heads_axis):
  heads, head_dim = q.shape[q_heads_axis], q.shape[-1]
  if k_pages.ndim != 4:
    raise ValueError(f"k_pages must be [K, P, page_size, H], got shape {k_pages.shape}")
  if v_pages.shape != k_pages.shape:
    raise ValueError(f"v_pages shape {v_pages.shape} must equal k_pages shape {k_pages.shape}")
  kv_heads, _, page_size, kv_dim = k_pages.shape
  if kv_dim != head_dim:
    raise ValueError(f"k_pages head_dim {kv_dim} must equal q's {head_dim}")
  if head_dim not in _HEAD_DIMS:
    raise ValueError(f"head_dim must be one of {_HEAD_DIMS}, got {head_dim}")
  if heads % kv_heads:
    raise ValueError(f"q's {heads} heads must be a multiple of k_pages' {kv_heads} kv heads")
  group = heads // kv_heads
  if group > TILE_M or (group % 8 and group > TILE_M - 8):
    raise ValueError(f"query heads per kv head must be a multiple of 8 up to {TILE_M}, or at most {TILE_M - 8}; "
                     f"got {group}")
  if page_size % 8:
    raise ValueError(f"page_size must be a multiple of 8, got {page_size}")
  if not any(q.dtype == d for d in _DTYPES):
    raise ValueError(f"q must be bf16 or f16, got {q.dtype}")
  if k_pages.dtype != q.dtype or v_pages.dtype != q.dtype:
    raise ValueError(f"k_pages/v_pages dtype ({k_pages.dtype}, {v_pages.dtype}) must equal q's {q.dtype}")
  if page_table.ndim != 2 or page_table.shape[0] != q.shape[0] or page_table.dtype != jnp.int32:
    raise ValueError(f"page_table must be [B={q.shape[0]}, M] int32, got {page_table.shape} {page_table.dtype}")
  if sliding_window is not None and sliding_window < 1:
    raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")


def validate_decode(q: jax.Array, k_pages, v_pages, lengths, page_table, sliding_window) -> None:
  if q.ndim != 3:
    raise ValueError(f"q must be [B, N, H], got shape {q.shape}")
  _validate_pages(q, k_pages, v_pages, page_table, sliding_window, 1)
  if lengths.shape != (q.shape[0],) or lengths.dtype != jnp.int32:
    raise ValueError(f"lengths must be [B={q.shape[0]}] int32, got {lengths.shape} {lengths.dtype}")


def validate_prefill(q: jax.Array, k_pages, v_pages, positions, page_table, sliding_window) -> None:
  if q.ndim != 4:
    raise ValueError(f"q must be [B, T, N, H], got shape {q.shape}")
  _validate_pages(q, k_pages, v_pages, page_table, sliding_window, 2)
  if positions.shape != q.shape[:2] or positions.dtype != jnp.int32:
    raise ValueError(f"positions must be [B, T]={q.shape[:2]} int32, got {positions.shape} {positions.dtype}")
