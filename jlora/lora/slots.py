"""Which adapter sits in which device slot of the bank; writes adapters in, LRU first out."""

from __future__ import annotations

import collections
from typing import Callable

import jax.numpy as jnp

from jlora.config import LoraBankConfig, ModelConfig
from jlora.errors import CapacityError
from jlora.lora import bank as bank_lib
from jlora.lora.peft import LoraAdapter


class SlotTable:
    """The device bank plus its bookkeeping. `resident` is ordered least recently used first.

    Args:
      layout: where the bank lives and how a slot is written: an object with `place(bank)`,
        `write_slot(bank, slot, a, b)` and `clear_slot(bank, slot)` (`jlora.engine.mesh.MeshBankLayout` on a
        mesh); None keeps the bank on the default device and writes with `jlora.lora.bank`.
    """

    def __init__(self, config: ModelConfig, bank_config: LoraBankConfig, dtype=jnp.float32, layout=None):
        self.bank_config = bank_config
        self.layout = layout
        bank = bank_lib.init_bank(config, bank_config, dtype)
        self.bank = bank if layout is None else layout.place(bank)
        self.resident: collections.OrderedDict[str, int] = collections.OrderedDict()
        self.bucket_of: dict[str, int] = {}
        self._free = {b.rank: list(range(b.offset, b.offset + b.num_slots)) for b in self.bank.buckets}
        self.num_writes = 0

    def capacity(self, bucket: int) -> int:
        return dict(self.bank_config.active)[bucket]

    def slot(self, name: str) -> int | None:
        return self.resident.get(name)

    def touch(self, name: str) -> None:
        self.resident.move_to_end(name)

    def place(self, name: str, adapter: LoraAdapter, evictable: Callable[[str], bool]) -> int:
        """Writes `adapter` into a free slot of its bucket, evicting the least recently used evictable one."""
        if name in self.resident:
            self.touch(name)
            return self.resident[name]
        free = self._free[adapter.bucket]
        if not free:
            victim = next((n for n in self.resident if self.bucket_of[n] == adapter.bucket and evictable(n)), None)
            if victim is None:
                raise CapacityError(f"rank bucket {adapter.bucket} has {self.capacity(adapter.bucket)} device slots, "
                                    f"all in use; send fewer distinct adapters at once or add slots")
            self.remove(victim, clear=False)
        slot = free.pop(0)
        self.bank = (self.layout or bank_lib).write_slot(self.bank, slot, adapter.a, adapter.b)
        self.num_writes += 1
        self.resident[name] = slot
        self.bucket_of[name] = adapter.bucket
        return slot

    def remove(self, name: str, clear: bool = True) -> None:
        """Frees a slot; `clear` zeroes it so stale weights can never be read."""
        slot = self.resident.pop(name, None)
        if slot is None:
            return
        if clear:
            self.bank = (self.layout or bank_lib).clear_slot(self.bank, slot)
        self._free[self.bucket_of.pop(name)].append(slot)

    def warmup(self) -> None:
        """Compiles the slot writes now: clears one free slot of every bucket (a full bucket has written)."""
        for slots in self._free.values():
            if slots:
                self.bank = (self.layout or bank_lib).clear_slot(self.bank, slots[0])
