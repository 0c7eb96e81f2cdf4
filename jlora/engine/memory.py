"""One memory budget split between KV pages and adapter slots (`adapter_memory_fraction`, as in LoRAX)."""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp

from jlora.config import LoraBankConfig, ModelConfig
from jlora.lora.bank import group_dims

log = logging.getLogger("jlora.engine")


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    num_pages: int
    page_bytes: int
    bank: LoraBankConfig
    bank_bytes: int

    def describe(self) -> str:
        slots = ", ".join(f"r{b}x{s}" for b, s in self.bank.active)
        return (f"KV {self.num_pages} pages x {self.page_bytes / 2**10:.1f} KiB = "
                f"{self.num_pages * self.page_bytes / 2**20:.1f} MiB; adapter slots [{slots}] = "
                f"{self.bank_bytes / 2**20:.1f} MiB")


def slot_bytes(config: ModelConfig, rank: int, dtype, groups=None) -> int:
    """Bytes of one adapter slot of rank `rank` (A and B of every group in `groups`, default all, every layer)."""
    dims = group_dims(config)
    per_layer = sum(d_in * len(outs) * rank + rank * sum(outs)
                    for g, (d_in, outs) in dims.items() if groups is None or g in groups)
    return config.num_layers * per_layer * jnp.dtype(dtype).itemsize


def page_bytes(config: ModelConfig, page_size: int, dtype) -> int:
    return 2 * config.num_layers * page_size * config.kv_dim * jnp.dtype(dtype).itemsize


def plan_memory(config: ModelConfig, engine_config, dtype) -> MemoryPlan:
    """Sizes the KV pool and the bank; with `memory_bytes`, the adapter share buys equal slots per bucket."""
    pb = page_bytes(config, engine_config.page_size, dtype)
    bank = engine_config.bank
    if engine_config.memory_bytes is None:
        num_pages = engine_config.num_pages
    else:
        adapter_budget = engine_config.memory_bytes * engine_config.adapter_memory_fraction
        per_round = sum(slot_bytes(config, b, dtype, bank.groups) for b in bank.buckets)  # a slot per bucket
        n = max(1, int(adapter_budget // per_round))
        bank = dataclasses.replace(bank, slots=(n,) * len(bank.buckets))
        used = sum(slot_bytes(config, b, dtype, bank.groups) * s for b, s in bank.active)
        num_pages = max(1, int((engine_config.memory_bytes - used) // pb))
    bank_bytes = sum(slot_bytes(config, b, dtype, bank.groups) * s for b, s in bank.active)
    return MemoryPlan(num_pages=num_pages, page_bytes=pb, bank=bank, bank_bytes=bank_bytes)


def device_memory_limit() -> int | None:
    """Bytes of JAX's memory pool on the first local device (its `bytes_limit`), or None where the device reports
    none (the CPU)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def activation_bytes(config: ModelConfig, engine_config, dtype) -> int:
    """A bound on one step's memory beyond the weights, the KV pages and the bank: the token activations of the
    largest step, a float32 logits row (and its sampling temporaries) per sequence, the scores of a dense prefill
    attention chunk over the whole context (the XLA path; the Mosaic kernels need far less), and the sampling
    penalty state (token counts and flags: at most 8 bytes per vocabulary entry and sequence slot)."""
    item = jnp.dtype(dtype).itemsize
    T = engine_config.max_num_batched_tokens
    per_token = 4 * config.hidden_size + config.q_dim + 2 * config.kv_dim + 2 * config.intermediate_size
    tokens = 2 * T * per_token * item  # the step's activations, with room for one layer's temporaries
    rows = max(engine_config.max_num_seqs, engine_config.max_num_batched_tokens // engine_config.max_prefill_chunk)
    logits = 3 * rows * config.vocab_size * 4
    S = engine_config.max_model_len or config.max_position_embeddings
    scores = min(engine_config.max_prefill_chunk, T) * S * config.num_heads * 4
    penalties = 8 * (engine_config.max_num_seqs + 1) * config.vocab_size
    return tokens + logits + scores + penalties


def budget_from_limit(limit: int, weight_bytes: int, reserve: int, utilization: float) -> int:
    """Bytes left for KV pages and adapter slots: `utilization` of the pool, less the weights and the step's
    activations. Raises ValueError, with the figures, when nothing is left."""
    budget = int(limit * utilization) - weight_bytes - reserve
    if budget <= 0:
        raise ValueError(f"no memory is left for the KV cache: {utilization:.0%} of the device's {limit / 2**30:.2f} "
                         f"GiB pool, less {weight_bytes / 2**30:.2f} GiB of weights and {reserve / 2**30:.2f} GiB "
                         "for a step's activations; raise the utilization or lower max_num_batched_tokens")
    return budget


def fill_pool(config: ModelConfig, params, engine_config, dtype):
    """`engine_config` with `memory_pool_fraction` resolved into `memory_bytes`: what that share of the device's pool
    leaves after the weights (`params`, on the device) and a step's activations (`activation_bytes`). Logs the split."""
    limit = device_memory_limit()
    if limit is None:
        raise ValueError(f"memory_pool_fraction needs a device that reports its memory (GPU or TPU); the "
                         f"{jax.default_backend()} backend reports none: set num_pages or memory_bytes")
    weights = sum(x.nbytes for x in jax.tree.leaves(params))
    reserve = activation_bytes(config, engine_config, dtype)
    budget = budget_from_limit(limit, weights, reserve, engine_config.memory_pool_fraction)
    log.info("memory: %.0f%% of the %.2f GiB pool: weights %.2f GiB, a step's activations (bound) %.2f GiB, KV "
             "pages and adapter slots %.2f GiB", 100 * engine_config.memory_pool_fraction, limit / 2**30,
             weights / 2**30, reserve / 2**30, budget / 2**30)
    return dataclasses.replace(engine_config, memory_bytes=budget, memory_pool_fraction=None)  # resolved
