"""Streamed text never shows what a stop string later cuts: the stream's concatenation equals the final text."""

import httpx
import pytest
from serve_helpers import sse_events

BODY = {"model": "beta", "prompt": "hello there", "max_tokens": 40, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def full_text(served):
    with httpx.Client(base_url=served.http_url, timeout=60) as http:
        text = http.post("/v1/completions", json=BODY).json()["choices"][0]["text"]
    assert len(text) >= 12, text
    return text


def _stream(http, stop):
    with http.stream("POST", "/v1/completions", json={**BODY, "stop": stop, "stream": True}) as r:
        assert r.status_code == 200
        events = sse_events(r.iter_lines())
    return "".join(e["choices"][0]["text"] for e in events), events[-1]["choices"][0]["finish_reason"]


def test_stream_equals_final_text_with_stop_strings(served, full_text):
    t = full_text
    with httpx.Client(base_url=served.http_url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json={**BODY, "stream": True}) as r:
            bursts = [e["choices"][0]["text"] for e in sse_events(r.iter_lines())]
    assert "".join(bursts) == t
    ends = [sum(map(len, bursts[:i + 1])) for i in range(len(bursts))]
    cut = next(e for e in ends if 2 <= e <= len(t) - 2)  # a stop string that spans two bursts
    cases = [
        [t[cut - 2:cut + 2]],
        [t[8:11]],  # a real stop, mid-text
        [t[5:7] + "\u2603"],  # starts to match (held back), never completes (released)
        [t[3:5] + "\u2603", t[9:12]],  # a decoy and a real stop
        [t[-2:] + "\u2603"],  # a decoy at the very end: released when the request ends on length
        [t[0]],  # the first character
    ]
    with httpx.Client(base_url=served.http_url, timeout=60) as http:
        for stop in cases:
            final = http.post("/v1/completions", json={**BODY, "stop": stop}).json()["choices"][0]
            streamed, reason = _stream(http, stop)
            assert streamed == final["text"], stop
            assert reason == final["finish_reason"]
            hits = [t.find(s) for s in stop if s in t]
            assert final["text"] == (t[:min(hits)] if hits else t), stop
            assert final["finish_reason"] == ("stop" if hits else "length")
    served.wait_idle()
