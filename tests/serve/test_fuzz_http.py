"""Hypothesis over the HTTP request schemas (types, ranges, unicode, lone surrogates, NUL, sizes, nesting): every
case gets a 2xx or a clear 4xx JSON error, never a 5xx, and afterwards a canary request returns its known greedy
text, so no case hurt the server."""

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

CANARY = {"model": "alpha", "prompt": "canary", "max_tokens": 4, "temperature": 0}
EXAMPLES = 60  # per schema; the whole file stays well under a minute on two cores

text = st.one_of(st.text(max_size=40), st.sampled_from(["", "\x00", "\ud800", "a\udfffb", "\U0010ffff", "x" * 300]))
ints = st.one_of(st.integers(-3, 300), st.sampled_from([-1, 0, 1 << 31, (1 << 32), 1 << 63, -(1 << 63)]),
                 st.integers(min_value=10 ** 30, max_value=10 ** 31))
floats = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([0.0, 1e-9, 1.0, 2.0, 1e300]))
leaf = st.one_of(st.none(), st.booleans(), ints, floats, text)
nested = st.recursive(leaf, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                    st.dictionaries(text, inner, max_size=3)), max_leaves=8)
value = st.one_of(leaf, nested)
sampling = st.fixed_dictionaries({}, optional={
    "temperature": st.one_of(floats, value), "top_p": st.one_of(floats, value), "top_k": st.one_of(ints, value),
    "max_tokens": st.one_of(st.integers(-2, 8), value), "seed": st.one_of(ints, value),
    "stop": st.one_of(st.lists(text, max_size=20), text, value), "stop_token_ids": st.one_of(st.lists(ints), value),
    "ignore_eos": st.one_of(st.booleans(), value), "stream": st.one_of(st.booleans(), value),
    "n": value, "logprobs": value, "stream_options": value})
models = st.one_of(st.sampled_from(["tiny", "alpha", "beta", "gamma", "", "base", "nope"]), value)


def _prompt():
    return st.one_of(text, st.lists(st.integers(-2, 120), max_size=6), st.lists(text, max_size=2), value)


completion = st.builds(lambda s, m, p: {**s, "model": m, "prompt": p}, sampling, models, _prompt())
messages = st.one_of(st.lists(st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["user", "system"]), text),
                                                     "content": st.one_of(text, value)}), max_size=3), value)
chat = st.builds(lambda s, m, msgs: {**s, "model": m, "messages": msgs}, sampling, models, messages)
generate = st.builds(lambda s, t, ids, lp: {"text": t, "input_ids": ids, "sampling_params": {**s, "lora_path": lp,
                                                                                            "max_new_tokens": 4}},
                     sampling, st.one_of(text, st.none()), st.one_of(st.none(), st.lists(st.integers(-1, 99))),
                     st.one_of(st.none(), text, st.sampled_from(["alpha", "/etc", "/x\x00y"])))
raw_bodies = st.one_of(st.binary(max_size=64), st.sampled_from([
    b"[" * 50_000, b'{"prompt": "' + b"\xff\xfe" + b'"}', b'{"max_tokens": ' + b"7" * 5000 + b"}",
    b'{"prompt": "hi", "temperature": Infinity}', b'{"prompt": "\\ud800"}', b"{}", b"null"]))


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=served.http_url, timeout=300) as c:
        yield c


@pytest.fixture(scope="module")
def canary(http, served):
    r = http.post("/v1/completions", json=CANARY)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _send(http, path, body: bytes):
    r = http.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code < 500, (path, body[:300], r.text[:500])
    if r.status_code >= 400:
        error = r.json()["error"]
        assert error["code"] == r.status_code and error["message"], r.text
    elif "text/event-stream" in r.headers.get("content-type", ""):
        assert r.text.rstrip().endswith("data: [DONE]"), r.text[-300:]
    return r


def _check_canary(http, canary):
    r = http.post("/v1/completions", json=CANARY)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == canary, r.text


def _dump(body) -> bytes:
    return json.dumps(body, ensure_ascii=True).encode()  # lone surrogates travel as \\ud800 escapes


FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@FUZZ
@given(body=completion)
def test_fuzz_completions(http, canary, body):
    _send(http, "/v1/completions", _dump(body))
    _check_canary(http, canary)


@FUZZ
@given(body=chat)
def test_fuzz_chat(http, canary, body):
    _send(http, "/v1/chat/completions", _dump(body))
    _check_canary(http, canary)


@FUZZ
@given(body=generate)
def test_fuzz_generate(http, canary, body):
    _send(http, "/generate", _dump(body))
    _check_canary(http, canary)


@settings(FUZZ, max_examples=30)
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/generate", "/v1/load_lora_adapter",
                             "/v1/unload_lora_adapter"]), raw=raw_bodies)
def test_fuzz_raw_bodies(http, canary, path, raw):
    _send(http, path, raw)
    _check_canary(http, canary)


@settings(FUZZ, max_examples=30)
@given(name=st.one_of(text, value), path=st.one_of(text, value, st.sampled_from(["/", "/etc/passwd", "..", "."])))
def test_fuzz_adapter_loads(http, canary, served, name, path):
    r = _send(http, "/v1/load_lora_adapter", _dump({"lora_name": name, "lora_path": path}))
    assert r.status_code >= 400  # nothing a fuzzer names is an adapter inside the root
    assert served.root not in r.text
    _check_canary(http, canary)
