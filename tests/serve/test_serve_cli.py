"""`jlora serve` as a process: flags, start-up errors, and SIGTERM draining in-flight requests before exiting."""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading

import grpc
import httpx
import pytest
from helpers import TINY, write_adapter, write_model
from train.tiny import write_tiny_tokenizer

from jlora.cli import build_parser
from jlora.serve.proto import jlora_pb2 as pb
from jlora.serve.proto import jlora_pb2_grpc as pb_grpc

JLORA = os.path.join(os.path.dirname(sys.executable), "jlora")
LONG_CONFIG = dataclasses.replace(TINY, max_position_embeddings=1024)


def test_help_lists_the_flags():
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["serve", "--help"])
    assert e.value.code == 0


def test_flags_parse():
    args = build_parser().parse_args(["serve", "--lora", "a=/x", "--lora", "b=/y", "--lora-root", "/r",
                                      "--max-loras-per-batch", "8", "--max-cpu-loras", "32", "--tp", "2", "--dp", "3",
                                      "--grpc-port", "0", "--http-port", "9000"])
    from jlora.serve.cli import config_from_args
    config = config_from_args(args)
    assert config.loras == (("a", "/x"), ("b", "/y")) and config.lora_roots == ("/r",)
    assert config.engine_config().tp == 2 and config.engine_config().dp == 3
    assert config.engine_config().max_cpu_loras == 32
    assert config.engine_config().bank.slots == (8, 8, 8, 8, 0)  # every bucket up to --max-lora-rank 64
    assert config.engine_config().bank.groups == ("qkv", "o", "gate_up", "down")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--lora", "no-equals-sign"])


def test_lora_target_modules_flag_limits_the_bank():
    from jlora.serve.cli import config_from_args
    args = build_parser().parse_args(["serve", "--lora-target-modules", "q,k,v,o"])
    bank = config_from_args(args).engine_config().bank
    assert bank.modules == ("q_proj", "k_proj", "v_proj", "o_proj") and bank.groups == ("qkv", "o")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--lora-target-modules", "q,lm_head"])


def _start(args, tmp_path):
    proc = subprocess.Popen([JLORA, "serve", *args, "--grpc-port", "0", "--http-port", "0"],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    lines = []
    for line in proc.stderr:
        lines.append(line)
        m = re.search(r"ready: .* gRPC [\d.]+:(\d+), HTTP (http://\S+)", line)
        if m:
            threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
            return proc, int(m.group(1)), m.group(2), lines
    proc.wait(30)
    raise AssertionError("jlora serve did not start:\n" + "".join(lines))


def test_bad_lora_at_start_up_is_a_clean_error(tmp_path):
    model = write_tiny_tokenizer(write_model(str(tmp_path / "m"), TINY))
    r = subprocess.run([JLORA, "serve", "--model", model, "--lora", f"x={tmp_path / 'missing'}"],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 2 and "AdapterError" in r.stderr and "does not exist" in r.stderr


def test_sigterm_drains_in_flight_requests_then_exits(tmp_path):
    model = write_tiny_tokenizer(write_model(str(tmp_path / "m"), LONG_CONFIG))
    adapter = write_adapter(str(tmp_path / "adapters" / "a"), LONG_CONFIG, r=4, std=0.3)
    proc, grpc_port, url, log = _start(["--model", model, "--served-model-name", "tiny", "--lora", f"a={adapter}",
                                        "--lora-root", str(tmp_path / "adapters"), "--num-pages", "80",
                                        "--max-num-seqs", "4"], tmp_path)
    try:
        body = {"model": "a", "prompt": "go", "max_tokens": 1000, "ignore_eos": True, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        with httpx.Client(base_url=url, timeout=120) as http, http.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(signal.SIGTERM)
            health = http.get("/health")  # still listening while it drains, but refusing new work
            assert health.status_code == 503 and health.json() == {"status": "draining"}
            refused = http.post("/v1/completions", json={"model": "a", "prompt": "hi"})
            assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
            with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch, pytest.raises(grpc.RpcError) as e:
                pb_grpc.JloraStub(ch).Generate(pb.GenerateRequest(prompt="hi"), timeout=30)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            events = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
        assert events[-1]["usage"]["completion_tokens"] == 1000  # the in-flight request ran to its end
        assert events[-2]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(60) == 0
        assert "draining 1 in-flight requests" in "".join(log) and "jlora serve: stopped" in "".join(log)
    finally:
        if proc.poll() is None:
            proc.kill()
