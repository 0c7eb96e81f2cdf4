"""OpenAI-compatible request checks, error bodies and server-sent events (choices and their bodies: `choices`)."""

from __future__ import annotations

import json

from jlora.errors import RequestError
from jlora.serve.protocol import show

# Fields this server does not implement, with the value that means "off". A request that sets one to anything
# else is refused by name rather than silently ignored.
UNSUPPORTED = {"suffix": None, "tools": None}


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


MAX_PROMPTS = 64  # prompts of one /v1/completions body


def completion_prompts(body: dict) -> list[tuple[str | None, list[int] | None]]:
    """The (text, token ids) prompts of a /v1/completions body: a string, token ids, or a list of either."""
    prompt = body.get("prompt")
    if prompt is None or isinstance(prompt, str):
        return [(prompt or "", None)]
    if not isinstance(prompt, list) or not prompt:
        raise RequestError(f"prompt must be a string, a list of token ids, or a list of either, got {show(prompt)}")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return [(None, prompt)]
    if len(prompt) > MAX_PROMPTS:
        raise RequestError(f"prompt is a list of {len(prompt)} prompts; at most {MAX_PROMPTS} per request")
    out = []
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            out.append((p, None))
        elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            out.append((None, p))
        else:
            raise RequestError(f"prompt[{i}] must be a string or a non-empty list of token ids, got {show(p)}")
    return out


def error_body(message: str, kind: str, status: int) -> dict:
    return {"error": {"message": message, "type": kind, "code": status, "param": None}}


def sse(event: dict | str) -> bytes:
    """One server-sent event: `data: <json>` (or a literal like [DONE]) and a blank line."""
    data = event if isinstance(event, str) else json.dumps(event, ensure_ascii=False)
    return f"data: {data}\n\n".encode("utf-8", "backslashreplace")  # a lone surrogate stays a JSON escape
