"""Host-side bookkeeping of adapters: names, host copies, and which device slot holds which adapter."""

from __future__ import annotations

import collections
import re

import jax.numpy as jnp

from jlora.config import LoraBankConfig, ModelConfig
from jlora.errors import AdapterError, CapacityError, UnknownAdapterError
from jlora.lora import bank as bank_lib
from jlora.lora.peft import LoraAdapter, load_adapter

_NAME = re.compile(r"^[A-Za-z0-9][\w.\-:/]{0,127}$")


class AdapterRegistry:
    """Registered adapters and the device bank; a slot is reused LRU-first when its bucket is full."""

    def __init__(self, config: ModelConfig, bank_config: LoraBankConfig = LoraBankConfig(), dtype=jnp.float32):
        self.config, self.bank_config = config, bank_config
        self.bank = bank_lib.init_bank(config, bank_config, dtype)
        self.adapters: dict[str, LoraAdapter] = {}
        self.resident: collections.OrderedDict[str, int] = collections.OrderedDict()  # name -> slot, LRU first
        self._free = {b.rank: list(range(b.offset, b.offset + b.num_slots)) for b in self.bank.buckets}

    def __contains__(self, name: str) -> bool:
        return name in self.adapters

    def names(self) -> list[str]:
        return sorted(self.adapters)

    def register(self, name: str, path: str) -> LoraAdapter:
        """Reads and checks an adapter (raising `AdapterError` before anything changes) and keeps it on the host."""
        if not isinstance(name, str) or not _NAME.match(name):
            raise AdapterError(f"invalid adapter name {name!r}: use letters, digits and . _ - : /")
        adapter = load_adapter(path, self.config, self.bank_config, name=name)
        if name in self.adapters:
            self.unregister(name)
        self.adapters[name] = adapter
        return adapter

    def unregister(self, name: str) -> None:
        if name not in self.adapters:
            raise UnknownAdapterError(f"adapter {name!r} is not loaded")
        slot = self.resident.pop(name, None)
        if slot is not None:
            self.bank = bank_lib.clear_slot(self.bank, slot)
            self._free[self.adapters[name].bucket].append(slot)
        del self.adapters[name]

    def slots_for(self, names: list[str | None]) -> list[int]:
        """Global slot ids (-1 for None) with every named adapter resident on the device."""
        unknown = sorted({n for n in names if n is not None and n not in self.adapters})
        if unknown:
            raise UnknownAdapterError(f"unknown adapter(s) {unknown}; loaded: {self.names()}")
        needed = {n for n in names if n is not None}
        for n in needed:
            self._make_resident(n, keep=needed)
        for n in needed:
            self.resident.move_to_end(n)
        return [-1 if n is None else self.resident[n] for n in names]

    def _make_resident(self, name: str, keep: set[str]) -> None:
        if name in self.resident:
            return
        adapter = self.adapters[name]
        free = self._free[adapter.bucket]
        if not free:
            victim = next((n for n in self.resident if self.adapters[n].bucket == adapter.bucket and n not in keep),
                          None)
            if victim is None:
                raise CapacityError(f"rank bucket {adapter.bucket} has {self.bank_config.slots[self.bank_config.buckets.index(adapter.bucket)]} "
                                    f"device slots, all used by this batch; send fewer distinct adapters at once")
            free.append(self.resident.pop(victim))
        slot = free.pop(0)
        self.bank = bank_lib.write_slot(self.bank, slot, adapter.a, adapter.b)
        self.resident[name] = slot
