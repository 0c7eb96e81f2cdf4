"""KV caches: contiguous (one row of `max_len` positions per sequence) or paged (a pool of pages)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jlora.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer.

    Attributes:
      k: [L, B, S, K, H] keys (after RoPE), or [K, L, P, page_size, H] for a paged cache (kv-head major, so one
        head's pages of every layer fold into [L * P, page_size, H], the layout of JAX's paged-attention kernels).
      v: same shape as k.
    """

    k: jax.Array
    v: jax.Array

    @classmethod
    def zeros(cls, config: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> "KVCache":
        shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

    @classmethod
    def pages(cls, config: ModelConfig, num_pages: int, page_size: int, dtype=jnp.float32) -> "KVCache":
        shape = (config.num_kv_heads, config.num_layers, num_pages, page_size, config.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


def write(cache_k: jax.Array, cache_v: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array):
    """Writes one layer's new keys and values at their positions; negative positions are dropped.

    Args:
      cache_k, cache_v: [B, S, K, H].
      k, v: [B, T, K, H].
      positions: [B, T] int32.
    """
    batch, max_len = cache_k.shape[:2]
    pos = jnp.where(positions < 0, max_len, positions)  # out of range -> dropped
    rows = jnp.broadcast_to(jnp.arange(batch)[:, None], pos.shape)
    cache_k = cache_k.at[rows, pos].set(k.astype(cache_k.dtype), mode="drop")
    cache_v = cache_v.at[rows, pos].set(v.astype(cache_v.dtype), mode="drop")
    return cache_k, cache_v
