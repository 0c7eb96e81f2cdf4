"""Attention over a KV cache, contiguous ([B, S, K, H] rows) or paged ([P, page_size, K, H] with page tables).

The XLA path here is the reference and the CPU path: paged caches are gathered into per-sequence rows,
then attended with the same masked softmax as the contiguous cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jlora.config import ModelConfig
from jlora.model import kv_cache

_NEG = -1e30


def attend_rows(q, cache_k, cache_v, positions, config: ModelConfig):
    """Causal attention of new queries over whole cache rows.

    Args:
      q: [B, T, N, H] queries; cache_k, cache_v: [B, S, K, H]; positions: [B, T] (negative: padding).
        N and K may be a tensor-parallel shard's local head counts.
    Returns:
      [B, T, N * H].
    """
    B, T, N, H = q.shape
    K = cache_k.shape[2]
    q = q.reshape(B, T, K, N // K, H)
    # Operands stay in the cache dtype (no upcast copy of the whole cache); products accumulate in fp32.
    scores = jnp.einsum("btkgh,bskh->bkgts", q, cache_k, preferred_element_type=jnp.float32)
    scores = scores * (H ** -0.5)
    key_pos = jnp.arange(cache_k.shape[1])
    qpos = positions[:, None, None, :, None]  # [B, 1, 1, T, 1]
    mask = (key_pos <= qpos) & (qpos >= 0)
    if config.sliding_window is not None:
        mask &= key_pos > qpos - config.sliding_window
    probs = jax.nn.softmax(jnp.where(mask, scores, _NEG), axis=-1)
    out = jnp.einsum("bkgts,bskh->btkgh", probs.astype(cache_v.dtype), cache_v, preferred_element_type=jnp.float32)
    return out.reshape(B, T, N * H).astype(q.dtype)


def paged_write(cache_k, cache_v, k, v, positions, page_table, layer):
    """Writes new keys/values into their pages of one layer; negative positions are dropped.

    The caches are every layer's pages and are updated in place: one scatter of the new tokens, never a copy
    of the pool (a scan that sliced and restacked the pool per layer would write all of it every step).

    Args:
      cache_k, cache_v: [L, P, page_size, K, H] pages of every layer; layer: the layer to write (traced int).
      k, v: [B, T, K, H]; positions: [B, T]; page_table: [B, max_pages] physical page of each logical page.
    """
    L, P, ps, K, H = cache_k.shape
    B, T = positions.shape
    logical = jnp.maximum(positions, 0) // ps
    page = jnp.take_along_axis(page_table, logical, axis=1)
    flat = jnp.where(positions < 0, P * ps, page * ps + positions % ps).reshape(B * T)
    ck = cache_k.reshape(L, P * ps, K, H).at[layer, flat].set(k.reshape(B * T, K, H).astype(cache_k.dtype),
                                                             mode="drop")
    cv = cache_v.reshape(L, P * ps, K, H).at[layer, flat].set(v.reshape(B * T, K, H).astype(cache_v.dtype),
                                                             mode="drop")
    return ck.reshape(cache_k.shape), cv.reshape(cache_v.shape)


def paged_rows(cache, page_table, layer):
    """One layer of [L, P, page_size, K, H] pages -> [B, max_pages * page_size, K, H] rows in logical order
    (one gather; the layer's pages are never sliced out first)."""
    rows = cache[layer, page_table]  # [B, max_pages, page_size, K, H]
    B, M, ps, K, H = rows.shape
    return rows.reshape(B, M * ps, K, H)


def attend(q, k, v, cache_k, cache_v, positions, page_table, config: ModelConfig, layer=None):
    """Writes this step's keys/values, then attends. Returns (out [B, T, N*H], cache_k, cache_v).

    With `page_table` None the cache is contiguous ([B, S, K, H], one layer's), else paged: every layer's
    pages [L, P, page_size, K, H], of which `layer` is read and written.
    """
    if page_table is None:
        cache_k, cache_v = kv_cache.write(cache_k, cache_v, k, v, positions)
        return attend_rows(q, cache_k, cache_v, positions, config), cache_k, cache_v
    cache_k, cache_v = paged_write(cache_k, cache_v, k, v, positions, page_table, layer)
    out = attend_rows(q, paged_rows(cache_k, page_table, layer), paged_rows(cache_v, page_table, layer), positions,
                      config)
    return out, cache_k, cache_v
