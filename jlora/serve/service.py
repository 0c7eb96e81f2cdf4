"""What both front ends serve, independent of the wire: completions and adapter management on the engine thread.

Work that would stall others runs off both the event loop and the engine thread: tokenization and chat
templating on a small thread pool (`prepare`), reading and checking an adapter's files on the adapter store's
loader pool. Only the registration itself, a few dictionary updates, runs on the engine thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import os
import time
from typing import Callable

from jlora.errors import AdapterPathError, RequestError
from jlora.serve.async_engine import AsyncEngine, RequestStream
from jlora.serve.metrics import ServerMetrics
from jlora.serve.protocol import BASE_ALIASES, Completion, ModelInfo, show
from jlora.serve.security import SecurityConfig

RUNTIME_LOADS_OFF = ("runtime adapter loads are disabled on this server: it was started without --lora-root "
                     "(or --allow-any-lora-path)")


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    """An adapter as clients see it: `path` is relative to the adapter root holding it ("" outside the roots),
    never a server path."""

    name: str
    path: str
    rank_bucket: int


class Service:
    """The engine thread, the served model's facts and the metrics, shared by the gRPC and HTTP servers.

    Args:
      engine: the engine thread.
      info: the served model's facts, for request validation.
      runtime_loads: whether clients may load adapters (`jlora serve` allows it with --lora-root or
        --allow-any-lora-path); unloading stays allowed.
      security: the API keys and allowed hosts both front ends enforce (default: open, loopback hosts).
      prepare_workers: threads that tokenize and template prompts.
    """

    def __init__(self, engine: AsyncEngine, info: ModelInfo, *, runtime_loads: bool = True,
                 security: SecurityConfig | None = None, prepare_workers: int = 4):
        self.engine, self.info = engine, info
        self.runtime_loads = runtime_loads
        self.security = security or SecurityConfig()
        self.metrics = ServerMetrics(engine)
        self._prepare_pool = concurrent.futures.ThreadPoolExecutor(prepare_workers,
                                                                   thread_name_prefix="jlora-prepare")

    async def prepare(self, fn: Callable[..., Completion], *args, **kwargs) -> Completion:
        """Runs a request's validation and tokenization (`protocol.prepare`, or a front end's function around
        it) on the prepare pool, off the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._prepare_pool, functools.partial(fn, *args, **kwargs))

    async def start(self, completion: Completion, *, deadline: float | None = None,
                    follows: str | None = None) -> RequestStream:
        """Queues a validated request (one sequence: `choices.start_choices` expands n and best_of); raises
        `UnknownAdapterError`, `RequestError` or `ServerClosedError`."""
        return await self.engine.generate(completion.prompt_ids, completion.sampling, completion.adapter,
                                          deadline=deadline, follows=follows)

    def observe(self, api: str, started: float) -> None:
        self.metrics.latency.labels(api).observe(time.perf_counter() - started)

    async def list_adapters(self) -> list[AdapterInfo]:
        def names(engine):
            store = engine.store
            return [self._info(store, store.registration(n)) for n in store.names()]

        return await self.engine.run(names)

    async def find_adapter_by_path(self, path: str) -> str | None:
        """The name of a loaded adapter whose directory `path` resolves to, if any (SGLang's `lora_path`)."""
        real = os.path.realpath(path)
        return await self.engine.run(lambda engine: next(
            (n for n, p in engine.store.paths.items() if p == real), None))

    async def load_adapter(self, name, path) -> AdapterInfo:
        """Registers (or replaces) `name`, its files read and checked on the loader pool first:
        `AdapterPathError` outside the adapter roots (or with runtime loads off), `AdapterError` for bad files;
        adapters already loaded are untouched. A replaced adapter's running requests finish on its old weights."""
        if not isinstance(name, str) or not name:
            raise RequestError(f"adapter name must be a non-empty string, got {show(name)}")
        if not isinstance(path, str) or not path:
            raise RequestError(f"adapter path must be a non-empty string, got {show(path)}")
        if name in BASE_ALIASES or name == self.info.name:
            raise RequestError(f"adapter name {name!r} is reserved for the base model")
        if not self.runtime_loads:
            raise AdapterPathError(RUNTIME_LOADS_OFF)
        store = self.engine.engine.store  # `prepare` only reads files and the store's fixed settings
        prepared = await asyncio.get_running_loop().run_in_executor(
            store.pool, functools.partial(store.prepare, name, path))

        def register(engine):
            return self._info(engine.store, engine.store.add(prepared))

        return await self.engine.run(register)

    async def unload_adapter(self, name) -> bool:
        """Unregisters `name` (`UnknownAdapterError` if it is not loaded). Returns False when running requests
        still use it: new requests are refused now and it goes when they finish."""
        if not isinstance(name, str) or not name:
            raise RequestError(f"adapter name must be a non-empty string, got {show(name)}")
        return await self.engine.run(lambda engine: engine.store.unregister(name))

    @staticmethod
    def _info(store, registration) -> AdapterInfo:
        shown = ""
        for root in store.roots or ():
            if registration.path.startswith(root + os.sep):
                shown = os.path.relpath(registration.path, root)
                break
        return AdapterInfo(registration.name, shown, registration.bucket)

    def close(self) -> None:
        self._prepare_pool.shutdown(wait=False, cancel_futures=True)
