"""A simple synchronous adapter registry: every adapter on the host, device slots LRU. Used by model-level code
and tests; the serving engine uses the tiered `jlora.engine.adapter_store.AdapterStore`."""

from __future__ import annotations

import re

import jax.numpy as jnp

from jlora.config import LoraBankConfig, ModelConfig
from jlora.errors import AdapterError, UnknownAdapterError
from jlora.lora.peft import LoraAdapter, load_adapter
from jlora.lora.slots import SlotTable

NAME_RE = re.compile(r"^[A-Za-z0-9][\w.\-:/]{0,127}$")


def check_name(name) -> None:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise AdapterError(f"invalid adapter name {name!r}: use up to 128 letters, digits and . _ - : /")


class AdapterRegistry:
    """Registered adapters (all on the host) and the device bank."""

    def __init__(self, config: ModelConfig, bank_config: LoraBankConfig = LoraBankConfig(), dtype=jnp.float32):
        self.config, self.bank_config = config, bank_config
        self.slots = SlotTable(config, bank_config, dtype)
        self.adapters: dict[str, LoraAdapter] = {}

    @property
    def bank(self):
        return self.slots.bank

    @property
    def resident(self):
        return self.slots.resident

    def names(self) -> list[str]:
        return sorted(self.adapters)

    def register(self, name: str, path: str) -> LoraAdapter:
        """Reads and checks an adapter (raising `AdapterError` before anything changes) and keeps it on the host."""
        check_name(name)
        adapter = load_adapter(path, self.config, self.bank_config, name=name)
        if name in self.adapters:
            self.unregister(name)
        self.adapters[name] = adapter
        return adapter

    def unregister(self, name: str) -> None:
        if name not in self.adapters:
            raise UnknownAdapterError(f"adapter {name!r} is not loaded")
        self.slots.remove(name)
        del self.adapters[name]

    def slots_for(self, names: list[str | None]) -> list[int]:
        """Global slot ids (-1 for None) with every named adapter resident on the device."""
        unknown = sorted({n for n in names if n is not None and n not in self.adapters})
        if unknown:
            raise UnknownAdapterError(f"unknown adapter(s) {unknown}; loaded: {self.names()}")
        needed = {n for n in names if n is not None}
        for n in needed:
            self.slots.place(n, self.adapters[n], evictable=lambda v: v not in needed)
        for n in needed:
            self.slots.touch(n)
        return [-1 if n is None else self.slots.slot(n) for n in names]
