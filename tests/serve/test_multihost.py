"""Multi-process serving: the leader/follower protocol in one process, then `jlora serve` over two processes.

Over two processes (tp=2, one CPU device each) requests with mixed adapters (one loaded while serving) and a
client that goes away mid-stream reach process 0 alone; the answers equal one process's `LLM.generate`, process 1's
engine ends with the same step and token counts as process 0's, and SIGTERM on process 0 stops both with exit
code 0.
"""

import concurrent.futures
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from helpers import write_adapter, write_model
from serve_helpers import CONFIG, tiny_model_dir

from jlora.checkpoint.hf import load_hf_dir
from jlora.config import LoraBankConfig
from jlora.engine.engine import Engine, EngineConfig
from jlora.generate import LLM
from jlora.model import Llama
from jlora.sampling import SamplingParams
from jlora.serve import multihost
from jlora.serve.async_engine import AsyncEngine
from jlora.serve.server import ServeConfig

JLORA = os.path.join(os.path.dirname(sys.executable), "jlora")
TIMEOUT_S = 150
MAX_TOKENS = 8
# (prompt, adapter): "beta" is loaded over HTTP after the server has started.
REQUESTS = [("why is the sky blue", None), ("hello there", "alpha"), ("add 3 and 4", "beta"),
            ("tell me a story", "alpha"), ("what is two plus two", "beta"), ("the end", None)]


SMALL = EngineConfig(max_num_seqs=4, page_size=4, num_pages=32, max_model_len=64,
                     bank=LoraBankConfig(buckets=(4, 8), slots=(1, 1)))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return Llama(*load_hf_dir(write_model(str(tmp_path_factory.mktemp("multihost") / "m"))))


def test_follower_replays_the_leaders_engine_state(tiny_model, tmp_path, monkeypatch):
    """Every message the leader sends, replayed on a second engine, gives the same outputs: unseeded sampling
    (the leader picks the seed), an abort, adapters registered and unregistered between steps."""
    model, config = tiny_model, SMALL
    a4, a8 = (write_adapter(str(tmp_path / f"a{r}"), r=r, seed=r, std=0.3) for r in (4, 8))
    sent = []
    monkeypatch.setattr(multihost.distributed, "broadcast_bytes", lambda payload: sent.append(payload) or payload)
    leader = multihost.Leader(Engine(model, None, config))
    leader.store.register("a4", a4)
    greedy = leader.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=6), "a4")
    leader.add_request([9, 10], SamplingParams(temperature=1.0, max_tokens=6))
    aborted = leader.add_request([3, 1, 4, 1, 5], SamplingParams(temperature=0, max_tokens=20), "a4")
    finished = {}
    for step in range(20):
        if step == 2:
            leader.abort(aborted)
            leader.store.register("a8", a8)
            leader.add_request([2, 7, 1], SamplingParams(temperature=0.7, top_k=5, max_tokens=4), "a8")
        if step == 8:
            leader.store.unregister("a4")
        finished.update({o.request_id: o.token_ids for o in leader.step() if o.finished})
    leader.close()
    assert len(finished) == 3 and aborted not in finished and finished[greedy]
    assert json.loads(sent[-1]) == {"commands": [], "op": "stop"}

    follower = Engine(model, None, config)
    replayed = {}
    step = follower.step
    monkeypatch.setattr(follower, "step", lambda: [replayed.update({o.request_id: o.token_ids})
                                                   for o in step() if o.finished])
    messages = iter(sent)
    monkeypatch.setattr(multihost.distributed, "broadcast_bytes", lambda payload: next(messages))
    multihost.follow(follower)
    assert replayed == finished
    assert (follower.steps, follower.tokens_generated) == (leader.steps, leader.tokens_generated)
    assert follower.store.names() == leader.store.names() == ["a8"] and not follower.requests


