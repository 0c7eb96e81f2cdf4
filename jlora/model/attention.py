"""Attention over a KV cache, contiguous ([B, S, K, H] rows) or paged ([K, L, P, page_size, H] with page tables).

The XLA path here is the reference and the CPU path: paged caches are gathered into per-sequence rows,
then attended with the same masked softmax as the contiguous cache. On a GPU, paged steps run jlora's Mosaic GPU
kernels (`pallas_kernels.attention`) or, as a fallback, JAX's deprecated Triton paged decode (`paged_backend`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jlora.config import ModelConfig, RuntimeConfig
from jlora.model import blocks, kv_cache

_NEG = -1e30


def attend_rows(q, cache_k, cache_v, positions, config: ModelConfig, sliding=None):
    """Causal attention of new queries over whole cache rows.

    Semantics: softmax_j(cap(q . k_j * scale) masked) @ v, with scale `config.attn_scale`, cap the attention
    soft-cap (if any), and keys j <= the query's position, inside `config.sliding_window` when this layer slides.

    Args:
      q: [B, T, N, H] queries; cache_k, cache_v: [B, S, K, H]; positions: [B, T] (negative: padding).
        N and K may be a tensor-parallel shard's local head counts.
      sliding: bool scalar (may be traced): whether this layer uses the window (`config.sliding_layers`); None
        when every layer does.
    Returns:
      [B, T, N * H].
    """
    B, T, N, H = q.shape
    K = cache_k.shape[2]
    q = q.reshape(B, T, K, N // K, H)
    # Operands stay in the cache dtype (no upcast copy of the whole cache); products accumulate in fp32.
    scores = jnp.einsum("btkgh,bskh->bkgts", q, cache_k, preferred_element_type=jnp.float32)
    scores = scores * (H ** -0.5 if config.query_pre_attn_scalar is None else config.attn_scale)
    scores = blocks.soft_cap(scores, config.attn_logit_softcap)
    key_pos = jnp.arange(cache_k.shape[1])
    qpos = positions[:, None, None, :, None]  # [B, 1, 1, T, 1]
    mask = (key_pos <= qpos) & (qpos >= 0)
    if config.sliding_window is not None:
        window = key_pos > qpos - config.sliding_window
        mask &= window if sliding is None else window | ~sliding
    probs = jax.nn.softmax(jnp.where(mask, scores, _NEG), axis=-1)
    out = jnp.einsum("bkgts,bskh->btkgh", probs.astype(cache_v.dtype), cache_v, preferred_element_type=jnp.float32)
    return out.reshape(B, T, N * H).astype(q.dtype)


def paged_write(cache_k, cache_v, k, v, positions, page_table, layer):
    """Writes new keys/values into their pages of one layer; negative positions are dropped.

    The caches are every layer's pages and are updated in place: one scatter of the new tokens, never a copy
    of the pool (a scan that sliced and restacked the pool per layer would write all of it every step).

    Args:
      cache_k, cache_v: [K, L, P, page_size, H] pages of every layer; layer: the layer to write (traced int).
      k, v: [B, T, K, H]; positions: [B, T]; page_table: [B, max_pages] physical page of each logical page.
    """
    K, L, P, ps, H = cache_k.shape
    B, T = positions.shape
    logical = jnp.maximum(positions, 0) // ps
    page = jnp.take_along_axis(page_table, logical, axis=1)
    flat = jnp.where(positions < 0, P * ps, page * ps + positions % ps).reshape(B * T)

    def put(cache, new):
        new = jnp.swapaxes(new.reshape(B * T, K, H), 0, 1).astype(cache.dtype)  # [K, B*T, H]
        return cache.reshape(K, L, P * ps, H).at[:, layer, flat].set(new, mode="drop").reshape(cache.shape)

    return put(cache_k, k), put(cache_v, v)


def paged_rows(cache, page_table, layer):
    """One layer of [K, L, P, page_size, H] pages -> [B, max_pages * page_size, K, H] rows in logical order
    (one gather; the layer's pages are never sliced out first)."""
    rows = cache[:, layer, page_table]  # [K, B, max_pages, page_size, H]
    K, B, M, ps, H = rows.shape
    return jnp.moveaxis(rows, 0, -2).reshape(B, M * ps, K, H)


_MOSAIC = ("mosaic", "interpret_mosaic")
_TRITON = ("pallas", "interpret")


def paged_backend(config: ModelConfig, num_tokens: int, runtime: RuntimeConfig, *, num_heads: int | None = None,
                  num_kv_heads: int | None = None, page_size: int = 16, dtype=jnp.bfloat16) -> str:
    """The kernel that attends a paged step of `num_tokens` queries per row: `runtime.attention` (resolved by
    platform) where that kernel takes the step, else "xla".

    The Mosaic kernels take decode and prefill steps of the shapes `pallas_kernels.attention.supports` allows; JAX's deprecated Pallas
    Triton kernel only decode steps (one query per row) without a sliding window. Neither soft-caps scores, and
    both take one static window for every layer: soft-capped or per-layer-sliding models (Gemma 2) run on XLA.
    Head counts default to the config's (a tensor-parallel shard passes its local ones).
    """
    choice = runtime.resolved().attention
    if config.attn_logit_softcap is not None or config.sliding_layers is not None:
        return "xla"
    heads, kv_heads = num_heads or config.num_heads, num_kv_heads or config.num_kv_heads
    if choice in _MOSAIC:
        from pallas_kernels import attention as kernels
        return choice if kernels.supports(heads, kv_heads, config.head_dim, page_size, dtype) else "xla"
    if choice in _TRITON:
        return choice if num_tokens == 1 and config.sliding_window is None else "xla"
    return "xla"


def decode_partitions(batch: int, kv_heads: int, max_pages: int, programs: int) -> tuple[int, int]:
    """(k_splits, pages per compute block) for JAX's paged-attention kernel.

    Each (row, kv head) program walks its row's pages; splitting the pages into partitions adds programs (and a
    combining pass) for small batches, until there are `programs` (`RuntimeConfig.decode_attention_programs`).
    Large batches need no split, and then a program reads up to 8 pages per block instead of one page at a time,
    as a fixed 16-way split did for short page tables.
    """
    k_splits = 1
    while (k_splits < 16 and batch * kv_heads * k_splits < programs
           and max_pages % (2 * k_splits) == 0):
        k_splits *= 2
    return k_splits, math.gcd(max_pages // k_splits, 8)


def paged_decode(q, cache_k, cache_v, positions, page_table, layer, *, programs: int, interpret: bool = False,
                 scale: float | None = None):
    """One query per row over paged K/V with JAX's Pallas GPU kernel, reading the pool in place.

    The pool [K, L, P, page_size, H] folds (for free) into [K, L * P, page_size, H]: layer `layer`'s page p is
    page layer * P + p there, so the kernel gets the whole pool and shifted page tables, never a copied slice.

    Args:
      q: [B, 1, N, H]; positions: [B, 1] (the new token's, already written); page_table: [B, max_pages].
      scale: the score scale (None: H ** -0.5), folded into q.
    Returns:
      [B, 1, N * H].
    """
    from jax.experimental.pallas.ops.gpu import paged_attention as kernel

    K, L, P, ps, H = cache_k.shape
    B, _, N, _ = q.shape
    M = page_table.shape[1]
    k_splits, per_block = decode_partitions(B, K, M, programs)
    lengths = jnp.maximum(positions[:, 0] + 1, 1).astype(jnp.int32)  # padding rows read one harmless token
    out = kernel.paged_attention(
        (q[:, 0] * (H ** -0.5 if scale is None else scale)).astype(cache_k.dtype), cache_k.reshape(K, L * P, ps, H),
        cache_v.reshape(K, L * P, ps, H), (page_table + layer * P).astype(jnp.int32), lengths,
        k_splits=k_splits, pages_per_compute_block=per_block, interpret=interpret)
    return out.reshape(B, 1, N * H).astype(q.dtype)


def mosaic_attend(q, cache_k, cache_v, positions, page_table, layer, sliding_window, interpret: bool = False,
                  sm_scale: float | None = None):
    """Attention of a paged step with jlora's Mosaic GPU kernels, reading the pool in place (pages of layer `layer`
    are pages layer * P + p of the pool folded to [K, L * P, page_size, H]). The step's keys are already written.

    Args:
      q: [B, T, N, H]; positions: [B, T] (negative: padding); page_table: [B, max_pages].
      sm_scale: the score scale (None: H ** -0.5).
    Returns:
      [B, T, N * H]: decode steps (T = 1) through `paged_decode_attention`, longer ones `paged_prefill_attention`.
    """
    from pallas_kernels import attention as kernels

    K, L, P, ps, H = cache_k.shape
    B, T, N, _ = q.shape
    pages_k, pages_v = cache_k.reshape(K, L * P, ps, H), cache_v.reshape(K, L * P, ps, H)
    table = (page_table + layer * P).astype(jnp.int32)
    q = q.astype(cache_k.dtype)
    if T == 1:
        lengths = jnp.where(positions[:, 0] >= 0, positions[:, 0] + 1, 0).astype(jnp.int32)  # 0: a padding row
        out = kernels.paged_decode_attention(q[:, 0], pages_k, pages_v, lengths, table,
                                             sliding_window=sliding_window, sm_scale=sm_scale, interpret=interpret)
    else:
        out = kernels.paged_prefill_attention(q, pages_k, pages_v, positions.astype(jnp.int32), table,
                                              sliding_window=sliding_window, sm_scale=sm_scale, interpret=interpret)
    return out.reshape(B, T, N * H)


def attend(q, k, v, cache_k, cache_v, positions, page_table, config: ModelConfig, layer=None,
           runtime: RuntimeConfig = RuntimeConfig(), sliding=None):
    """Writes this step's keys/values, then attends. Returns (out [B, T, N*H], cache_k, cache_v).

    With `page_table` None the cache is contiguous ([B, S, K, H], one layer's), else paged: every layer's
    pages [K, L, P, page_size, H], of which `layer` is read and written. Paged steps use the kernel
    `paged_backend` picks by `runtime` (jlora's Mosaic GPU kernels on a GPU); everything else is the XLA path.
    `sliding` says whether this layer slides (see `attend_rows`).
    """
    if page_table is None:
        cache_k, cache_v = kv_cache.write(cache_k, cache_v, k, v, positions)
        return attend_rows(q, cache_k, cache_v, positions, config, sliding), cache_k, cache_v
    cache_k, cache_v = paged_write(cache_k, cache_v, k, v, positions, page_table, layer)
    K, _, _, ps, _ = cache_k.shape
    scale = None if config.query_pre_attn_scalar is None else config.attn_scale  # None: the kernels' H ** -0.5
    backend = paged_backend(config, q.shape[1], runtime, num_heads=q.shape[2], num_kv_heads=K, page_size=ps,
                            dtype=cache_k.dtype)
    if backend in _MOSAIC:
        out = mosaic_attend(q, cache_k, cache_v, positions, page_table, layer, config.sliding_window,
                            interpret=backend == "interpret_mosaic", sm_scale=scale)
        return out, cache_k, cache_v
    if backend in _TRITON:
        out = paged_decode(q, cache_k, cache_v, positions, page_table, layer, interpret=backend == "interpret",
                           programs=runtime.decode_attention_programs, scale=scale)
        return out, cache_k, cache_v
    out = attend_rows(q, paged_rows(cache_k, page_table, layer), paged_rows(cache_v, page_table, layer), positions,
                      config, sliding)
    return out, cache_k, cache_v
