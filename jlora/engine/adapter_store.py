"""Tiered adapter caching: disk, then a host LRU (padded and scaled), then device slots (LRU, pinning).

Every registration has an identity (`Registration.key`): the first registration of a name is keyed by the
name itself, a replacement by `name#<n>`. Slots, host copies, loads and reference counts are all per identity,
so replacing an adapter that running requests use leaves them on the old weights (dropped when the last of
them finishes) while new requests get the new ones. A key is reused once its registration is gone (unregister,
then register the name again); `Registration.serial` never is, and it salts the prefix cache (`cache_salt`).

Registration only reads `adapter_config.json` (unless eager), so thousands of adapters can be registered.
Host copies are loaded by a thread pool, ahead of need for queued requests (prefetch). Device writes are
dispatched asynchronously, so they overlap the step that is running.

Thread safety: `prepare` only reads files and the store's fixed configuration, so any thread may call it;
everything else belongs to the engine thread.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import os
import re

import jax.numpy as jnp
import numpy as np

from jlora.config import LoraBankConfig, ModelConfig
from jlora.engine.prefix_cache import BASE_SALT
from jlora.errors import AdapterError, AdapterPathError, CapacityError, UnknownAdapterError
from jlora.lora.peft import NO_ADAPTER, LoraAdapter, load_adapter, read_spec
from jlora.lora.slots import SlotTable

NAME_RE = re.compile(r"^[A-Za-z0-9][\w.\-:/]{0,127}$")


def check_name(name) -> None:
    """An adapter name: up to 128 letters, digits and . _ - : /, starting with a letter or digit."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise AdapterError(f"invalid adapter name {name!r}: use up to 128 letters, digits and . _ - : /")


@dataclasses.dataclass
class StoreStats:
    device_hits: int = 0
    device_misses: int = 0
    host_hits: int = 0
    host_misses: int = 0


@dataclasses.dataclass(frozen=True)
class PreparedAdapter:
    """An adapter read and checked by `AdapterStore.prepare`, ready for `AdapterStore.add`."""

    name: str
    path: str  # resolved
    bucket: int
    adapter: LoraAdapter | None  # None: registered lazily, loaded when first needed


@dataclasses.dataclass
class Registration:
    name: str
    key: str  # identity: never shared by two live registrations
    path: str  # resolved; never shown to clients
    bucket: int  # from the config until the weights are read, then the weights' own
    serial: int  # unique among all registrations this store ever made: the weights' identity


def check_path(path) -> None:
    """A path a client may send: a non-empty string without NUL bytes or lone surrogates."""
    if not isinstance(path, str) or not path:
        raise AdapterError(f"adapter path must be a non-empty string, got {type(path).__name__}")
    if "\0" in path:
        raise AdapterError("adapter path must not contain NUL bytes")
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise AdapterError("adapter path must be valid UTF-8 text (it has a lone surrogate)") from None


