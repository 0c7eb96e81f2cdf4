"""What both front ends serve, independent of the wire: completions and adapter management on the engine thread."""

from __future__ import annotations

import dataclasses
import time

from jlora.errors import RequestError
from jlora.serve.async_engine import AsyncEngine, RequestStream
from jlora.serve.metrics import ServerMetrics
from jlora.serve.protocol import BASE_ALIASES, Completion, ModelInfo


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    name: str
    path: str
    rank_bucket: int


class Service:
    """The engine thread, the served model's facts and the metrics, shared by the gRPC and HTTP servers."""

    def __init__(self, engine: AsyncEngine, info: ModelInfo):
        self.engine, self.info = engine, info
        self.metrics = ServerMetrics(engine)

    async def start(self, completion: Completion, *, deadline: float | None = None) -> RequestStream:
        """Queues a validated request; raises `UnknownAdapterError`, `RequestError` or `ServerClosedError`."""
        return await self.engine.generate(completion.prompt_ids, completion.sampling, completion.adapter,
                                          deadline=deadline)

    def observe(self, api: str, started: float) -> None:
        self.metrics.latency.labels(api).observe(time.perf_counter() - started)

    async def list_adapters(self) -> list[AdapterInfo]:
        def names(engine):
            store = engine.store
            return [AdapterInfo(n, store.paths[n], store.buckets[n]) for n in store.names()]

        return await self.engine.run(names)

    async def load_adapter(self, name, path) -> AdapterInfo:
        """Registers (or replaces) `name`, reading and checking its weights now: `AdapterPathError` outside the
        adapter roots, `AdapterError` for bad files; adapters already loaded are untouched."""
        if not isinstance(name, str) or not name:
            raise RequestError(f"adapter name must be a non-empty string, got {name!r}")
        if not isinstance(path, str) or not path:
            raise RequestError(f"adapter path must be a non-empty string, got {path!r}")
        if name in BASE_ALIASES or name == self.info.name:
            raise RequestError(f"adapter name {name!r} is reserved for the base model")

        def register(engine):
            engine.store.register(name, path)
            return AdapterInfo(name, engine.store.paths[name], engine.store.buckets[name])

        return await self.engine.run(register)

    async def unload_adapter(self, name) -> bool:
        """Unregisters `name` (`UnknownAdapterError` if it is not loaded). Returns False when running requests
        still use it: new requests are refused now and it goes when they finish."""
        if not isinstance(name, str) or not name:
            raise RequestError(f"adapter name must be a non-empty string, got {name!r}")
        return await self.engine.run(lambda engine: engine.store.unregister(name))
