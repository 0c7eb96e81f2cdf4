"""The one LoRA call site of the model. Every projection's delta goes through `lora_project`.

On GPU and TPU it runs the Pallas SGMV kernels of `pallas_kernels`; on CPU, their XLA path.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

import pallas_kernels
from jlora.config import RuntimeConfig
from jlora.lora.bank import LoraBank


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LoraBatch:
    """Per-step LoRA routing, computed once per step and reused by every layer and projection.

    Attributes:
      slot_ids: one [N] int32 array per bucket: the token's slot in that bucket, or -1.
      meta: one kernel tile table per bucket (`pallas_kernels.segment_metadata`).
    """

    slot_ids: tuple[jax.Array, ...]
    meta: tuple


def make_lora_batch(bank: LoraBank, lora_ids: jax.Array, backend: str | None = None) -> LoraBatch:
    """Routes global slot ids to each bucket.

    Args:
      bank: the LoRA bank (only its static bucket layout is used).
      lora_ids: [N] int32 global slot ids; -1 means no adapter.
      backend: the LoRA kernel backend (`RuntimeConfig.lora_backend`); None or "auto" by platform.
    """
    slot_ids, meta = [], []
    for bucket in bank.buckets:
        local = lora_ids - bucket.offset
        local = jnp.where((lora_ids >= 0) & (local >= 0) & (local < bucket.num_slots), local, -1).astype(jnp.int32)
        slot_ids.append(local)
        # The XLA paths need no tile table.
        needs_meta = pallas_kernels.resolve_backend(backend) not in ("xla", "reference")
        meta.append(pallas_kernels.segment_metadata(local, backend=backend) if needs_meta else None)
    return LoraBatch(slot_ids=tuple(slot_ids), meta=tuple(meta))


def lora_project(x: jax.Array, y: jax.Array, group: str, bank: LoraBank, batch: LoraBatch,
                 runtime: RuntimeConfig = RuntimeConfig(), layer: jax.Array | None = None) -> jax.Array:
    """Adds every token's own adapter delta to a (fused) projection's output.

    Semantics: y[t, slice j] += (x[t] @ A_j[slot(t)]) @ B_j[slot(t)] for each fused slice j.

    Args:
      x: [N, d_in] the projection's input.
      y: [N, sum_j d_j] the base projection's output.
      group: one of "qkv", "o", "gate_up", "down".
      bank: the stacked bank ([L, ...] arrays) with `layer` the int32 layer index, or one layer's bank
        (L axis removed) with layer None.
      batch: this step's `LoraBatch`.
      runtime: its `lora_backend` and `decode_expand` pick the kernels (static).
    """
    for bucket, ids, meta in zip(bank.buckets, batch.slot_ids, batch.meta):
        if group not in bucket.a:  # the bank does not serve this projection (LoraBankConfig.modules)
            continue
        y = pallas_kernels.lora_shrink_expand(x, y, bucket.a[group], bucket.b[group], ids, meta=meta,
                                              backend=runtime.lora_backend, layer=layer,
                                              decode_expand=runtime.decode_expand)
    return y