class AdapterStore:
    """Adapters by name across the three tiers.

    Args:
      config, bank_config: the base model and its device bank layout.
      roots: directories every file of an adapter must resolve inside (symlinks resolved); None allows any path.
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
        self.entries: dict[str, Registration] = {}  # key -> registration, live or retired
        self.current: dict[str, str] = {}  # name -> key of its registration that new requests get
        self.retired: set[str] = set()  # keys replaced or unregistered while requests still use them
        self.host: collections.OrderedDict[str, LoraAdapter] = collections.OrderedDict()
        self.refs: collections.Counter[str] = collections.Counter()
        self.pinned: set[str] = set()
        self.stats = StoreStats()
        self._loads: dict[str, concurrent.futures.Future] = {}
        self._generation = itertools.count(1)
        self._serials = itertools.count(1)
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="jlora-adapter")

    @property
    def bank(self):
        return self.slots.bank

    @property
    def pool(self) -> concurrent.futures.ThreadPoolExecutor:
        """The loader threads (also used to `prepare` runtime loads off the engine thread)."""
        return self._pool

    @property
    def paths(self) -> dict[str, str]:
        """name -> resolved path of the current registrations."""
        return {n: self.entries[k].path for n, k in self.current.items()}

    def names(self) -> list[str]:
        return sorted(self.current)

    def has(self, name: str) -> bool:
        return name in self.current

    def registration(self, name: str) -> Registration:
        if name not in self.current:
            raise UnknownAdapterError(f"adapter {name!r} is not loaded", adapter=name)
        return self.entries[self.current[name]]

    def name_of(self, key: str | None) -> str | None:
        return None if key is None else self.entries[key].name if key in self.entries else key.split("#")[0]

    def resolve_path(self, path: str) -> str:
        """The resolved directory; `AdapterPathError` outside the roots (the message names no server path)."""
        check_path(path)
        real = os.path.realpath(path)
        if self.roots is not None and not any(real == r or real.startswith(r + os.sep) for r in self.roots):
            raise AdapterPathError(f"adapter path {path!r} is outside the allowed adapter roots")
        return real

    # -- registration ------------------------------------------------------------------------------------------

    def prepare(self, name: str, path: str, *, eager: bool = True) -> PreparedAdapter:
        """Checks the name and the path, reads the config (its rank picks the bucket) and, if `eager`, loads and
        checks the weights, so that a malformed adapter is refused now rather than when a request first uses it.
        Changes nothing; safe on any thread."""
        check_name(name)
        real = self.resolve_path(path)
        try:
            if not os.path.isdir(real):
                raise AdapterError(NO_ADAPTER)
            spec = read_spec(real, self.roots)
            rank = max([spec.r, *spec.rank_pattern.values()])
            if rank > self.bank_config.max_rank:
                raise AdapterError(f"rank {rank} is above the largest rank bucket ({self.bank_config.max_rank})")
            adapter = (load_adapter(real, self.config, self.bank_config, name=name, dtype=self.dtype,
                                    roots=self.roots) if eager else None)
        except AdapterError as e:
            raise type(e)(f"adapter {name!r} at {path!r}: {e}", adapter=name) from None
        bucket = adapter.bucket if adapter is not None else self.bank_config.bucket_for(rank)
        return PreparedAdapter(name, real, bucket, adapter)

    def add(self, prepared: PreparedAdapter) -> Registration:
        """Registers a prepared adapter. A name already in use gets a fresh identity: requests that hold the old
        one finish on its weights, new requests get these."""
        name = prepared.name
        key = name if name not in self.entries else f"{name}#{next(self._generation)}"
        old = self.current.get(name)
        self.entries[key] = Registration(name, key, prepared.path, prepared.bucket, next(self._serials))
        self.current[name] = key
        if prepared.adapter is not None:
            self._host_put(key, prepared.adapter)
        if old is not None:
            if old in self.pinned:
                self.pinned.add(key)
            self._retire(old)
        return self.entries[key]

    def register(self, name: str, path: str, *, eager: bool = True) -> Registration:
        """`add(prepare(...))`: reads the files on the calling thread."""
        return self.add(self.prepare(name, path, eager=eager))

    def unregister(self, name: str) -> bool:
        """Removes `name`; if sequences still use it, new requests are refused and it goes when they finish.
        Returns True if it is gone now."""
        if name not in self.current:
            raise UnknownAdapterError(f"adapter {name!r} is not loaded", adapter=name)
        return self._retire(self.current.pop(name))

    def _retire(self, key: str) -> bool:
        self.pinned.discard(key)
        if self.refs[key] > 0:
            self.retired.add(key)
            return False
        self._drop(key)
        return True

    def _drop(self, key: str) -> None:
        self.retired.discard(key)
        self.pinned.discard(key)
        self.slots.remove(key)
        self.host.pop(key, None)
        future = self._loads.pop(key, None)
        if future is not None:
            future.cancel()
        del self.entries[key]

    # -- references and residency -------------------------------------------------------------------------------

    def cache_salt(self, key: str | None) -> str:
        """The prefix-cache salt of a registration's KV (`jlora.engine.prefix_cache`): its serial, never reused, so a
        replaced or re-registered adapter never meets pages that other weights computed. The base model's is its
        own."""
        return BASE_SALT if key is None else f"adapter:{self.entries[key].serial}"

    def acquire(self, name: str | None) -> str | None:
        """Takes a reference on the current registration of `name`; returns its identity (None for the base)."""
        if name is None:
            return None
        key = self.registration(name).key
        self.refs[key] += 1
        return key

    def release(self, key: str | None) -> None:
        if key is None:
            return
        self.refs[key] -= 1
        if self.refs[key] <= 0:
            del self.refs[key]
            if key in self.retired:
                self._drop(key)

    def pin(self, name: str) -> int:
        """Keeps `name` resident on the device until `unpin`."""
        key = self.registration(name).key
        slot = self.ensure_resident({key})[key]
        self.pinned.add(key)
        return slot

    def unpin(self, name: str) -> None:
        self.pinned.discard(self.current.get(name))

    def fits(self, keys: set[str]) -> bool:
        """Whether `keys` can all be resident at once, next to the pinned adapters."""
        need = collections.Counter(self.entries[k].bucket for k in keys | self.pinned if k in self.entries)
        return all(n <= self.slots.capacity(b) for b, n in need.items())

    def prefetch(self, keys) -> None:
        """Starts host loads for adapters that are neither on the device nor on the host."""
        for key in keys:
            if key is None or key not in self.entries or key in self.host or key in self._loads:
                continue
            if self.slots.slot(key) is None:
                self._loads[key] = self._pool.submit(self._load, key)

    def ensure_resident(self, keys: set[str], running: set[str] | None = None) -> dict[str, int]:
        """Global slot of every identity, writing missing ones into the bank.

        Raises `AdapterError` carrying the adapter and identity whose files turn out bad (nothing is written
        then), `CapacityError` if the slots cannot hold them all: the host copies are read first, since a
        lazily registered adapter's bucket is only known from its weights.

        `running`: the adapters of running sequences, kept resident; an adapter that only queued requests hold
        may then be evicted. None keeps every acquired adapter resident."""
        missing = {k: self._host_get(k) for k in sorted(keys) if self.slots.slot(k) is None}
        if not self.fits(keys):
            raise CapacityError(f"adapters {sorted(self.name_of(k) for k in keys)} do not fit the device "
                                "slots at once")
        out = {}
        for key in sorted(keys):
            if key not in missing:
                self.stats.device_hits += 1
                self.slots.touch(key)
            else:
                self.stats.device_misses += 1
                keep = keys | self.pinned | (running or set())
                self.slots.place(key, missing[key],
                                 evictable=lambda n: n not in keep and (running is not None or self.refs[n] == 0))
            out[key] = self.slots.slot(key)
        return out

    def _load(self, key: str) -> LoraAdapter:
        entry = self.entries[key]
        return load_adapter(entry.path, self.config, self.bank_config, entry.name, self.dtype, roots=self.roots)

    def _host_get(self, key: str) -> LoraAdapter:
        if key not in self.entries:
            raise UnknownAdapterError(f"adapter identity {key!r} is not registered")
        if key in self.host:
            self.stats.host_hits += 1
            self.host.move_to_end(key)
            return self.host[key]
        self.stats.host_misses += 1
        future = self._loads.pop(key, None)
        entry = self.entries[key]
        try:
            adapter = future.result() if future is not None and not future.cancelled() else self._load(key)
        except Exception as e:  # noqa: BLE001 - whatever reading it raised, this adapter is at fault
            cause = str(e) if isinstance(e, AdapterError) else f"{type(e).__name__}: {str(e)[:200]}"
            cls = type(e) if isinstance(e, AdapterError) else AdapterError
            raise cls(f"adapter {entry.name!r} cannot be loaded: {cause}", adapter=entry.name,
                      identity=key) from None
        entry.bucket = adapter.bucket  # a lazy registration guessed it from the config's largest rank
        self._host_put(key, adapter)
        return adapter

    def _host_put(self, key: str, adapter: LoraAdapter) -> None:
        self.host[key] = adapter
        self.host.move_to_end(key)
        while len(self.host) > self.max_cpu_loras:
            self.host.popitem(last=False)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
