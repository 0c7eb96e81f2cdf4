"""Request validation and the error table, without a server."""

import pytest
from train.tiny import tiny_tokenizer

from jlora.errors import (AdapterError, AdapterPathError, CapacityError, ModelLoadError, RequestError,
                          UnknownAdapterError)
from jlora.serve.async_engine import ServerClosedError
from jlora.serve.protocol import ModelInfo, TooLargeError, error_status, prepare

INFO = ModelInfo("tiny", tiny_tokenizer(), vocab_size=97, max_model_len=64)


@pytest.mark.parametrize("error, grpc_code, http", [
    (UnknownAdapterError("x"), "NOT_FOUND", 404), (AdapterPathError("x"), "PERMISSION_DENIED", 403),
    (AdapterError("x"), "INVALID_ARGUMENT", 400), (RequestError("x"), "INVALID_ARGUMENT", 400),
    (TooLargeError("x"), "RESOURCE_EXHAUSTED", 413), (ServerClosedError("x"), "UNAVAILABLE", 503),
    (CapacityError("x"), "RESOURCE_EXHAUSTED", 429), (ModelLoadError("x"), "INTERNAL", 500),
    (ValueError("x"), "INTERNAL", 500)])
def test_error_table(error, grpc_code, http):
    assert error_status(error)[:2] == (grpc_code, http)


@pytest.mark.parametrize("kwargs, fields, message", [
    (dict(prompt=""), {}, "prompt is empty"),
    (dict(), {}, "prompt is empty"),
    (dict(prompt="a" * 64), {}, "prompt of 64 tokens is too long"),
    (dict(prompt="hi"), {"temperature": -0.5}, "temperature must be a finite number in [0, 10000]"),
    (dict(prompt="hi"), {"temperature": "hot"}, "temperature must be a finite number"),
    (dict(prompt="hi"), {"top_p": 0}, "top_p must be in (0, 1]"),
    (dict(prompt="hi"), {"top_p": 1.5}, "top_p must be in (0, 1]"),
    (dict(prompt="hi"), {"max_tokens": 0}, "max_tokens must be an integer >= 1"),
    (dict(prompt="hi"), {"max_tokens": 65}, "max_tokens 65 is above the context length 64"),
    (dict(prompt="hi"), {"max_tokens": 63}, "at most 62 new tokens fit"),
    (dict(prompt="hi"), {"max_tokens": 2.5}, "max_tokens must be an integer"),
    (dict(prompt="hi"), {"stop": [1]}, "stop must be a string or a list of strings"),
    (dict(prompt="hi", token_ids=[1]), {}, "exactly one of"),
    (dict(token_ids=[1, 500]), {}, "integers in [0, 97)"),
    (dict(messages=[{"content": "x"}]), {}, "messages[0] must be an object"),
])
def test_bad_requests_name_the_problem(kwargs, fields, message):
    with pytest.raises(RequestError) as e:
        prepare(INFO, fields, **kwargs)
    assert message in str(e.value)


def test_defaults_and_adapter_selection():
    c = prepare(INFO, {"temperature": 0}, prompt="hi")
    assert c.prompt_ids == INFO.tokenizer.encode("hi") and c.sampling.max_tokens == 16
    assert prepare(INFO, {}, prompt="hi", default_max_tokens=None).sampling.max_tokens == 62
    assert [INFO.adapter_for(m) for m in (None, "", "base", "tiny", "pirate")] == [None] * 4 + ["pirate"]
    with pytest.raises(RequestError, match="model must be a string"):
        INFO.adapter_for(3)
