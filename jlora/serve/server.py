"""One serving process: the model, the engine thread, and the gRPC and HTTP servers on one event loop.

Shutdown drains: new requests are refused (health reports NOT_SERVING / 503), requests in flight run to the end
and their responses are sent, then the servers and the engine thread stop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading

from jlora.config import DEFAULT_RANK_BUCKETS, LORA_MODULES, LoraBankConfig, RuntimeConfig
from jlora.engine.engine import Engine, EngineConfig
from jlora.serve import multihost
from jlora.serve.async_engine import DEFAULT_STEP_TIMEOUT_S, AsyncEngine
from jlora.serve.grpc_server import GrpcServer
from jlora.serve.http_server import HttpServer
from jlora.serve.protocol import ModelInfo
from jlora.serve.security import SecurityConfig
from jlora.serve.service import Service

log = logging.getLogger("jlora.serve")


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """What `jlora serve` sets up. Ports of 0 pick free ones.

    `max_loras_per_batch` slots go to every rank bucket up to `max_lora_rank`: a batch can then mix that many
    distinct adapters of each rank bucket, and adapters above `max_lora_rank` are refused at load time.
    """

    model: str = "smollm2-135m-instruct"
    served_model_name: str | None = None
    dtype: str = "float32"
    loras: tuple[tuple[str, str], ...] = ()
    lora_roots: tuple[str, ...] = ()
    max_loras_per_batch: int = 4
    max_lora_rank: int = 64
    lora_target_modules: tuple[str, ...] = LORA_MODULES
    max_cpu_loras: int = 64
    max_num_seqs: int = 64
    num_scheduler_steps: int = 8
    max_model_len: int | None = None
    num_pages: int | None = None  # 512 unless gpu_memory_utilization
    memory_pool_fraction: float | None = None  # fill this share of JAX's pool (EngineConfig); pages take what is left
    page_size: int = 16
    enable_prefix_caching: bool = True
    lora_scheduling: str = "fifo"  # or "affinity" (EngineConfig.lora_scheduling)
    lora_affinity_max_wait_s: float = 2.0
    tp: int = 1
    dp: int = 1
    host: str = "127.0.0.1"
    grpc_port: int = 50051
    http_port: int = 8000
    warmup: bool = False
    drain_timeout_s: float = 600.0
    allow_any_lora_path: bool = False  # runtime loads outside any root (without roots, loads are refused)
    api_key: str | None = None
    admin_api_key: str | None = None
    allowed_hosts: tuple[str, ...] | None = None  # None: loopback names and `host` unless it is a wildcard
    step_timeout_s: float = DEFAULT_STEP_TIMEOUT_S
    runtime: RuntimeConfig = RuntimeConfig()  # kernel and layout switches (from the environment, by the CLI)
    chat_template: str | None = None  # a template file's path or its text, instead of the model's own
    quantization: str | None = None  # "fp8": FP8 linear weights, quantized at load (`jlora.model.quant`)

    def __post_init__(self):
        if self.memory_pool_fraction is not None and self.num_pages is not None:
            raise ValueError("give --num-pages or --gpu-memory-utilization, not both")
        if self.max_loras_per_batch < 1:
            raise ValueError(f"max_loras_per_batch must be >= 1, got {self.max_loras_per_batch}")
        if self.max_lora_rank < DEFAULT_RANK_BUCKETS[0]:
            raise ValueError(f"max_lora_rank must be >= {DEFAULT_RANK_BUCKETS[0]}, got {self.max_lora_rank}")

    def bank(self) -> LoraBankConfig:
        return LoraBankConfig(buckets=DEFAULT_RANK_BUCKETS,
                              slots=tuple(self.max_loras_per_batch if b <= self.max_lora_rank else 0
                                          for b in DEFAULT_RANK_BUCKETS),
                              modules=self.lora_target_modules)

    def engine_config(self) -> EngineConfig:
        return EngineConfig(max_num_seqs=self.max_num_seqs, num_scheduler_steps=self.num_scheduler_steps,
                            num_pages=self.num_pages or 512, page_size=self.page_size,
                            memory_pool_fraction=self.memory_pool_fraction,
                            enable_prefix_caching=self.enable_prefix_caching,
                            lora_scheduling=self.lora_scheduling,
                            lora_affinity_max_wait_s=self.lora_affinity_max_wait_s, max_model_len=self.max_model_len, bank=self.bank(), max_cpu_loras=self.max_cpu_loras,
                            adapter_roots=tuple(self.lora_roots) or None, tp=self.tp, dp=self.dp,
                            runtime=self.runtime)

    def security(self) -> SecurityConfig:
        return SecurityConfig.for_bind(self.host, self.api_key, self.admin_api_key, self.allowed_hosts)

    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        return os.path.basename(os.path.normpath(self.model)) if os.path.exists(self.model) else self.model


def build_engine(config: ServeConfig) -> Engine:
    """Loads the model and registers the `--lora` adapters (refusing bad ones now); every process does this."""
    import jax.numpy as jnp

    from jlora.checkpoint.resolve import load_model

    model, tokenizer = load_model(config.model, jnp.dtype(config.dtype), progress=True,
                                  chat_template=config.chat_template, quantization=config.quantization)
    engine = Engine(model, tokenizer, config.engine_config(), donate_weights=True)
    for name, path in config.loras:
        engine.store.register(name, path)
    if config.warmup:
        log.info("warm-up compiled %d step shapes", engine.warmup())
    return engine


def build_service(config: ServeConfig) -> Service:
    """`build_engine`, then the engine thread. With several processes, this is process 0's: its engine sends
    each step's changes to the followers (`multihost.Leader`)."""
    import jax

    engine = build_engine(config)
    # One request can use at most the KV pool, so that bounds its length too (and the default chat max_tokens).
    max_len = min(engine.max_model_len, engine.allocator.pages_per_replica * config.page_size)
    info = ModelInfo(config.model_name(), engine.tokenizer, engine.model_config.vocab_size, max_len)
    kw = dict(runtime_loads=bool(config.lora_roots) or config.allow_any_lora_path, security=config.security())
    if jax.process_count() == 1:
        return Service(AsyncEngine(engine, step_timeout_s=config.step_timeout_s), info, **kw)
    leader = multihost.Leader(engine)
    async_engine = AsyncEngine(leader, step_timeout_s=config.step_timeout_s)
    multihost.keep_alive(async_engine, leader)
    return Service(async_engine, info, **kw)


