"""Two `jax.distributed` processes on the CPU (localhost coordinator) generate what one process does."""

import functools
import json
import os
import socket
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))

from _common import KV2, random_bank, random_params  # noqa: E402
import _dist_engine_worker  # noqa: E402
from _dist_worker import REQUESTS, generate  # noqa: E402

from jlora.model import llama  # noqa: E402
from jlora.model.kv_cache import KVCache  # noqa: E402

WORKER = os.path.join(os.path.dirname(__file__), "_dist_worker.py")
ENGINE_WORKER = os.path.join(os.path.dirname(__file__), "_dist_engine_worker.py")
TIMEOUT_S = 150


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run_two_processes(tmp_path, worker: str = WORKER, extra_args: tuple[str, ...] = ()) -> list[dict]:
    env = dict(os.environ)  # one CPU device per process: no device count, other XLA flags kept
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
    env["JAX_PLATFORMS"] = "cpu"
    port = str(_free_port())
    outs = [tmp_path / f"out{i}.json" for i in range(2)]
    logs = [open(tmp_path / f"log{i}.txt", "w") for i in range(2)]
    procs = [subprocess.Popen([sys.executable, worker, port, str(i), str(outs[i]), *extra_args], env=env,
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


def test_two_processes_generate_like_one(tmp_path):
    """tp=2 all-reduces every layer across the processes; dp=2 splits the batch between them."""
    results = _run_two_processes(tmp_path)
    assert [r["process_count"] for r in results] == [2, 2] and results[0]["devices"] == 2
    assert results[0]["tokens"] == results[1]["tokens"]  # the unseeded row too: process 0's seed won

    bank = random_bank(KV2, str(tmp_path))
    ref = generate(functools.partial(llama.forward, config=KV2), random_params(KV2, 3), bank,
                   KVCache.zeros(KV2, len(REQUESTS), 16))
    seeded = [i for i, (*_, seed) in enumerate(REQUESTS) if seed is not None]
    assert set(results[0]["tokens"]) == {"tp2dp1", "tp1dp2"}
    for mesh, tokens in results[0]["tokens"].items():
        assert [tokens[i] for i in seeded] == [ref[i] for i in seeded], mesh


def test_engine_across_two_processes(tmp_path):
    """`Engine(tp=2)` with one device per process: every process runs the same engine, process 0's batch wins."""
    _dist_engine_worker.write_inputs(str(tmp_path))
    results = _run_two_processes(tmp_path, ENGINE_WORKER, (str(tmp_path),))
    assert [r["process_count"] for r in results] == [2, 2]
    assert results[0]["tokens"] == results[1]["tokens"]  # the unseeded sampled row too
    ref = _dist_engine_worker.run(str(tmp_path), tp=1)
    greedy = [i for i, (*_, temperature, _) in enumerate(_dist_engine_worker.REQUESTS) if temperature == 0]
    assert [results[0]["tokens"][i] for i in greedy] == [ref[i] for i in greedy]


def test_broadcast_bytes_frames_short_and_long_payloads():
    """One process: the framing alone (a 4 KiB first frame, the rest padded to a power of two)."""
    from jlora import distributed

    for n in (0, 1, 4088, 4089, 10_000):
        payload = bytes(range(256)) * (n // 256) + bytes(n % 256)
        assert distributed.broadcast_bytes(payload) == payload
