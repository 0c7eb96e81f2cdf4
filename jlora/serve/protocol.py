"""Request validation shared by the gRPC and HTTP front ends, and the one table of error codes.

Front ends turn their wire format into plain fields; `prepare` checks them and returns a `Completion` (prompt
token ids, `SamplingParams`, adapter) or raises `RequestError` naming the field and what it should be.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
from typing import Any

from jlora.errors import (AdapterError, AdapterPathError, CapacityError, JloraError, RequestError,
                          UnknownAdapterError)
from jlora.sampling import SamplingParams, check_text
from jlora.serve.async_engine import DEADLINE_ERROR, ServerClosedError
from jlora.serve.security import AuthError, ForbiddenError
from jlora.structured import StructuredOutput

DEFAULT_MAX_TOKENS = 16  # completions, /generate and gRPC; chat defaults to the rest of the context
BASE_ALIASES = ("", "base")  # `model`/`adapter` values that mean the base model, besides its served name


class OutputError(JloraError):
    """A request failed while it ran (e.g. its adapter's files turned bad); the message says why."""


class DeadlineError(JloraError):
    """The request's deadline passed before it finished."""


class TooLargeError(RequestError):
    """A request body or message is above the server's size limit."""


class UnsupportedMediaError(RequestError):
    """A request body of a content type the endpoint does not take."""


# (error class, gRPC status code name, HTTP status, OpenAI error type). First match wins: subclasses first.
ERROR_TABLE: tuple[tuple[type[BaseException], str, int, str], ...] = (
    (UnknownAdapterError, "NOT_FOUND", 404, "not_found_error"),
    (AdapterPathError, "PERMISSION_DENIED", 403, "permission_error"),
    (AdapterError, "INVALID_ARGUMENT", 400, "invalid_request_error"),
    (TooLargeError, "RESOURCE_EXHAUSTED", 413, "invalid_request_error"),
    (UnsupportedMediaError, "INVALID_ARGUMENT", 415, "invalid_request_error"),
    (AuthError, "UNAUTHENTICATED", 401, "authentication_error"),
    (ForbiddenError, "PERMISSION_DENIED", 403, "permission_error"),
    (RequestError, "INVALID_ARGUMENT", 400, "invalid_request_error"),
    (ServerClosedError, "UNAVAILABLE", 503, "service_unavailable"),
    (CapacityError, "RESOURCE_EXHAUSTED", 429, "rate_limit_error"),
    (DeadlineError, "DEADLINE_EXCEEDED", 504, "timeout"),
    (JloraError, "INTERNAL", 500, "internal_error"),
)


def error_status(error: BaseException) -> tuple[str, int, str]:
    """(gRPC status code name, HTTP status, OpenAI error type) of an error; unknown errors are internal."""
    for cls, grpc_code, http_status, kind in ERROR_TABLE:
        if isinstance(error, cls):
            return grpc_code, http_status, kind
    return "INTERNAL", 500, "internal_error"


def error_message(error: BaseException) -> str:
    """What the client reads: the error's own message, or a generic line for bugs (details go to the log)."""
    if isinstance(error, JloraError):
        return str(error)
    return f"internal error ({type(error).__name__}); see the server log"


def check_output(out) -> None:
    """Raises the error of a request that ended with finish_reason "error" (an `AdapterError` when its
    adapter's files were at fault, else `OutputError`) or "abort" on its deadline."""
    if out.finish_reason == "error":
        if out.error_kind == "adapter":
            raise AdapterError(out.error or "the request's adapter cannot be used", adapter=out.adapter)
        raise OutputError(out.error or "the request failed")
    if out.finish_reason == "abort" and out.error == DEADLINE_ERROR:
        raise DeadlineError("the request's deadline passed before it finished")


@dataclasses.dataclass(frozen=True)
class Completion:
    """A validated request, ready for `AsyncEngine.generate`."""

    prompt_ids: list[int]
    sampling: SamplingParams
    adapter: str | None


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What validation needs to know about the served model."""

    name: str  # the base model's served name
    tokenizer: Any  # jlora.tokenizer.Tokenizer or None
    vocab_size: int
    max_model_len: int

    def adapter_for(self, model: Any, field: str = "model") -> str | None:
        """The adapter a `model` (OpenAI) or `adapter` field selects; None for the base model."""
        if model is None or model in BASE_ALIASES or model == self.name:
            return None
        if not isinstance(model, str):
            raise RequestError(f"{field} must be a string (the base model {self.name!r} or an adapter name), "
                               f"got {show(model)}")
        return model


def show(value) -> str:
    """A client's value, short, for an error message (never the whole of a 4 MiB string or deep list)."""
    return _SHOW.repr(value)


_SHOW = reprlib.Repr(maxlevel=3, maxstring=60, maxother=60, maxlist=8, maxdict=8, maxlong=40)


def _number(fields: dict, key: str, kind=float, default=None):
    """A wire number: `kind` int accepts integral floats (JSON clients send 1.0), float accepts finite numbers.
    Ranges are `SamplingParams`'s to check."""
    value = fields.get(key)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and isinstance(value, float):
        ok = math.isfinite(value) and (kind is float or value.is_integer())
    if not ok:
        raise RequestError(f"{key} must be {'an integer' if kind is int else 'a finite number'}, got {show(value)}")
    return kind(value)


def _logit_bias(value) -> dict[int, float]:
    """OpenAI's logit_bias, {"token id": bias} (JSON keys are strings), as {int: float}."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RequestError(f"logit_bias must be an object of token id -> bias, got {show(value)}")
    out = {}
    for key, bias in value.items():
        if isinstance(key, str) and key.isdigit() and len(key) <= 10:
            key = int(key)
        if not isinstance(key, int) or isinstance(key, bool):
            raise RequestError(f"logit_bias keys must be token ids (integers >= 0), got {show(key)}")
        if not isinstance(bias, (int, float)) or isinstance(bias, bool) or not math.isfinite(bias):
            raise RequestError(f"logit_bias[{key}] must be a finite number, got {show(bias)}")
        out[key] = float(bias)
    return out


def sampling_params(fields: dict[str, Any], *, max_tokens: int, min_tokens_key: str = "min_tokens",
                    logprobs: int | None = None, prompt_logprobs: int | None = None,
                    structured: StructuredOutput | None = None) -> SamplingParams:
    """`SamplingParams` from wire fields: temperature, top_p, top_k, min_p, seed, stop, stop_token_ids, ignore_eos,
    presence_penalty, frequency_penalty, repetition_penalty, logit_bias, min_tokens (`min_tokens_key`), n and
    best_of; the logprobs counts and the structured output come from the front end, whose fields for them differ
    per API (`structured_fields`).
    Types are checked here, values (ranges) by `SamplingParams`; both raise `RequestError` naming the field."""
    stop = fields.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise RequestError(f"stop must be a string or a list of strings, got {show(stop)}")
    stop_ids = fields.get("stop_token_ids") or ()
    if not isinstance(stop_ids, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                          for i in stop_ids):
        raise RequestError(f"stop_token_ids must be a list of integers, got {show(stop_ids)}")
    ignore_eos = fields.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise RequestError(f"ignore_eos must be true or false, got {show(ignore_eos)}")
    return SamplingParams(temperature=_number(fields, "temperature", default=1.0),
                          top_p=_number(fields, "top_p", default=1.0),
                          top_k=_number(fields, "top_k", int, default=0),
                          min_p=_number(fields, "min_p", default=0.0),
                          max_tokens=max_tokens, seed=_number(fields, "seed", int),
                          stop=tuple(stop), stop_token_ids=tuple(stop_ids), ignore_eos=ignore_eos,
                          presence_penalty=_number(fields, "presence_penalty", default=0.0),
                          frequency_penalty=_number(fields, "frequency_penalty", default=0.0),
                          repetition_penalty=_number(fields, "repetition_penalty", default=1.0),
                          min_tokens=_number(fields, min_tokens_key, int, default=0),
                          logit_bias=_logit_bias(fields.get("logit_bias")), logprobs=logprobs,
                          prompt_logprobs=prompt_logprobs, n=_number(fields, "n", int, default=1),
                          best_of=_number(fields, "best_of", int), structured=structured)


def render_chat(info: ModelInfo, messages: Any) -> str:
    """The chat template applied to OpenAI-style messages (content as a string or a list of text parts)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content} objects")
    if info.tokenizer is None or info.tokenizer.chat_template is None:
        raise RequestError("this model has no chat template: send a prompt instead of messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"]:
            raise RequestError(f"messages[{i}] must be an object with a string role and content, got {show(m)}")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise RequestError(f"messages[{i}].content parts must all be {{type: text, text: ...}}")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string, got {show(content)}")
        check_text(f"messages[{i}].role", m["role"])
        check_text(f"messages[{i}].content", content)
        clean.append({"role": m["role"], "content": content})
    try:
        return info.tokenizer.apply_chat_template(clean, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - the template refused these messages (e.g. roles out of order)
        raise RequestError(f"the chat template cannot render these messages: {type(e).__name__}: "
                           f"{str(e)[:200]}") from None


def prompt_ids(info: ModelInfo, prompt: Any = None, token_ids: Any = None, messages: Any = None) -> list[int]:
    """Token ids of exactly one of: a text prompt, token ids, or chat messages."""
    given = [k for k, v in (("prompt", prompt), ("prompt token ids", token_ids), ("messages", messages))
             if v not in (None, "", [])]
    if len(given) > 1:
        raise RequestError(f"send exactly one of a prompt, prompt token ids or messages, got {given}")
    if messages not in (None, []):
        prompt = render_chat(info, messages)
    if token_ids not in (None, []):
        if not isinstance(token_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                      and 0 <= t < info.vocab_size for t in token_ids):
            raise RequestError(f"prompt token ids must be integers in [0, {info.vocab_size})")
        return list(token_ids)
    if prompt is None or prompt == "":
        raise RequestError("prompt is empty")
    if not isinstance(prompt, str):
        raise RequestError(f"prompt must be a string, got {type(prompt).__name__}")
    if info.tokenizer is None:
        raise RequestError("this model has no tokenizer: send prompt token ids")
    check_text("prompt", prompt)
    try:
        ids = info.tokenizer.encode(prompt)
    except Exception as e:  # noqa: BLE001 - the text is at fault, whatever the tokenizer raised
        raise RequestError(f"the prompt cannot be tokenized ({type(e).__name__})") from None
    if not ids:
        raise RequestError("prompt is empty after tokenization")
    return ids


def prepare(info: ModelInfo, fields: dict[str, Any], *, prompt=None, token_ids=None, messages=None,
            adapter: str | None = None, max_tokens_key: str = "max_tokens", min_tokens_key: str = "min_tokens",
            default_max_tokens: int | None = DEFAULT_MAX_TOKENS, logprobs: int | None = None,
            prompt_logprobs: int | None = None, zero_tokens_ok: bool = False,
            structured: StructuredOutput | None = None) -> Completion:
    """Validates one request. `default_max_tokens=None` means the rest of the context; `zero_tokens_ok`: a
    max_tokens of 0 is allowed (completions with echo)."""
    ids = prompt_ids(info, prompt, token_ids, messages)
    ctx = info.max_model_len
    if len(ids) >= ctx:
        raise RequestError(f"prompt of {len(ids)} tokens is too long: the context length is {ctx} tokens, "
                           "prompt and output together")
    max_tokens = _number(fields, max_tokens_key, int)
    if max_tokens is None:
        max_tokens = ctx - len(ids) if default_max_tokens is None else min(default_max_tokens, ctx - len(ids))
    elif max_tokens < (0 if zero_tokens_ok else 1):
        why = "" if zero_tokens_ok else " (0 only when the prompt is echoed or scored)"
        raise RequestError(f"{max_tokens_key} must be an integer >= {int(not zero_tokens_ok)}{why}, "
                           f"got {show(max_tokens)}")
    elif max_tokens > ctx:
        raise RequestError(f"{max_tokens_key} {show(max_tokens)} is above the context length {ctx}")
    elif len(ids) + max_tokens > ctx:
        raise RequestError(f"prompt of {len(ids)} tokens + {max_tokens_key} {max_tokens} exceeds the context "
                           f"length {ctx}: at most {ctx - len(ids)} new tokens fit")
    sp = sampling_params(fields, max_tokens=max_tokens, min_tokens_key=min_tokens_key, logprobs=logprobs,
                         prompt_logprobs=prompt_logprobs, structured=structured)
    return Completion(ids, sp, adapter)
