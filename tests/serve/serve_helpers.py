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

    def wait_idle(self, timeout: float = 20.0) -> dict:
        """Waits until no request runs and every KV page is free again; returns the engine stats."""
        end = time.monotonic() + timeout
        while True:
            stats = self.service.engine.stats()
            if stats["in_flight"] == 0 and stats["running"] == 0 and stats["waiting"] == 0 \
                    and stats["free_pages"] == NUM_PAGES:
                return stats
            assert time.monotonic() < end, f"server not idle: {stats}"
            time.sleep(0.02)


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
