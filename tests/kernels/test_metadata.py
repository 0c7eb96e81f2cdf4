"""segment_metadata alone: hand-checked tables and invariants on drawn slot ids."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pallas_kernels import segment_metadata
from pallas_kernels.metadata import max_num_tiles


def tiles(meta):
  n = int(meta.num_tiles[0])
  return [(int(a), int(b), int(s)) for a, b, s in
          zip(meta.tile_lo[:n], meta.tile_hi[:n], meta.tile_slot[:n])]


def test_hand_checked_unaligned():
  ids = jnp.array([0, 0, 0, -1, 2, 2, 1, 1, 1, 1, 1], jnp.int32)
  meta = segment_metadata(ids, block_t=2, aligned=False)
  assert tiles(meta) == [(0, 2, 0), (2, 3, 0), (4, 6, 2), (6, 8, 1), (8, 10, 1), (10, 11, 1)]


def test_hand_checked_aligned():
  ids = jnp.array([0, 0, 0, -1, 2, 2, 1, 1, 1, 1, 1], jnp.int32)
  meta = segment_metadata(ids, block_t=4, aligned=True)
  assert tiles(meta) == [(0, 3, 0), (4, 6, 2), (6, 8, 1), (8, 11, 1)]


def test_padding_entries_are_empty_and_repeat_last_tile():
  ids = jnp.array([3, 3, -1, -1, 1], jnp.int32)
  meta = segment_metadata(ids, block_t=4, aligned=True)
  n = int(meta.num_tiles[0])
  assert n == 2
  np.testing.assert_array_equal(meta.tile_lo[n:], meta.tile_hi[n:])
  np.testing.assert_array_equal(meta.tile_lo[n:], 4)
  np.testing.assert_array_equal(meta.tile_slot[n:], 1)


@pytest.mark.parametrize("aligned", [False, True])
def test_all_minus_one_gives_no_tiles(aligned):
  meta = segment_metadata(jnp.full((9,), -1, jnp.int32), block_t=4, aligned=aligned)
  assert int(meta.num_tiles[0]) == 0
  np.testing.assert_array_equal(meta.tile_lo, meta.tile_hi)


def test_unused_slots_make_no_tiles():
  # Slots 1 and 3 of 5 have no tokens (empty segments): only used slots get tiles.
  ids = jnp.array([0, 0, 2, 4, 4, 4], jnp.int32)
  meta = segment_metadata(ids, block_t=16, aligned=False)
  assert tiles(meta) == [(0, 2, 0), (2, 3, 2), (3, 6, 4)]


def test_single_token():
  meta = segment_metadata(jnp.array([5], jnp.int32), block_t=16)
  assert tiles(meta) == [(0, 1, 5)]


def test_jit_and_static_shapes():
  f = jax.jit(lambda ids: segment_metadata(ids, block_t=8, max_segments=5))
  meta = f(jnp.array([0] * 10 + [1] * 10, jnp.int32))
  assert meta.max_tiles == max_num_tiles(20, 8, 5)
  assert tiles(meta) == [(0, 8, 0), (8, 10, 0), (10, 18, 1), (18, 20, 1)]


def test_rejects_bad_args():
  with pytest.raises(ValueError, match="slot_ids"):
    segment_metadata(jnp.zeros((2, 3), jnp.int32))
  with pytest.raises(ValueError, match="block_t"):
    segment_metadata(jnp.zeros((3,), jnp.int32), block_t=0)


_meta_jit = jax.jit(segment_metadata, static_argnames=("block_t", "aligned"))


@settings(max_examples=40, deadline=None)
@given(runs=st.lists(st.tuples(st.integers(-1, 3), st.integers(0, 9)), min_size=1, max_size=12),
       block_t=st.sampled_from([1, 2, 4, 8]), aligned=st.booleans())
def test_invariants(runs, block_t, aligned):
  # Fixed T=40 (one compile per block_t/aligned): drawn runs, 0-length ones included, cut or padded.
  ids = [s for s, n in runs for _ in range(n)][:40]
  ids = np.array(ids + [-1] * (40 - len(ids)), np.int32)
  meta = _meta_jit(jnp.asarray(ids), block_t=block_t, aligned=aligned)
  ts = tiles(meta)
  covered = np.zeros(len(ids), int)
  for lo, hi, slot in ts:
    # 1. A tile is non-empty, at most block_t long, and one slot >= 0 throughout.
    assert 0 < hi - lo <= block_t
    assert slot >= 0 and np.all(ids[lo:hi] == slot)
    # 2. Aligned tiles stay inside one row block.
    if aligned:
      assert lo // block_t == (hi - 1) // block_t
    covered[lo:hi] += 1
  # 3. Tiles cover each valid token exactly once and no -1 token.
  np.testing.assert_array_equal(covered, (ids >= 0).astype(int))
  # 4. Tiles are in token order.
  assert [t[0] for t in ts] == sorted(t[0] for t in ts)
  assert len(ts) <= meta.max_tiles
