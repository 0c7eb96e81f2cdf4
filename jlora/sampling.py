"""Sampling parameters (validated on the host) and on-device sampling."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jlora.errors import RequestError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings, as in vLLM. temperature=0 is greedy; top_k <= 0 and top_p=1 disable those."""

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
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        t = self.temperature
        if not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise RequestError(f"temperature must be a finite number >= 0, got {t!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise RequestError(f"top_k must be an integer >= -1 (0 or -1 disables it), got {self.top_k!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise RequestError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise RequestError(f"seed must be an integer, got {self.seed!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise RequestError(f"stop must be non-empty strings, got {self.stop!r}")
        if not all(isinstance(i, int) and i >= 0 for i in self.stop_token_ids):
            raise RequestError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")


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
