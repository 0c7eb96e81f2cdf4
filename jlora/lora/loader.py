"""PEFT adapter directories -> a device LoRA bank, for library use under `jax.jit`.

The serving engine keeps its adapters in the tiered `jlora.engine.adapter_store.AdapterStore`; this is the one-shot
form of the same reading and slot writing, for code that calls `forward` itself.
"""

from __future__ import annotations

import collections
from typing import Mapping

import jax.numpy as jnp
import numpy as np

from jlora.config import DEFAULT_RANK_BUCKETS, LoraBankConfig, ModelConfig
from jlora.lora.bank import LoraBank
from jlora.lora.peft import load_adapter
from jlora.lora.slots import SlotTable


def bank_from_peft(config: ModelConfig, adapters: Mapping[str, str], *, bank_config: LoraBankConfig | None = None,
                   dtype=jnp.float32) -> tuple[LoraBank, dict[str, int]]:
    """Reads PEFT adapters and writes each into its own slot of a new bank.

    Args:
      config: the base model the adapters were trained on (`jlora.load_model(...).config`).
      adapters: {name: PEFT directory} (`adapter_config.json` + `adapter_model.safetensors`).
      bank_config: the bank's buckets and slots; default: one slot per adapter in the smallest of the default
        rank buckets (8, 16, 32, 64, 128) that holds it.
      dtype: the bank's dtype (the base model's, usually).

    Returns:
      (bank, {name: global slot id}). Pass the ids as `forward`'s `lora_ids` (per token [B, T], or per row [B]);
      -1 means no adapter.

    Raises:
      AdapterError naming the adapter and the problem (missing files, shapes that do not fit the model, a rank
      above the largest bucket), before anything is written.
    """
    if bank_config is None:
        probe = LoraBankConfig(buckets=DEFAULT_RANK_BUCKETS, slots=(1,) * len(DEFAULT_RANK_BUCKETS))
        loaded = {name: load_adapter(path, config, probe, name, np.dtype(dtype)) for name, path in adapters.items()}
        counts = collections.Counter(a.bucket for a in loaded.values())
        slots = tuple(counts.get(b, 0) for b in DEFAULT_RANK_BUCKETS)
        bank_config = LoraBankConfig(buckets=DEFAULT_RANK_BUCKETS, slots=slots if any(slots) else (1,) + slots[1:])
    else:
        loaded = {name: load_adapter(path, config, bank_config, name, np.dtype(dtype))
                  for name, path in adapters.items()}
    table = SlotTable(config, bank_config, dtype)
    ids = {name: table.place(name, adapter, evictable=lambda _: False) for name, adapter in loaded.items()}
    return table.bank, ids
