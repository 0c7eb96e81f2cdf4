"""Logprobs and echo through the real `openai` client and gRPC: the shapes OpenAI clients read, streamed and not,
and the echoed prompt's logprobs (an extra forward) equal to the generated tokens' (the paged steps) within 1e-4.
The engine's values against a reference forward: tests/engine/test_sampling_engine.py."""

import grpc
import openai
import pytest

from jlora.serve.proto import jlora_pb2 as pb
from jlora.serve.proto import jlora_pb2_grpc as pb_grpc

PROMPT = "the quick brown fox"
CHAT = [{"role": "user", "content": "hello"}]
# The model's 97 ids run past the tokenizer's 81: the texts here ban the rest, so one character is one token.
UNKNOWN = range(81, 97)
G = dict(model="beta", temperature=0, logit_bias={str(i): -100 for i in UNKNOWN}, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.http_url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def generated(client):
    return client.completions.create(prompt=PROMPT, max_tokens=12, logprobs=3, **G)


def test_completion_logprobs_have_the_legacy_shape(generated):
    choice = generated.choices[0]
    lp = choice.logprobs
    n = generated.usage.completion_tokens
    assert n == 12 and len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert "".join(lp.tokens) == choice.text  # one character per token
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(n)]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and len(top) in (3, 4) and top[token] == value
        # greedy takes the most likely of the tokens it may (raw logprobs: the banned ones still show)
        assert value == max(v for k, v in top.items() if not k.startswith("token_id:"))


def test_echo_scores_the_prompt_like_the_steps_that_generated_it(client, generated):
    text = PROMPT + generated.choices[0].text
    assert len(text) == len(PROMPT) + 12
    echo = client.completions.create(prompt=text, max_tokens=0, echo=True, logprobs=2, model="beta")
    choice, lp = echo.choices[0], echo.choices[0].logprobs
    assert choice.text == text and choice.finish_reason == "length"
    assert echo.usage.prompt_tokens == len(text) and echo.usage.completion_tokens == 0
    assert "".join(lp.tokens) == text and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    tail = lp.token_logprobs[len(PROMPT):]
    assert tail == pytest.approx(generated.choices[0].logprobs.token_logprobs, abs=1e-4)
    assert all(len(t) in (2, 3) for t in lp.top_logprobs[1:])
    plain_echo = client.completions.create(prompt=PROMPT, max_tokens=4, echo=True, **G)
    assert plain_echo.choices[0].text.startswith(PROMPT) and plain_echo.choices[0].logprobs is None
    assert len(plain_echo.choices[0].text) == len(PROMPT) + 4


def test_streamed_logprobs_and_echo_add_up_to_the_body(client, generated):
    chunks = list(client.completions.create(prompt=PROMPT, max_tokens=12, logprobs=3, stream=True, **G))
    tokens = [t for c in chunks for t in c.choices[0].logprobs.tokens]
    values = [v for c in chunks for v in c.choices[0].logprobs.token_logprobs]
    assert tokens == generated.choices[0].logprobs.tokens
    assert values == pytest.approx(generated.choices[0].logprobs.token_logprobs, abs=1e-6)
    echoed = list(client.completions.create(prompt=PROMPT, max_tokens=3, logprobs=1, echo=True, stream=True, **G))
    lp = [c.choices[0].logprobs for c in echoed]
    assert "".join(c.choices[0].text for c in echoed) == "".join(t for x in lp for t in x.tokens)
    offsets = [o for x in lp for o in x.text_offset]
    assert offsets == list(range(len(PROMPT) + 3)) and lp[0].token_logprobs[0] is None


