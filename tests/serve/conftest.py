"""One server (gRPC + HTTP, in-process threads, free ports) over a tiny random model, shared by tests/serve."""

import dataclasses
import json
import os
import time

import pytest
from helpers import TINY, write_adapter, write_model
from train.tiny import write_tiny_tokenizer

from jlora.serve.server import BackgroundServer, ServeConfig, build_service

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


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    model_dir = tiny_model_dir(tmp)
    root = tmp / "adapters"
    adapters = {n: write_adapter(str(root / n), CONFIG, r=r, seed=r, std=0.3) for n, r in ADAPTERS.items()}
    spare = write_adapter(str(root / "spare"), CONFIG, r=4, seed=99, std=0.3)
    malformed = write_adapter(str(root / "malformed"), CONFIG, r=4)
    with open(os.path.join(malformed, "adapter_model.safetensors"), "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    outside = write_adapter(str(tmp / "elsewhere"), CONFIG, r=4)
    config = ServeConfig(model=model_dir, served_model_name="tiny", loras=tuple(adapters.items()),
                         lora_roots=(str(root),), max_loras_per_batch=4, max_lora_rank=16, max_num_seqs=64,
                         num_pages=NUM_PAGES, page_size=16)
    server = BackgroundServer(build_service(config))
    yield Served(server, model_dir, str(root), outside, malformed, spare, adapters)
    server.stop()


def sse_events(lines) -> list:
    """The JSON payloads of `data:` lines, up to [DONE]."""
    events = []
    for line in lines:
        if line.startswith("data: "):
            if line == "data: [DONE]":
                break
            events.append(json.loads(line[6:]))
    return events
