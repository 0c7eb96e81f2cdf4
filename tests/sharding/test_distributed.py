"""Two `jax.distributed` processes on the CPU (localhost coordinator) generate what one process does."""

import json
import os
import socket
import subprocess
import sys

import pytest
from helpers import write_adapter, write_model

from jlora.config import LoraBankConfig
from jlora.generate import LLM
from jlora.sampling import SamplingParams

WORKER = os.path.join(os.path.dirname(__file__), "_dist_worker.py")
TIMEOUT_S = 150
GREEDY = {"temperature": 0.0, "max_tokens": 6}
REQUESTS = [
    {"prompt": [5, 6, 7, 8, 9], "adapter": "a", "sampling": GREEDY},
    {"prompt": [11, 3], "adapter": None, "sampling": GREEDY},
    {"prompt": [40, 41, 42], "adapter": "b", "sampling": {"temperature": 0.9, "max_tokens": 6, "seed": 7}},
    # No seed: each process would draw its own from the clock; process 0's broadcast makes them agree.
    {"prompt": [2, 4, 8, 16], "adapter": "a", "sampling": {"temperature": 1.0, "max_tokens": 6}},
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device per process
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _run_two_processes(tmp_path, spec) -> list[dict]:
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    port = str(_free_port())
    outs = [tmp_path / f"out{i}.json" for i in range(2)]
    logs = [open(tmp_path / f"log{i}.txt", "w") for i in range(2)]
    procs = [subprocess.Popen([sys.executable, WORKER, port, str(i), str(spec_path), str(outs[i])], env=_env(),
                              stdout=logs[i], stderr=subprocess.STDOUT) for i in range(2)]
    try:
        codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in logs:
            f.close()
    tails = "\n".join((tmp_path / f"log{i}.txt").read_text()[-3000:] for i in range(2))
    assert codes == [0, 0], f"workers exited with {codes}:\n{tails}"
    return [json.loads(o.read_text()) for o in outs]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    adapters = {"a": write_adapter(str(root / "a"), r=4, seed=1, std=0.3),
                "b": write_adapter(str(root / "b"), r=16, seed=2, std=0.3, targets=("q_proj", "v_proj", "down_proj"))}
    return write_model(str(root / "m")), adapters


def test_two_processes_generate_like_one(setup, tmp_path):
    """tp=2 runs every layer's all-reduce across the processes; dp=2 splits the batch between them."""
    model, adapters = setup
    results = _run_two_processes(tmp_path, {"model": model, "adapters": adapters, "requests": REQUESTS,
                                            "meshes": [[2, 1], [1, 2]]})
    assert [r["process_count"] for r in results] == [2, 2] and results[0]["devices"] == 2
    assert results[0]["tokens"] == results[1]["tokens"]

    llm = LLM(model, adapters=adapters, bank=LoraBankConfig(buckets=(8, 16), slots=(2, 1)), progress=False)
    seeded = [r for r in REQUESTS if r["sampling"].get("temperature") == 0.0 or "seed" in r["sampling"]]
    ref = llm.generate([r["prompt"] for r in seeded], adapter=[r["adapter"] for r in seeded],
                       sampling=[SamplingParams(**r["sampling"]) for r in seeded])
    for mesh, tokens in results[0]["tokens"].items():
        assert [t for r, t in zip(REQUESTS, tokens) if r in seeded] == [o.token_ids for o in ref], mesh