def test_chat_logprobs_and_top_logprobs(client):
    out = client.chat.completions.create(messages=CHAT, max_tokens=6, logprobs=True, top_logprobs=2, **G)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens == 6
    assert "".join(c.token for c in content) == out.choices[0].message.content
    for c in content:
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].token == c.token and c.bytes == list(c.token.encode())
        assert c.top_logprobs[0].logprob == pytest.approx(c.logprob) and c.top_logprobs[1].logprob <= c.logprob
    chunks = list(client.chat.completions.create(messages=CHAT, max_tokens=6, logprobs=True, top_logprobs=2,
                                                 stream=True, **G))
    streamed = [c for ch in chunks if ch.choices and ch.choices[0].logprobs for c in ch.choices[0].logprobs.content]
    assert [(c.token, round(c.logprob, 5)) for c in streamed] == [(c.token, round(c.logprob, 5)) for c in content]
    assert client.chat.completions.create(messages=CHAT, max_tokens=2, **G).choices[0].logprobs is None


BAD_COMPLETIONS = [(dict(logprobs=21), "logprobs must be an integer in [0, 20] or null"),
                   (dict(extra_body={"top_logprobs": 2}), "top_logprobs is a chat completions field"),
                   (dict(echo="yes"), "echo must be true or false"),
                   (dict(max_tokens=0), "max_tokens must be an integer >= 1 (0 only when the prompt is echoed")]
BAD_CHAT = [(dict(logprobs=True, top_logprobs=21), "top_logprobs must be an integer in [0, 20] or null"),
            (dict(top_logprobs=2), "top_logprobs needs logprobs: true"),
            (dict(extra_body={"echo": True}), "echo=True is not supported for chat completions"),
            (dict(max_tokens=0, extra_body={"echo": True}), "echo=True is not supported")]


@pytest.mark.parametrize("kwargs, message", BAD_COMPLETIONS, ids=[m for _, m in BAD_COMPLETIONS])
def test_bad_completion_logprobs_are_400(client, kwargs, message):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(prompt=PROMPT, model="beta", **{"max_tokens": 4, **kwargs})
    assert message in e.value.message


@pytest.mark.parametrize("kwargs, message", BAD_CHAT, ids=[m for _, m in BAD_CHAT])
def test_bad_chat_logprobs_are_400(client, kwargs, message):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(messages=CHAT, model="beta", **{"max_tokens": 4, **kwargs})
    assert message in e.value.message


def test_grpc_logprobs_and_prompt_logprobs(served, generated):
    with grpc.insecure_channel(served.grpc_target) as channel:
        stub = pb_grpc.JloraStub(channel)
        sp = pb.SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3, prompt_logprobs=1,
                               logit_bias={i: -100.0 for i in UNKNOWN})
        req = pb.GenerateRequest(prompt=PROMPT, adapter="beta", sampling=sp)
        out = stub.Generate(req, timeout=60)
        want = generated.choices[0].logprobs.token_logprobs
        assert [t.logprob for t in out.logprobs] == pytest.approx(want, abs=1e-6)
        assert [t.token_id for t in out.logprobs] == list(out.token_ids)
        assert all(len(t.top) == 3 and t.top[0].logprob >= t.top[1].logprob for t in out.logprobs)
        assert out.cumulative_logprob == pytest.approx(sum(want), abs=1e-4)
        assert len(out.prompt_logprobs) == len(PROMPT) and not out.prompt_logprobs[0].HasField("logprob")
        assert all(t.HasField("logprob") and len(t.top) == 1 for t in out.prompt_logprobs[1:])
        parts = list(stub.GenerateStream(req, timeout=60))
        assert [t.logprob for p in parts for t in p.logprobs] == pytest.approx(want, abs=1e-6)
        assert [len(p.prompt_logprobs) for p in parts] == [len(PROMPT)] + [0] * (len(parts) - 1)
        scored = stub.Generate(pb.GenerateRequest(prompt=PROMPT, sampling=pb.SamplingParams(
            max_tokens=0, prompt_logprobs=0)), timeout=60)
        assert scored.finish_reason == "length" and not scored.token_ids and len(scored.prompt_logprobs) == len(PROMPT)
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(pb.GenerateRequest(prompt=PROMPT, sampling=pb.SamplingParams(logprobs=21)), timeout=60)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "logprobs must be an integer" in e.value.details()
