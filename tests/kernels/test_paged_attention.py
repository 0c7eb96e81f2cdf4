"""Paged decode and prefill attention kernels against their float32 references, on fresh random inputs.

On the CPU the kernels run in Mosaic GPU interpret mode; with JAX_PLATFORMS=cuda on a Hopper GPU the same tests run
the compiled kernels. Unused page-table entries hold out-of-range ids, so a kernel that reads them fails.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rand
from pallas_kernels import attention as pa

INTERPRET = jax.default_backend() != "gpu"
BAD_PAGE = 1 << 20  # an id past every pool in these tests


def assert_close(out, ref, dtype, what):
  """Relative-norm and elementwise checks; tolerances by the output dtype (bf16: 8 mantissa bits, f16: 11)."""
  out = np.asarray(jnp.asarray(out, jnp.float32))
  ref = np.asarray(ref, np.float32)
  assert np.all(np.isfinite(out)), f"{what}: non-finite output"
  rel = {jnp.dtype(jnp.bfloat16): 2e-2, jnp.dtype(jnp.float16): 3e-3}[jnp.dtype(dtype)]
  err = np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-6)
  assert err < rel, f"{what}: relative error {err:.3g} >= {rel}"
  np.testing.assert_allclose(out, ref, rtol=2 * rel, atol=2 * rel * np.abs(ref).max(), err_msg=what)


def _pool(key, kv_heads, num_pages, page_size, head_dim, dtype):
  kk, kv = jax.random.split(key)
  return (rand(kk, (kv_heads, num_pages, page_size, head_dim), dtype),
          rand(kv, (kv_heads, num_pages, page_size, head_dim), dtype))


def _page_table(rng, used_pages, max_pages, num_pages):
  """Distinct random pages per row for its first used_pages[b] entries; BAD_PAGE after them."""
  table = np.full((len(used_pages), max_pages), BAD_PAGE, np.int32)
  perm = rng.permutation(num_pages)
  at = 0
  for b, n in enumerate(used_pages):
    table[b, :n] = perm[at:at + n]
    at += n
  return jnp.asarray(table)


def _decode_case(seed, lengths, *, heads, kv_heads, head_dim, page_size=16, max_pages=8, dtype=jnp.bfloat16):
  rng = np.random.default_rng(seed)
  used = [-(-n // page_size) for n in lengths]
  num_pages = sum(used) + 3
  key = jax.random.key(seed)
  k_pages, v_pages = _pool(key, kv_heads, num_pages, page_size, head_dim, dtype)
  q = rand(jax.random.fold_in(key, 1), (len(lengths), heads, head_dim), dtype)
  table = _page_table(rng, used, max_pages, num_pages)
  return q, k_pages, v_pages, jnp.asarray(lengths, jnp.int32), table


def _check_decode(case, dtype=jnp.bfloat16, **kw):
  q, k_pages, v_pages, lengths, table = case
  out = pa.paged_decode_attention(q, k_pages, v_pages, lengths, table, interpret=INTERPRET, **kw)
  ref_kw = {k: v for k, v in kw.items() if k in ("sm_scale", "sliding_window")}
  ref = pa.ref_paged_decode_attention(q, k_pages, v_pages, lengths, jnp.where(table == BAD_PAGE, 0, table),
                                      **ref_kw)
  assert out.shape == q.shape and out.dtype == q.dtype
  assert_close(out, ref, dtype, f"decode {kw}")
  pad = np.asarray(lengths) == 0
  np.testing.assert_array_equal(np.asarray(out, np.float32)[pad], 0.0)
  return out


# Lengths 1, one page exactly, a ragged tail, a padding row, and a full table (2 blocks of 64 keys).
# Split-K: 2 splits in the GQA tests and f16 (default), 3 with the window (some splits then hold no key).
LENGTHS = [1, 16, 37, 0, 128]


def test_decode_lengths_one_split():
  case = _decode_case(0, LENGTHS, heads=8, kv_heads=2, head_dim=64)
  _check_decode(case, k_splits=1)


@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (8, 1)])
def test_decode_gqa_ratios_head_dim_128(heads, kv_heads):
  case = _decode_case(1, [70, 3], heads=heads, kv_heads=kv_heads, head_dim=128)
  _check_decode(case, k_splits=2)


def test_decode_sliding_window_and_scale():
  case = _decode_case(2, [5, 50, 128], heads=4, kv_heads=1, head_dim=64)
  _check_decode(case, sliding_window=20, sm_scale=0.3, k_splits=3)


def test_decode_f16_page_size_8():
  case = _decode_case(3, [9, 64, 0], heads=4, kv_heads=2, head_dim=64, page_size=8, max_pages=12,
                      dtype=jnp.float16)
  _check_decode(case, dtype=jnp.float16)


def test_decode_splits_fill_the_chip():
  assert pa.decode_splits(64, 8, 8) == 1
  assert pa.decode_splits(1, 8, 128) == 33
  assert pa.decode_splits(1, 8, 4) == 4


def test_decode_validation_names_the_argument():
  q, k_pages, v_pages, lengths, table = _decode_case(4, [3], heads=4, kv_heads=1, head_dim=64)
  with pytest.raises(ValueError, match="lengths"):
    pa.paged_decode_attention(q, k_pages, v_pages, lengths.astype(jnp.float32), table)
  with pytest.raises(ValueError, match="kv heads"):
    three = (jnp.concatenate([k_pages] * 3), jnp.concatenate([v_pages] * 3))
    pa.paged_decode_attention(q, *three, lengths, table)
  with pytest.raises(ValueError, match="head_dim"):
    pa.paged_decode_attention(q[..., :32], k_pages[..., :32], v_pages[..., :32], lengths, table)
  with pytest.raises(ValueError, match="block_kv"):
    pa.paged_decode_attention(q, k_pages, v_pages, lengths, table, block_kv=48)
  with pytest.raises(ValueError, match="bf16 or f16"):
    pa.paged_decode_attention(q.astype(jnp.float32), k_pages, v_pages, lengths, table)


def _prefill_case(seed, chunks, *, heads, kv_heads, head_dim, tokens, page_size=16, dtype=jnp.bfloat16):
  """chunks[b] = (cached, new): row b's chunk holds positions [cached, cached + new), then padding (-1) up to
  `tokens`; its keys/values (cached and new) are in the pages already."""
  rng = np.random.default_rng(seed)
  used = [-(-(c + n) // page_size) for c, n in chunks]
  num_pages = sum(used) + 2
  key = jax.random.key(seed)
  k_pages, v_pages = _pool(key, kv_heads, num_pages, page_size, head_dim, dtype)
  q = rand(jax.random.fold_in(key, 1), (len(chunks), tokens, heads, head_dim), dtype)
  positions = np.full((len(chunks), tokens), -1, np.int32)
  for b, (c, n) in enumerate(chunks):
    positions[b, :n] = np.arange(c, c + n)
  table = _page_table(rng, used, max(used) + 1, num_pages)
  return q, k_pages, v_pages, jnp.asarray(positions), table


def _check_prefill(case, dtype=jnp.bfloat16, **kw):
  q, k_pages, v_pages, positions, table = case
  out = pa.paged_prefill_attention(q, k_pages, v_pages, positions, table, interpret=INTERPRET, **kw)
  ref_kw = {k: v for k, v in kw.items() if k in ("sm_scale", "sliding_window")}
  ref = pa.ref_paged_prefill_attention(q, k_pages, v_pages, positions, jnp.where(table == BAD_PAGE, 0, table),
                                       **ref_kw)
  assert out.shape == q.shape and out.dtype == q.dtype
  assert_close(out, ref, dtype, f"prefill {kw}")
  pad = np.asarray(positions) < 0
  np.testing.assert_array_equal(np.asarray(out, np.float32)[pad], 0.0)


def test_prefill_chunk_over_cached_pages_and_padding():
  # Row 0: a chunk after 70 cached keys (keys span 2 blocks); row 1: a fresh prompt of 13, then padding;
  # row 2: only padding. Two tiles of 16 tokens (G = 4).
  case = _prefill_case(5, [(70, 20), (0, 13), (0, 0)], heads=8, kv_heads=2, head_dim=64, tokens=20)
  _check_prefill(case)


def test_prefill_mha_head_dim_128_sliding_window():
  case = _prefill_case(6, [(40, 24), (0, 30)], heads=2, kv_heads=2, head_dim=128, tokens=30)
  _check_prefill(case, sliding_window=17, sm_scale=0.2)


def test_prefill_gqa_8_f16_page_size_8():
  case = _prefill_case(7, [(5, 9)], heads=8, kv_heads=1, head_dim=64, tokens=9, page_size=8, dtype=jnp.float16)
  _check_prefill(case, dtype=jnp.float16)


def test_prefill_block_metadata():
  positions = jnp.asarray([[70, 71, 72, 73], [-1, -1, -1, -1], [0, 1, -1, -1]], jnp.int32)
  meta = pa.prefill_block_metadata(positions, 2, 64, 16, None)
  np.testing.assert_array_equal(meta.first_block, [[0, 0], [0, 0], [0, 0]])
  np.testing.assert_array_equal(meta.num_blocks, [[2, 2], [0, 0], [1, 0]])
  np.testing.assert_array_equal(meta.last_page, [[4, 4], [0, 0], [0, 0]])
  windowed = pa.prefill_block_metadata(positions, 2, 64, 16, 8)  # tile 0 sees keys 63..71: blocks 0 and 1
  np.testing.assert_array_equal(windowed.first_block, [[0, 1], [0, 0], [0, 0]])
  np.testing.assert_array_equal(windowed.num_blocks, [[2, 1], [0, 0], [1, 0]])