def test_keep_alive_syncs_while_idle_and_close_stops(tiny_model, monkeypatch):
    sent = []
    monkeypatch.setattr(multihost.distributed, "broadcast_bytes", lambda payload: sent.append(json.loads(payload)))
    leader = multihost.Leader(Engine(tiny_model, None, SMALL))
    async_engine = AsyncEngine(leader)
    thread = multihost.keep_alive(async_engine, leader, interval_s=0.05)
    time.sleep(0.5)
    async_engine.shutdown()
    thread.join(5)
    assert not thread.is_alive()
    assert 2 <= len(sent) - 1 <= 11 and {m["op"] for m in sent[:-1]} == {"sync"}  # ~ one per 0.05 s
    assert sent[-1] == {"commands": [], "op": "stop"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(args, process_id: int, port: int, log: list):
    env = dict(os.environ)  # one CPU device per process: no device count, other XLA flags kept
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
    env.update(JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest")
    proc = subprocess.Popen([JLORA, "serve", *args, "--coordinator-address", f"localhost:{port}",
                             "--num-processes", "2", "--process-id", str(process_id)],
                            stderr=subprocess.PIPE, text=True, env=env)
    ready = threading.Event()

    def read():
        for line in proc.stderr:
            log.append(line)
            if "jlora serve: ready" in line or "following process 0" in line:
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    return proc, ready


def _completion(http: httpx.Client, prompt: str, adapter: str | None) -> str:
    r = http.post("/v1/completions", json={"model": adapter or "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS,
                                           "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _abandoned_stream(http: httpx.Client) -> None:
    """A long streaming request whose client disconnects after its first token: process 0 aborts it."""
    body = {"model": "alpha", "prompt": "go on and on", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert next(r.iter_lines()).startswith("data: ")


def _metric(text: str, name: str) -> float:
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def test_two_process_serve_matches_one_process(tmp_path):
    model = tiny_model_dir(tmp_path)
    root = tmp_path / "adapters"
    adapters = {"alpha": write_adapter(str(root / "alpha"), CONFIG, r=4, seed=4, std=0.3),
                "beta": write_adapter(str(root / "beta"), CONFIG, r=8, seed=8, std=0.3)}
    config = ServeConfig(max_loras_per_batch=2, max_lora_rank=16, max_num_seqs=8, num_pages=64, page_size=16)
    args = ["--model", model, "--served-model-name", "tiny", "--lora", f"alpha={adapters['alpha']}",
            "--lora-root", str(root), "--tp", "2", "--max-loras-per-batch", "2", "--max-lora-rank", "16",
            "--max-num-seqs", "8", "--num-pages", "64", "--page-size", "16", "--grpc-port", "0", "--http-port", "0"]
    port = _free_port()
    logs = [[], []]
    procs = [_start(args, i, port, logs[i]) for i in range(2)]
    try:
        for proc, ready in procs:
            assert ready.wait(TIMEOUT_S) and proc.poll() is None, "".join(logs[0] + logs[1])[-5000:]
        url = re.search(r"HTTP (http://\S+)", "".join(logs[0])).group(1)
        with httpx.Client(base_url=url, timeout=TIMEOUT_S) as http:
            first = [_completion(http, p, a) for p, a in REQUESTS[:2]]
            r = http.post("/v1/load_lora_adapter", json={"lora_name": "beta", "lora_path": adapters["beta"]})
            assert r.status_code == 200, r.text
            _abandoned_stream(http)
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                rest = list(pool.map(lambda pa: _completion(http, *pa), REQUESTS[2:]))
            metrics = http.get("/metrics").text
        procs[0][0].send_signal(signal.SIGTERM)
        codes = [proc.wait(TIMEOUT_S) for proc, _ in procs]
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert codes == [0, 0], "".join(logs[0] + logs[1])[-5000:]
    follower = re.search(r"stopped: (\d+) steps, (\d+) tokens generated", "".join(logs[1]))
    assert follower, "".join(logs[1])[-3000:]
    assert int(follower.group(1)) == _metric(metrics, "jlora_engine_steps_total")
    assert int(follower.group(2)) == _metric(metrics, "jlora_generation_tokens_total")
    assert _metric(metrics, "jlora_generation_tokens_total") < len(REQUESTS) * MAX_TOKENS + 100  # the abort

    llm = LLM(model, adapters=adapters, bank=config.bank(), progress=False,
              engine=EngineConfig(max_num_seqs=8, num_pages=64, page_size=16))
    ref = llm.generate([p for p, _ in REQUESTS], adapter=[a for _, a in REQUESTS],
                       sampling=SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
    assert first + rest == [o.text for o in ref]
    assert len(set(first + rest)) == len(REQUESTS)  # adapters and prompts really differ
