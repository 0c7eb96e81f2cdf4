"""One memory budget split between KV pages and adapter slots (`adapter_memory_fraction`, as in LoRAX)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jlora.config import LoraBankConfig, ModelConfig
from jlora.lora.bank import group_dims


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
