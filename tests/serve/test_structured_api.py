"""Structured output through the real `openai` client (response_format, vLLM's structured_outputs and guided_*
fields), SGLang's /generate and gRPC, on the tiny served model: the outputs follow their schema, regex or grammar,
and a spec that does not compile is a 400 (INVALID_ARGUMENT) of that request alone. gRPC's n and best_of too."""

import json
import re

import grpc
import httpx
import jsonschema
import openai
import pytest
from train.tiny import tiny_tokenizer

from jlora.serve.proto import jlora_pb2 as pb
from jlora.serve.proto import jlora_pb2_grpc as pb_grpc

# The tiny vocabulary has letters, digits, space and .,!?':{}"+ (no brackets, no minus).
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "age"], "additionalProperties": False}
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
PATTERN = r"(yes|no)!"
S = dict(model="alpha", temperature=1.0, max_tokens=40)
MESSAGES = [{"role": "user", "content": "a person"}]


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.http_url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_json_schema_through_chat_and_completions(client, served):
    chat = client.chat.completions.create(messages=MESSAGES, response_format=FORMAT, seed=1, n=2, **S)
    texts = [c.message.content for c in chat.choices]
    done = client.completions.create(prompt="person: ", seed=2, extra_body={"response_format": FORMAT}, **S)
    texts.append(done.choices[0].text)
    parts = client.chat.completions.create(messages=MESSAGES, response_format=FORMAT, seed=3, stream=True, **S)
    texts.append("".join(p.choices[0].delta.content or "" for p in parts))
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert chat.choices[0].finish_reason == "stop" and len(set(texts)) > 1
    served.wait_idle()


def test_json_object_and_text(client):
    tok = tiny_tokenizer()
    short = {str(tok.encode(c)[0]): 5.0 for c in '"}'}  # a random model's keys and strings end soon
    out = client.chat.completions.create(messages=MESSAGES, response_format={"type": "json_object"}, seed=4,
                                         logit_bias=short, **S).choices[0]
    assert out.finish_reason == "stop" and isinstance(json.loads(out.message.content), dict)
    plain = dict(messages=MESSAGES, seed=5, **S)
    assert client.chat.completions.create(response_format={"type": "text"}, **plain).choices[0].message.content \
        == client.chat.completions.create(**plain).choices[0].message.content


def test_vllm_fields(client):
    for extra in ({"structured_outputs": {"regex": PATTERN}}, {"guided_regex": PATTERN}):
        out = client.completions.create(prompt="ok? ", seed=6, extra_body=extra, **S).choices[0]
        assert re.fullmatch(PATTERN, out.text) and out.finish_reason == "stop"
    pick = client.completions.create(prompt="pick: ", seed=7, extra_body={"structured_outputs": {
        "choice": ["red", "green", "blue"]}}, **S).choices[0]
    assert pick.text in ("red", "green", "blue")
    gbnf = client.completions.create(prompt="n: ", seed=8, extra_body={"guided_grammar": 'root ::= "n" [0-9] [0-9]'},
                                     **S).choices[0]
    assert re.fullmatch(r"n[0-9]{2}", gbnf.text)
    obj = client.completions.create(prompt="{", seed=9, extra_body={"structured_outputs": {"json": SCHEMA}},
                                    **S).choices[0]
    jsonschema.validate(json.loads(obj.text), SCHEMA)


@pytest.mark.parametrize("extra, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "invalid json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "json_schema.schema must be"),
    ({"response_format": {"type": "xml"}}, "response_format must be"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "invalid regex"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "exactly one of"),
    ({"structured_outputs": {"regex": "a", "whitespace_pattern": " "}}, "whitespace_pattern is not supported"),
    ({"guided_grammar": "root ::= ("}, "invalid grammar"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "ask for structured output once"),
    ({"response_format": {"type": "json_object"}, "min_tokens": 2}, "min_tokens"),
])
def test_bad_specs_are_400(client, extra, message):
    with pytest.raises(openai.BadRequestError, match=re.escape(message)):
        client.completions.create(prompt="x", extra_body=extra, **S)


def test_generate_takes_sglang_fields(served):
    for params, check in (({"regex": PATTERN}, lambda t: re.fullmatch(PATTERN, t)),
                          ({"json_schema": json.dumps(SCHEMA)}, lambda t: jsonschema.validate(json.loads(t), SCHEMA)
                           is None),
                          ({"ebnf": 'root ::= "a" | "b"'}, lambda t: t in ("a", "b"))):
        r = httpx.post(served.http_url + "/generate", timeout=60, json={
            "text": "go ", "sampling_params": {"temperature": 1.0, "max_new_tokens": 40, "seed": 1, **params}})
        assert r.status_code == 200 and check(r.json()["text"]), r.text
    r = httpx.post(served.http_url + "/generate", json={"text": "go", "sampling_params": {"regex": "("}}, timeout=60)
    assert r.status_code == 400 and "invalid regex" in r.json()["error"]["message"]


def test_grpc_structured_and_choices(served):
    with grpc.insecure_channel(served.grpc_target) as channel:
        stub = pb_grpc.JloraStub(channel)
        sp = pb.SamplingParams(temperature=1.0, max_tokens=40, seed=3, json_schema=json.dumps(SCHEMA), n=3)
        out = stub.Generate(pb.GenerateRequest(prompt="person: ", adapter="beta", sampling=sp), timeout=60)
        assert [c.index for c in out.choices] == [0, 1, 2] and out.text == out.choices[0].text
        for c in out.choices:
            jsonschema.validate(json.loads(c.text), SCHEMA)
        assert out.usage.completion_tokens == sum(len(c.token_ids) for c in out.choices)
        single = stub.Generate(pb.GenerateRequest(prompt="person: ", adapter="beta", sampling=pb.SamplingParams(
            temperature=1.0, max_tokens=40, seed=4, json_schema=json.dumps(SCHEMA))), timeout=60)
        assert single.text == out.choices[1].text  # choice j samples with seed + j
        parts = list(stub.GenerateStream(pb.GenerateRequest(prompt="ok? ", sampling=pb.SamplingParams(
            temperature=1.0, max_tokens=20, seed=5, regex=PATTERN, n=2)), timeout=60))
        for k in (0, 1):
            mine = [p for p in parts if p.index == k]
            assert mine[-1].finished and re.fullmatch(PATTERN, "".join(p.text for p in mine))
        best = stub.Generate(pb.GenerateRequest(prompt="ok? ", sampling=pb.SamplingParams(
            temperature=1.0, max_tokens=20, seed=5, n=1, best_of=3)), timeout=60)
        assert len(best.choices) == 1 and not best.logprobs  # logprobs computed to pick, not asked for
        for sampling, message in ((pb.SamplingParams(regex="("), "invalid regex"),
                                  (pb.SamplingParams(json_schema=""), "needs its schema"),
                                  (pb.SamplingParams(n=2, best_of=3), "cannot be streamed")):
            with pytest.raises(grpc.RpcError) as e:
                list(stub.GenerateStream(pb.GenerateRequest(prompt="x", sampling=sampling), timeout=60))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in e.value.details()
    served.wait_idle()
