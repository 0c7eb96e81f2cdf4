"""One request's state as the scheduler sees it. Pure Python."""

from __future__ import annotations

import dataclasses
import enum
import time
from typing import Any

from jlora.engine.prefix_cache import BASE_SALT


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Sequence:
    """A request: its tokens, its pages, and how much of it the KV cache already holds.

    `num_computed` tokens of `token_ids` have their keys and values cached. A step computes the next chunk of
    `token_ids[num_computed:]`; when that reaches the end, the step samples one new token.
    """

    request_id: str
    prompt_ids: list[int]
    sampling: Any  # jlora.sampling.SamplingParams
    adapter: str | None = None  # the identity of the adapter registration it holds (`AdapterStore.acquire`)
    adapter_name: str | None = None  # the name the request gave
    output_ids: list[int] = dataclasses.field(default_factory=list)
    status: Status = Status.WAITING
    pages: list[int] = dataclasses.field(default_factory=list)
    num_computed: int = 0
    arrival_time: float = dataclasses.field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None
    finish_reason: str | None = None
    num_preemptions: int = 0
    want_logprobs: bool = False
    num_top: int = 0  # with want_logprobs: how many of the most likely tokens each logprobs entry names
    prompt_logprobs: list | None = None  # `logprobs.score_prompts` entries, when the request asks
    sampling_seed: int = 0  # the request's seed, or one drawn for it: sampling is reproducible per request
    order: int = 0  # admission order; the newest running sequence is preempted first
    cache_salt: str = BASE_SALT  # names the weights its KV comes from (`prefix_cache`): base, or one registration
    block_hashes: list[bytes] = dataclasses.field(default_factory=list)  # prefix-cache keys of its first blocks
    num_cached_pages: int = 0  # its first pages that are committed to the prefix cache (or came from it)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def remaining(self) -> int:
        """Tokens whose KV is not cached yet."""
        return self.num_tokens - self.num_computed

    @property
    def tokens_left(self) -> int:
        """Tokens it may still sample before max_tokens."""
        return self.sampling.max_tokens - len(self.output_ids)

    @property
    def structured(self) -> bool:
        """Whether its output follows a grammar: every token it samples needs a mask from the host first."""
        return self.sampling.structured is not None

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED
