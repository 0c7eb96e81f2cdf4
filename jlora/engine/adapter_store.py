"""Tiered adapter caching: disk, then a host LRU (padded and scaled), then device slots (LRU, pinning).

Registration only reads `adapter_config.json`, so thousands of adapters can be registered. Host copies are
loaded by a thread pool, ahead of need for queued requests (prefetch). Device writes are dispatched
asynchronously, so they overlap the step that is running.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os

import jax.numpy as jnp
import numpy as np

from jlora.config import LoraBankConfig, ModelConfig
from jlora.errors import AdapterError, AdapterPathError, CapacityError, UnknownAdapterError
from jlora.lora.peft import LoraAdapter, load_adapter, read_spec
from jlora.lora.registry import check_name
from jlora.lora.slots import SlotTable


@dataclasses.dataclass
class StoreStats:
    device_hits: int = 0
    device_misses: int = 0
    host_hits: int = 0
    host_misses: int = 0


class AdapterStore:
    """Adapters by name across the three tiers.

    Args:
      config, bank_config: the base model and its device bank layout.
      roots: directories adapter paths must resolve inside (symlinks resolved); None allows any path.
      max_cpu_loras: host LRU capacity (adapters kept padded and scaled in host memory).
      layout: where the device bank lives (`jlora.lora.slots.SlotTable`); None: the default device.
    """

    def __init__(self, config: ModelConfig, bank_config: LoraBankConfig, *, roots=None, max_cpu_loras: int = 64,
                 dtype=jnp.float32, workers: int = 2, layout=None):
        if max_cpu_loras < 1:
            raise ValueError(f"max_cpu_loras must be >= 1, got {max_cpu_loras}")
        self.config, self.bank_config = config, bank_config
        self.roots = [os.path.realpath(r) for r in roots] if roots else None
        self.max_cpu_loras = max_cpu_loras
        self.dtype = np.dtype(dtype)  # host copies are kept in the bank's dtype
        self.slots = SlotTable(config, bank_config, dtype, layout=layout)
        self.paths: dict[str, str] = {}
        self.buckets: dict[str, int] = {}
        self.host: collections.OrderedDict[str, LoraAdapter] = collections.OrderedDict()
        self.refs: collections.Counter[str] = collections.Counter()
        self.pinned: set[str] = set()
        self.draining: set[str] = set()
        self.stats = StoreStats()
        self._loads: dict[str, concurrent.futures.Future] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="jlora-adapter")

    @property
    def bank(self):
        return self.slots.bank

    def names(self) -> list[str]:
        return sorted(n for n in self.paths if n not in self.draining)

    def has(self, name: str) -> bool:
        return name in self.paths and name not in self.draining

    def resolve_path(self, path: str) -> str:
        real = os.path.realpath(path)
        if self.roots is not None and not any(real == r or real.startswith(r + os.sep) for r in self.roots):
            raise AdapterPathError(f"adapter path {path!r} is outside the allowed adapter roots {self.roots}")
        return real

    def register(self, name: str, path: str, *, eager: bool = True) -> None:
        """Registers `name`. Reads the config now (its rank picks the bucket); `eager` also loads and checks
        the weights now, so a malformed adapter is refused here rather than when a request first uses it."""
        check_name(name)
        real = self.resolve_path(path)
        if not os.path.isdir(real):
            raise AdapterError(f"adapter directory {path!r} does not exist")
        spec = read_spec(real)
        rank = max([spec.r, *spec.rank_pattern.values()])
        if rank > self.bank_config.max_rank:
            raise AdapterError(f"rank {rank} is above the largest rank bucket ({self.bank_config.max_rank})")
        adapter = load_adapter(real, self.config, self.bank_config, name=name, dtype=self.dtype) if eager else None
        if name in self.paths:
            self.unregister(name)
        self.paths[name], self.buckets[name] = real, self.bank_config.bucket_for(rank)
        if adapter is not None:
            self.buckets[name] = adapter.bucket
            self._host_put(name, adapter)

    def unregister(self, name: str) -> bool:
        """Removes `name`; if sequences still use it, new requests are refused and it goes when they finish.
        Returns True if it is gone now."""
        if name not in self.paths:
            raise UnknownAdapterError(f"adapter {name!r} is not loaded")
        if self.refs[name] > 0:
            self.draining.add(name)
            return False
        self._drop(name)
        return True

    def _drop(self, name: str) -> None:
        self.draining.discard(name)
        self.pinned.discard(name)
        self.slots.remove(name)
        self.host.pop(name, None)
        self._loads.pop(name, None)
        del self.paths[name], self.buckets[name]

    def acquire(self, name: str | None) -> None:
        if name is not None:
            self.refs[name] += 1

    def release(self, name: str | None) -> None:
        if name is None:
            return
        self.refs[name] -= 1
        if self.refs[name] <= 0:
            del self.refs[name]
            if name in self.draining:
                self._drop(name)

    def pin(self, name: str) -> int:
        """Keeps `name` resident on the device until `unpin`."""
        slot = self.ensure_resident({name})[name]
        self.pinned.add(name)
        return slot

    def unpin(self, name: str) -> None:
        self.pinned.discard(name)

    def fits(self, names: set[str]) -> bool:
        """Whether `names` can all be resident at once, next to the pinned adapters."""
        need = collections.Counter(self.buckets[n] for n in names | self.pinned if n in self.buckets)
        return all(n <= self.slots.capacity(b) for b, n in need.items())

    def prefetch(self, names) -> None:
        """Starts host loads for adapters that are neither on the device nor on the host."""
        for name in names:
            if name is None or name not in self.paths or name in self.host or name in self._loads:
                continue
            if self.slots.slot(name) is None:
                self._loads[name] = self._pool.submit(load_adapter, self.paths[name], self.config,
                                                      self.bank_config, name, self.dtype)

    def ensure_resident(self, names: set[str], running: set[str] | None = None) -> dict[str, int]:
        """Global slot of every name, writing missing ones into the bank. Raises `AdapterError` naming the
        first adapter whose files turn out bad, `CapacityError` if the slots cannot hold them all.

        `running`: the adapters of running sequences, kept resident; an adapter that only queued requests hold
        may then be evicted. None keeps every acquired adapter resident."""
        if not self.fits(names):
            raise CapacityError(f"adapters {sorted(names)} do not fit the device slots at once")
        out = {}
        for name in sorted(names):
            if self.slots.slot(name) is not None:
                self.stats.device_hits += 1
                self.slots.touch(name)
            else:
                self.stats.device_misses += 1
                keep = names | self.pinned | (running or set())
                self.slots.place(name, self._host_get(name),
                                 evictable=lambda n: n not in keep and (running is not None or self.refs[n] == 0))
            out[name] = self.slots.slot(name)
        return out

    def _host_get(self, name: str) -> LoraAdapter:
        if name in self.host:
            self.stats.host_hits += 1
            self.host.move_to_end(name)
            return self.host[name]
        self.stats.host_misses += 1
        future = self._loads.pop(name, None)
        try:
            adapter = future.result() if future else load_adapter(self.paths[name], self.config,
                                                                  self.bank_config, name, self.dtype)
        except AdapterError as e:
            raise AdapterError(f"adapter {name!r}: {e}") from None
        self._host_put(name, adapter)
        return adapter

    def _host_put(self, name: str, adapter: LoraAdapter) -> None:
        self.host[name] = adapter
        self.host.move_to_end(name)
        while len(self.host) > self.max_cpu_loras:
            self.host.popitem(last=False)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
