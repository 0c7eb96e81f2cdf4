"""What the engine hands back for each request after a step, and the text rules of streaming it."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class RequestOutput:
    """A request's state after a step: cumulative `text`, and `delta` (the text new in this step)."""

    request_id: str
    adapter: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    delta: str
    finished: bool
    finish_reason: str | None = None  # "stop", "length", "abort" or "error"
    error: str | None = None  # why it failed or was aborted, for the client
    error_kind: str | None = None  # with finish_reason "error": "adapter" (its adapter's files) or "internal"
    logprobs: list[dict] | None = None  # per output token: {"token", "logprob", "top": {id: logprob}}
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None
    prompt_logprobs: list | None = None  # per prompt token: None for the first, then entries like `logprobs`'
    cumulative_logprob: float | None = None  # sum of the output tokens' logprobs (when they were computed)
    index: int = 0  # which of its prompt's n choices (`LLM.generate`, the servers)


def cause(what: str, error: BaseException) -> str:
    """A client-facing message: what failed and the exception that said so (cut short)."""
    return f"{what}: {type(error).__name__}: {str(error)[:300]}"


def held_back(text: str, stops) -> int:
    """How many characters at the end of `text` could still be the start of one of the `stops`."""
    held = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:k]):
                held = k
                break
    return held
