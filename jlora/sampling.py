"""Sampling parameters (validated on the host) and on-device sampling."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jlora.errors import RequestError


SEED_RANGE = (0, 1 << 32)  # the device draws with a uint32 seed
INT32_MAX = (1 << 31) - 1  # top_k, max_tokens and stop ids are int32 on the device
MAX_TEMPERATURE = 1e4  # far past where every token is equally likely; keeps 1 / temperature a normal float32
MAX_STOP = 16  # stop strings per request: each is searched for after every token
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 256


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_text(field: str, text: str) -> None:
    """Text a client sent must be encodable: no lone surrogates (JSON's \\ud800 escapes allow them)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(f"{field} must be valid Unicode text: it holds a lone surrogate") from None


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings, as in vLLM. temperature=0 is greedy; top_k <= 0 and top_p=1 disable those.

    Every field is range-checked here, once, for the library, HTTP and gRPC alike: a value the device cannot
    hold (a seed of 2^32, a top_k of 2^31) is refused with a `RequestError` naming the field and its range,
    never found later inside a step."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_tokens: int = 16
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        for name in ("stop", "stop_token_ids"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)):
                raise RequestError(f"{name} must be a list, got {type(value).__name__}")
            object.__setattr__(self, name, tuple(value))
        t = self.temperature
        if not _is_number(t) or not math.isfinite(t) or not 0 <= t <= MAX_TEMPERATURE:
            raise RequestError(f"temperature must be a finite number in [0, {MAX_TEMPERATURE:g}], got {t!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or not -1 <= self.top_k <= INT32_MAX:
            raise RequestError(f"top_k must be an integer in [-1, {INT32_MAX}] (0 or -1 disables it), "
                               f"got {self.top_k!r}")
        if not _is_int(self.max_tokens) or not 1 <= self.max_tokens <= INT32_MAX:
            raise RequestError(f"max_tokens must be an integer in [1, {INT32_MAX}], got {self.max_tokens!r}")
        lo, hi = SEED_RANGE
        if self.seed is not None and (not _is_int(self.seed) or not lo <= self.seed < hi):
            raise RequestError(f"seed must be an integer in [0, 2^32), got {self.seed!r}")
        if len(self.stop) > MAX_STOP or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS
                                                for s in self.stop):
            raise RequestError(f"stop must be at most {MAX_STOP} non-empty strings of at most {MAX_STOP_CHARS} "
                               f"characters, got {len(self.stop)} of lengths "
                               f"{[len(s) if isinstance(s, str) else type(s).__name__ for s in self.stop[:MAX_STOP]]}")
        for s in self.stop:
            check_text("stop", s)
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS or not all(
                _is_int(i) and 0 <= i <= INT32_MAX for i in self.stop_token_ids):
            raise RequestError(f"stop_token_ids must be at most {MAX_STOP_TOKEN_IDS} integers in [0, {INT32_MAX}]")
        if not isinstance(self.ignore_eos, bool):
            raise RequestError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")


def sample(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
           keys: jax.Array, greedy_only: bool | None = None) -> jax.Array:
    """Draws one token per row.

    Args:
      logits: [B, V] float32.
      temperature: [B] float32; 0 means greedy.
      top_k: [B] int32; <= 0 keeps every token.
      top_p: [B] float32 in (0, 1].
      keys: [B] PRNG keys, one per row (reproducible per request).
      greedy_only: static: True if the caller knows every row is greedy, False to draw without checking, None to
        check on the device. The check is a conditional, whose predicate XLA's GPU runtime reads back to the host:
        inside a loop of decode steps that stalls the device once per step.
    Returns:
      [B] int32 token ids.
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if greedy_only is not None:
        return greedy if greedy_only else _draw(logits, temperature, top_k, top_p, keys, greedy)
    # The vocabulary sort is skipped when every row is greedy.
    return jax.lax.cond(jnp.all(temperature <= 0), lambda: greedy,
                        lambda: _draw(logits, temperature, top_k, top_p, keys, greedy))


def _draw(logits, temperature, top_k, top_p, keys, greedy):
    V = logits.shape[-1]
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    order = jnp.argsort(-scaled, axis=-1)
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    rank = jnp.arange(V)[None, :]
    k = jnp.where(top_k <= 0, V, top_k)[:, None]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability mass strictly above each token
    keep = (rank < k) & ((before < top_p[:, None]) | (rank == 0))
    masked = jnp.where(keep, sorted_logits, -jnp.inf)
    choice = jax.vmap(jax.random.categorical)(keys, masked)
    sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)
