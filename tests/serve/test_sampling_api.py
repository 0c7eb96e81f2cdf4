"""Sampling fields through the real `openai` client (and gRPC): each one reaches the engine and does what it says;
a bad value is a 400 (INVALID_ARGUMENT) naming the field and never fails a request in flight.

The served model is character-level (`train/tiny.py`): token 3 is "a", 4 is "b", and so on."""

import collections

import grpc
import httpx
import openai
import pytest

from serve_helpers import sse_events
from train.tiny import CHARS, SPECIALS

from jlora.serve.proto import jlora_pb2 as pb
from jlora.serve.proto import jlora_pb2_grpc as pb_grpc

def token(ch: str) -> int:
    return len(SPECIALS) + CHARS.index(ch)


CHAT = [{"role": "user", "content": "hello"}]
PROMPT = "the quick brown fox"
G = dict(model="alpha", max_tokens=24, temperature=0)


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.http_url + "/v1", api_key="unused", max_retries=0, timeout=60)


def text(client, **kw):
    return client.completions.create(prompt=PROMPT, **{**G, **kw}).choices[0].text


@pytest.fixture(scope="module")
def plain(client):
    return text(client, extra_body={"ignore_eos": True})


def test_logit_bias_forces_and_bans_tokens(client, plain):
    assert text(client, logit_bias={"3": 100}, extra_body={"ignore_eos": True}) == "a" * 24
    banned = text(client, logit_bias={str(token(plain[0])): -100}, extra_body={"ignore_eos": True})
    assert plain[0] not in banned and banned != plain
    chat = client.chat.completions.create(messages=CHAT, logit_bias={"4": 100}, **G)
    assert chat.choices[0].message.content == "b" * 24 and chat.usage.completion_tokens == 24


def test_penalties_change_greedy_text_the_way_they_say(client, plain):
    def top_count(s):
        return collections.Counter(s).most_common(1)[0][1]

    assert top_count(plain) > 3, "the plain text must repeat characters for this test to mean anything"
    no_repeats = text(client, extra_body={"repetition_penalty": 1e4, "ignore_eos": True})
    seen = set(PROMPT)
    for ch in no_repeats:  # every character is new: a seen one's positive logit is divided by 10^4
        assert ch not in seen, no_repeats
        seen.add(ch)
    for kw in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        penalized = text(client, extra_body={"ignore_eos": True}, **kw)
        assert penalized != plain and top_count(penalized) < top_count(plain), kw


def test_min_p_1_is_greedy_and_min_tokens_holds_back_stops(client, plain):
    assert text(client, temperature=1.0, seed=5, extra_body={"min_p": 1.0, "ignore_eos": True}) == plain
    stop_id = token(plain[0])
    out = client.completions.create(prompt=PROMPT, **G, extra_body={"stop_token_ids": [stop_id]})
    assert out.choices[0].text == "" and out.choices[0].finish_reason == "stop"
    held = client.completions.create(prompt=PROMPT, **G, extra_body={"stop_token_ids": [stop_id], "min_tokens": 5})
    assert len(held.choices[0].text) >= 5 and held.usage.completion_tokens >= 5


BAD = [({"presence_penalty": 2.5}, "presence_penalty must be a number in [-2, 2]"),
       ({"frequency_penalty": -3}, "frequency_penalty must be a number in [-2, 2]"),
       ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty must be a number in (0, 10000]"),
       ({"extra_body": {"min_p": 1.5}}, "min_p must be a number in [0, 1]"),
       ({"logit_bias": {"abc": 1}}, "logit_bias keys must be token ids"),
       ({"logit_bias": {"5": 101}}, "logit_bias[5] must be a number in [-100, 100]"),
       ({"logit_bias": {"97": 1}}, "logit_bias names token id 97, outside the vocabulary [0, 97)"),
       ({"logit_bias": {str(i): 1 for i in range(301)}}, "at most 300"),
       ({"extra_body": {"min_tokens": 30}}, "min_tokens must be an integer in [0, max_tokens=24]")]


@pytest.mark.parametrize("kwargs, message", BAD, ids=[m for _, m in BAD])
def test_bad_values_are_400_naming_the_field(client, kwargs, message):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(prompt=PROMPT, **G, **kwargs)
    assert message in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(messages=CHAT, **G, **kwargs)
    assert message in e.value.message


def test_a_bad_request_never_fails_one_in_flight(client, served):
    want = text(client, max_tokens=60, extra_body={"ignore_eos": True, "repetition_penalty": 1.2})
    with httpx.Client(base_url=served.http_url, timeout=60) as http, http.stream(
            "POST", "/v1/completions", json={"prompt": PROMPT, **G, "max_tokens": 60, "ignore_eos": True,
                                             "repetition_penalty": 1.2, "stream": True}) as r:
        lines = r.iter_lines()
        parts = [next(lines)]
        for kwargs, _ in BAD:
            with pytest.raises(openai.BadRequestError):
                client.completions.create(prompt=PROMPT, **G, **kwargs)
        parts += list(lines)
    assert "".join(e["choices"][0]["text"] for e in sse_events(parts)) == want
    served.wait_idle()


def test_grpc_takes_the_same_fields(served, plain):
    with grpc.insecure_channel(served.grpc_target) as channel:
        stub = pb_grpc.JloraStub(channel)
        sp = pb.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logit_bias={5: 100.0}, min_p=0.5,
                               presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.1, min_tokens=2)
        out = stub.Generate(pb.GenerateRequest(prompt=PROMPT, adapter="alpha", sampling=sp), timeout=60)
        assert out.text == "c" * 8 and list(out.token_ids) == [5] * 8
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(pb.GenerateRequest(prompt=PROMPT, sampling=pb.SamplingParams(presence_penalty=9)),
                          timeout=60)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "presence_penalty" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(pb.GenerateRequest(prompt=PROMPT, sampling=pb.SamplingParams(logit_bias={-1: 1.0})),
                          timeout=60)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "logit_bias keys" in e.value.details()
