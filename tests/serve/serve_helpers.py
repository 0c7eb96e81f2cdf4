"""Shared by tests/serve: the tiny model served in-process, and what tests need to inspect it."""

import dataclasses
import json
import time

from helpers import TINY, write_model
from train.tiny import write_tiny_tokenizer

from jlora.serve.server import BackgroundServer

CONFIG = dataclasses.replace(TINY, max_position_embeddings=256)
ADAPTERS = {"alpha": 4, "beta": 8, "gamma": 16}  # name -> rank; every one registered at start-up
NUM_PAGES = 256


@dataclasses.dataclass
class Served:
    server: BackgroundServer
    model_dir: str
    root: str  # the --lora-root
    outside: str  # a valid adapter outside the root
    malformed: str  # inside the root, with a corrupt safetensors file
    spare: str  # a valid adapter inside the root, not registered at start-up
    adapters: dict

    @property
    def service(self):
        return self.server.server.service

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.server.server.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server.http_port}"

    def wait_idle(self, timeout: float = 60.0) -> dict:
        """Waits until no request runs and every KV page is free again; returns the engine stats. Asks the
        engine thread itself (its published stats may predate a request that was just added)."""
        engine = self.service.engine
        end = time.monotonic() + timeout

        def state(e):
            return len(engine._streams), len(e.requests), e.scheduler.has_work(), e.allocator.num_free

        while True:
            if engine.call(state).result(timeout=timeout) == (0, 0, False, NUM_PAGES):
                engine.call(lambda e: None).result(timeout=timeout)  # the iteration before this one published
                return engine.stats()
            assert time.monotonic() < end, f"server not idle: {engine.stats()}"
            time.sleep(0.02)


def steps_wait_for_a_command(served, monkeypatch, limit: float = 30.0) -> None:
    """Every engine step after the first waits (up to `limit` s) until a command is queued for the engine thread:
    a request cannot run to its end before the abort of a client that went away arrives, however fast the tiny
    model is, so cancel tests need no retries."""
    async_engine = served.service.engine
    engine = async_engine.engine
    step, calls = engine.step, [0]

    def waiting_step():
        calls[0] += 1
        end = time.monotonic() + limit
        while calls[0] > 1 and not async_engine._commands and time.monotonic() < end:
            time.sleep(0.005)
        return step()

    monkeypatch.setattr(engine, "step", waiting_step)


def tiny_model_dir(root) -> str:
    return write_tiny_tokenizer(write_model(str(root / "model"), CONFIG))


def sse_events(lines) -> list:
    """The JSON payloads of `data:` lines, up to [DONE]."""
    events = []
    for line in lines:
        if line.startswith("data: "):
            if line == "data: [DONE]":
                break
            events.append(json.loads(line[6:]))
    return events
