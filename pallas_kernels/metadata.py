"""Tile tables for segmented (multi-LoRA) matmuls, computed once per model step.

A segment is a maximal run of equal slot ids. A tile is a run of at most `block_t` tokens of one segment
whose slot is not -1. Kernels walk the tile table; tokens with slot -1 belong to no tile and cost nothing.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import tuning
from pallas_kernels.backend import resolve_backend


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("tile_lo", "tile_hi", "tile_slot", "num_tiles"),
                   meta_fields=("num_tokens", "block_t", "aligned"))
@dataclasses.dataclass(frozen=True)
class SegmentMetadata:
  """Tile table for one step's slot ids.

  Tile i (for i < num_tiles) covers tokens [tile_lo[i], tile_hi[i]), all with slot tile_slot[i] >= 0.
  Entries i >= num_tiles repeat the last tile's slot and row block with tile_lo == tile_hi (empty),
  so TPU index maps fetch nothing new for them.
  """
  tile_lo: jax.Array    # [M] int32, first token of the tile
  tile_hi: jax.Array    # [M] int32, one past the last token of the tile
  tile_slot: jax.Array  # [M] int32, adapter slot of the tile (>= 0 for real tiles)
  num_tiles: jax.Array  # [1] int32, number of real tiles
  num_tokens: int       # T
  block_t: int          # most tokens per tile
  aligned: bool         # tiles never cross a multiple of block_t (TPU row blocks)

  @property
  def max_tiles(self) -> int:
    return self.tile_lo.shape[0]


def max_num_tiles(num_tokens: int, block_t: int, max_segments: int | None) -> int:
  """Static bound on the tile count: each segment adds at most one partial tile."""
  segs = num_tokens if max_segments is None else min(max_segments, num_tokens)
  return max(1, min(num_tokens, pl_cdiv(num_tokens, block_t) + segs))


def pl_cdiv(a: int, b: int) -> int:
  return -(-a // b)


def segment_metadata(slot_ids: jax.Array, *, block_t: int | None = None, aligned: bool | None = None,
                     max_segments: int | None = None, backend: str | None = None) -> SegmentMetadata:
  """Builds the tile table of `slot_ids` (pure jnp, static shapes, jit-safe).

  Semantics: tiles split every segment of slot s >= 0 into runs of at most block_t tokens; segments of
  slot -1 and empty segments produce no tile.

  Args:
    slot_ids: [T] int32 in [-1, S). Need not be sorted; sorted ids give the fewest tiles.
    block_t: tokens per tile; default from `tuning.block_t(T, backend)`.
    aligned: if True, tiles also break at multiples of block_t (needed by the Mosaic TPU and GPU kernels).
      Default: True for those backends, else False (tiles start at segment starts, so they are fuller).
    max_segments: optional static bound on the number of segments (runs), which shrinks the tables.
      Sorted ids over S slots have at most 2*S+1 runs. Default T (always safe).
    backend: as in `lora_shrink`; picks the defaults above.

  Returns:
    SegmentMetadata with tables of static length `max_num_tiles(T, block_t, max_segments)`.
  """
  if slot_ids.ndim != 1:
    raise ValueError(f"slot_ids must be 1-D [T], got shape {slot_ids.shape}")
  num_tokens = slot_ids.shape[0]
  resolved = resolve_backend(backend)
  if block_t is None:
    block_t = tuning.block_t(num_tokens, resolved)
  if aligned is None:
    aligned = resolved in ("mosaic", "interpret_mosaic", "mosaic_gpu", "interpret_mosaic_gpu")
  if block_t < 1:
    raise ValueError(f"block_t must be >= 1, got {block_t}")
  m = max_num_tiles(num_tokens, block_t, max_segments)
  ids = slot_ids.astype(jnp.int32)
  t = jnp.arange(num_tokens, dtype=jnp.int32)
  valid = ids >= 0
  # 1. A segment starts where the id changes.
  seg_start = jnp.concatenate([jnp.ones((1,), bool), ids[1:] != ids[:-1]])
  # 2. Offset of each token inside its segment (index of the last start at or before t).
  start_pos = jax.lax.cummax(jnp.where(seg_start, t, 0))
  offset = t - start_pos
  # 3. A tile starts every block_t tokens into a segment or (aligned) at segment and row-block starts.
  if aligned:
    tile_start = seg_start | (t % block_t == 0)
  else:
    tile_start = offset % block_t == 0
  tile_start = tile_start & valid
  # 4. Number the tiles; a valid token belongs to the latest tile started at or before it, which is
  #    in the same segment because every valid segment starts with a tile start.
  tile_id = jnp.cumsum(tile_start.astype(jnp.int32)) - 1
  num_tiles = jnp.sum(tile_start.astype(jnp.int32))
  sink = jnp.int32(m)  # out-of-range index: dropped by the scatters
  lo = jnp.zeros((m,), jnp.int32).at[jnp.where(tile_start, tile_id, sink)].set(t, mode="drop")
  hi = jnp.zeros((m,), jnp.int32).at[jnp.where(valid, tile_id, sink)].max(t + 1, mode="drop")
  slot = jnp.zeros((m,), jnp.int32).at[jnp.where(tile_start, tile_id, sink)].set(ids, mode="drop")
  # 5. Padding entries repeat the last real tile's row and slot, and are empty.
  i = jnp.arange(m, dtype=jnp.int32)
  last = jnp.maximum(num_tiles - 1, 0)
  pad = i >= num_tiles
  lo = jnp.where(pad, lo[last] * (num_tiles > 0), lo)
  hi = jnp.where(pad, lo, hi)
  slot = jnp.where(pad, slot[last] * (num_tiles > 0), slot)
  return SegmentMetadata(tile_lo=lo, tile_hi=hi, tile_slot=slot, num_tiles=num_tiles.reshape(1),
                         num_tokens=num_tokens, block_t=block_t, aligned=aligned)