class Server:
    """The gRPC and HTTP servers over one `Service`, on the running event loop."""

    def __init__(self, service: Service, host: str = "127.0.0.1", grpc_port: int = 0, http_port: int = 0):
        self.service = service
        self.grpc = GrpcServer(service, host, grpc_port, service.security)
        self.http = HttpServer(service, host, http_port, service.security)

    @property
    def grpc_port(self) -> int:
        return self.grpc.port

    @property
    def http_port(self) -> int:
        return self.http.port

    async def start(self) -> None:
        await self.grpc.start()
        await self.http.start()

    async def stop(self, drain_timeout_s: float = 600.0, grace_s: float = 10.0) -> bool:
        """Drains, then stops both servers and the engine thread. Returns False if the drain timed out (what
        was still running is aborted)."""
        await self.grpc.health.enter_graceful_shutdown()
        drained = await self.service.engine.drain(drain_timeout_s)
        await self.grpc.stop(grace_s)
        await self.http.stop()
        await asyncio.to_thread(self.service.engine.shutdown)
        self.service.close()
        return drained


class BackgroundServer:
    """A `Server` on an event loop in a daemon thread: for tests and for embedding in another program."""

    def __init__(self, service: Service, host: str = "127.0.0.1", grpc_port: int = 0, http_port: int = 0):
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.server: Server | None = None
        self._thread = threading.Thread(target=self._run, args=(service, host, grpc_port, http_port),
                                        name="jlora-server", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def _run(self, service, host, grpc_port, http_port) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.server = Server(service, host, grpc_port, http_port)
            self.loop.run_until_complete(self.server.start())
        except BaseException as e:  # handed to the constructor's caller
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    def stop(self, drain_timeout_s: float = 60.0) -> bool:
        drained = asyncio.run_coroutine_threadsafe(self.server.stop(drain_timeout_s), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        return drained
