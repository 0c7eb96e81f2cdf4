"""SIGKILL mid-conversion leaves no cache that later loads wrong; SIGKILL mid-serving, then a restart serves the
same greedy text."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import httpx
from helpers import write_adapter
from serve_helpers import CONFIG, tiny_model_dir
from test_serve_cli import _start

# A stand-in for convert_gguf (the real one takes most of a minute on the default model): writes one file, then
# either stops half-way (hangs, to be killed) or finishes the rest.
_CONVERT = textwrap.dedent("""
    import os, sys, time
    import jlora.checkpoint.resolve as resolve

    def convert(gguf_path, out, progress=True):
        with open(os.path.join(out, "config.json"), "w") as f:
            f.write('{"half": true}')
        if sys.argv[1] == "hang":
            time.sleep(600)
        with open(os.path.join(out, "config.json"), "w") as f:
            f.write('{"complete": true}')

    resolve.convert_gguf = convert
    print(resolve.resolve_model_dir(sys.argv[2]), flush=True)
""")


def _converter(mode, gguf, cache):
    return subprocess.Popen([sys.executable, "-c", _CONVERT, mode, gguf], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "JLORA_CACHE": cache, "JAX_PLATFORMS": "cpu"})


def test_sigkill_during_conversion_leaves_no_cache_that_loads(tmp_path):
    gguf, cache = str(tmp_path / "model.gguf"), str(tmp_path / "cache")
    with open(gguf, "wb") as f:
        f.write(b"GGUF" + bytes(60))
    converted = os.path.join(cache, "converted")
    proc = _converter("hang", gguf, cache)
    try:
        end = time.monotonic() + 120
        while time.monotonic() < end:  # wait for the half-written file
            found = [os.path.join(converted, d) for d in os.listdir(converted)] if os.path.isdir(converted) else []
            if any(os.path.exists(os.path.join(d, "config.json")) for d in found):
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the conversion never started")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    left = os.listdir(converted)
    assert left and all(d.startswith(".converting-") for d in left), left  # only the orphan, never the cache
    done = _converter("finish", gguf, cache)
    out = done.communicate(timeout=120)[0].strip()
    assert done.returncode == 0
    assert os.listdir(converted) == [os.path.basename(out)]  # the orphan is gone
    assert open(os.path.join(out, "config.json")).read() == '{"complete": true}'
    assert os.path.exists(os.path.join(out, ".jlora-complete"))


def test_sigkill_while_serving_then_restart_serves_the_same(tmp_path):
    model = tiny_model_dir(tmp_path)
    adapter = write_adapter(str(tmp_path / "adapters" / "a"), CONFIG, r=4, std=0.3)
    args = ["--model", model, "--served-model-name", "tiny", "--lora", f"a={adapter}", "--num-pages", "64"]
    body = {"model": "a", "prompt": "hello", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    texts = []
    for run in range(2):
        proc, _, url, log = _start(args, tmp_path)
        try:
            with httpx.Client(base_url=url, timeout=120) as http:
                texts.append(http.post("/v1/completions", json=body).json()["choices"][0]["text"])
                if run == 0:  # killed with a long stream in flight
                    long = {**body, "max_tokens": 200, "stream": True}
                    with http.stream("POST", "/v1/completions", json=long) as r:
                        assert next(r.iter_lines()).startswith("data: ")
                        proc.send_signal(signal.SIGKILL)
                    assert proc.wait(30) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
    assert texts[0] == texts[1] and texts[0]
