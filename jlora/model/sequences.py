"""Logits at every position of whole sequences, each from position 0 with a fresh dense KV cache: what scoring
(`LLM.score`) and prompt logprobs need. On one device through `llama.forward`, on a mesh through
`ShardedModel.forward` (tensor- and data-parallel; rows split over "data"). Call it inside `jax.jit`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jlora.config import ModelConfig, RuntimeConfig
from jlora.model.kv_cache import KVCache
from jlora.model.llama import forward


def sequence_logits(params, bank, tokens: jax.Array, lora_ids: jax.Array, *, config: ModelConfig,
                    runtime: RuntimeConfig, model=None) -> jax.Array:
    """Logits [B, T, V] of token rows [B, T]; padding at a row's end changes nothing before
    it. `lora_ids` [B]: the global adapter slot of each row, -1 for the base. `model`: a `ShardedModel` whose
    placed params and bank these are, or None for one device; on a mesh B must be a multiple of its dp."""
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    ids = jnp.broadcast_to(lora_ids[:, None], (B, T))
    if model is None:
        cache = KVCache.zeros(config, B, T, params["embed"].dtype)
        logits, _ = forward(params, bank, tokens, positions, ids, cache, config=config, runtime=runtime)
    else:
        cache = model.cache_zeros(B, T, params["embed"].dtype)
        logits, _ = model.forward(params, bank, tokens, positions, ids, cache, runtime=runtime)
    return logits
