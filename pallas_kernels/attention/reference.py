"""Float32 references for the paged attention kernels, in plain jnp.

They gather every page of the table into a dense [B, S, K, H] view and run a masked softmax. They share no code with
the kernels, so a bug in the kernels' masking, split or page arithmetic cannot cancel out in the tests.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _gather_dense(pages: jax.Array, page_table: jax.Array) -> jax.Array:
  """[K, P, page_size, H] pages, [B, M] table -> [B, M * page_size, K, H] float32."""
  g = pages[:, page_table]  # [K, B, M, ps, H]
  k, b, m, ps, h = g.shape
  return jnp.transpose(g.reshape(k, b, m * ps, h), (1, 2, 0, 3)).astype(jnp.float32)


def ref_paged_decode_attention(q, k_pages, v_pages, lengths, page_table, *, sm_scale=None, sliding_window=None):
  """Semantics: out[b, n] = softmax_j(q[b, n] . k[b, j] * sm_scale) @ v[b, j] over positions j in
  [max(0, lengths[b] - sliding_window), lengths[b]), with key j of row b at
  pages[n // (N // K), page_table[b, j // page_size], j % page_size]. Rows with lengths[b] == 0 are 0.

  Args:
    q: [B, N, H]. k_pages, v_pages: [K, P, page_size, H]. lengths: [B] int32. page_table: [B, M] int32.
  Returns:
    [B, N, H] float32.
  """
  b, n, h = q.shape
  kv_heads = k_pages.shape[0]
  scale = h ** -0.5 if sm_scale is None else sm_scale
  keys = _gather_dense(k_pages, page_table)    # [B, S, K, H]
  values = _gather_dense(v_pages, page_table)
  qg = q.astype(jnp.float32).reshape(b, kv_heads, n // kv_heads, h)
  s = jnp.einsum("bkgh,bskh->bkgs", qg, keys, precision="highest") * scale
  pos = jnp.arange(keys.shape[1])[None, :]
  valid = pos < lengths[:, None]
  if sliding_window is not None:
    valid &= pos >= lengths[:, None] - sliding_window
  s = jnp.where(valid[:, None, None, :], s, -jnp.inf)
  p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
  p = jnp.where(valid[:, None, None, :], p, 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  out = jnp.einsum("bkgs,bskh->bkgh", p, values, precision="highest") / jnp.where(denom > 0, denom, 1.0)
  return out.reshape(b, n, h)


def ref_paged_prefill_attention(q, k_pages, v_pages, positions, page_table, *, sm_scale=None, sliding_window=None):
  """Semantics: out[b, t, n] = softmax_j(q[b, t, n] . k[b, j] * sm_scale) @ v[b, j] over key positions j in
  [max(0, p - sliding_window + 1), p] with p = positions[b, t]; queries with p < 0 are 0. Keys are read from the
  pages as in `ref_paged_decode_attention`.

  Args:
    q: [B, T, N, H]. k_pages, v_pages: [K, P, page_size, H]. positions: [B, T] int32. page_table: [B, M] int32.
  Returns:
    [B, T, N, H] float32.
  """
  b, t, n, h = q.shape
  kv_heads = k_pages.shape[0]
  scale = h ** -0.5 if sm_scale is None else sm_scale
  keys = _gather_dense(k_pages, page_table)
  values = _gather_dense(v_pages, page_table)
  qg = q.astype(jnp.float32).reshape(b, t, kv_heads, n // kv_heads, h)
  s = jnp.einsum("btkgh,bskh->btkgs", qg, keys, precision="highest") * scale
  key_pos = jnp.arange(keys.shape[1])[None, None, :]
  qpos = positions[:, :, None]
  valid = (key_pos <= qpos) & (qpos >= 0)
  if sliding_window is not None:
    valid &= key_pos > qpos - sliding_window
  valid = valid[:, :, None, None, :]
  s = jnp.where(valid, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.where(valid, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  out = jnp.einsum("btkgs,bskh->btkgh", p, values, precision="highest") / jnp.where(denom > 0, denom, 1.0)
  return out.reshape(b, t, n, h)
