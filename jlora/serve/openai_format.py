"""OpenAI-compatible request checks, error bodies and server-sent events (choices and their bodies: `choices`)."""

from __future__ import annotations

import json

from jlora.errors import RequestError
from jlora.serve.protocol import show

# Fields this server does not implement, with the value that means "off". A request that sets one to anything
# else is refused by name rather than silently ignored.
UNSUPPORTED = {"n": 1, "best_of": 1, "suffix": None, "tools": None, "response_format": None}


def check_supported(body: dict) -> None:
    for key, off in UNSUPPORTED.items():
        value = body.get(key)
        if value is not None and value != off and not (off is None and value is False):
            raise RequestError(f"{key}={show(value)} is not supported by this server (only {off!r})")
    if not isinstance(body.get("stream", False), bool):
        raise RequestError(f"stream must be true or false, got {show(body.get('stream'))}")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise RequestError(f"stream_options must be an object, got {show(options)}")


def completion_prompt(body: dict):
    """(prompt text, prompt token ids) of a /v1/completions body: a string, token ids, or a list of one of them."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return None, prompt
    if isinstance(prompt, list) and prompt:
        raise RequestError(f"prompt must be one string or one list of token ids; got a batch of {len(prompt)} "
                           "(send one request per prompt)")
    return prompt if prompt is not None else "", None


def error_body(message: str, kind: str, status: int) -> dict:
    return {"error": {"message": message, "type": kind, "code": status, "param": None}}


def sse(event: dict | str) -> bytes:
    """One server-sent event: `data: <json>` (or a literal like [DONE]) and a blank line."""
    data = event if isinstance(event, str) else json.dumps(event, ensure_ascii=False)
    return f"data: {data}\n\n".encode("utf-8", "backslashreplace")  # a lone surrogate stays a JSON escape
