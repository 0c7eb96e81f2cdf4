"""One server (gRPC + HTTP, in-process threads, free ports) over a tiny random model, shared by tests/serve."""

import os

import pytest
from helpers import write_adapter
from serve_helpers import ADAPTERS, CONFIG, NUM_PAGES, Served, tiny_model_dir

from jlora.serve.server import BackgroundServer, ServeConfig, build_service


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
