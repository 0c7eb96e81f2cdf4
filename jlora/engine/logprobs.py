"""Logprobs as requests see them: entries for sampled tokens (from a step's outputs) and prompt logprobs (echo).

Prompt logprobs need the logits of every prompt position, which the paged step never makes (it keeps only each
row's last). They come from one extra forward over the whole prompt, for the requests that ask alone, before the
request is scheduled: `PromptScorer` holds such requests, scores them together (rows padded to power-of-two
lengths within the token budget: one program per (rows, length) bucket) and hands them on. A request with
max_tokens=0 then finishes without ever being scheduled.

Every value is log_softmax of the raw float32 logits (vLLM's default): the distribution the model produced,
before penalties, temperature and truncation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jlora.config import ModelConfig, RuntimeConfig
from jlora.errors import RequestError
from jlora.model.sequences import sequence_logits

MIN_LENGTH = 16  # the shortest padded prompt: short prompts share one program


def check_logprobs(sp, num_logprobs: int, processes: int = 1) -> None:
    """Raises `RequestError` if the engine cannot give what `sp` asks: more top logprobs than it computes, or
    prompt logprobs on a mesh of several processes (the extra forward runs on process 0's devices alone)."""
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(sp, name)
        if value is not None and value > num_logprobs:
            raise RequestError(f"{name} must be at most {num_logprobs} on this engine, got {value}")
    if sp.prompt_logprobs is not None and processes > 1:
        raise RequestError("prompt logprobs (echo with logprobs) run within one process; this engine's mesh spans "
                           f"{processes} processes")


def entry(token: int, logprob: float, top_ids, top_logprobs, k: int) -> dict:
    """One token's logprobs: {"token", "logprob", "top": {id: logprob} of the k most likely, best first}."""
    return {"token": int(token), "logprob": float(logprob),
            "top": dict(zip(map(int, top_ids[:k]), map(float, top_logprobs[:k])))}


@functools.partial(jax.jit, static_argnames=("config", "runtime", "num", "model"))
def prompt_logprobs(params, bank, tokens, lora_ids, *, config: ModelConfig, runtime: RuntimeConfig, num: int,
                    model=None):
    """Semantics: for t < T - 1, with lp = log_softmax(forward(tokens)[b, t]) in float32,
    picked[b, t] = lp[tokens[b, t + 1]] and (top ids, top lp)[b, t] = the `num` largest of lp.

    Args:
      tokens: [B, T] int32 from position 0; padding at a row's end changes nothing before it.
      lora_ids: [B] int32 global adapter slot per row, -1 for the base model.
      model: the `ShardedModel` whose mesh holds params and bank, or None (one device).
    Returns:
      picked [B, T - 1] float32, top ids [B, T - 1, num] int32, top lp [B, T - 1, num] float32.
    """
    logits = sequence_logits(params, bank, tokens, lora_ids, config=config, runtime=runtime, model=model)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    top_lp, top_ids = jax.lax.top_k(logp, num)
    return picked, top_ids, top_lp


def _pow2(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


def plan(lengths: list[int], token_budget: int) -> list[tuple[list[int], int, int]]:
    """[(row indices, padded rows B, padded length T)]: longest first, T the power of two at or above a call's
    longest row (at least MIN_LENGTH), B the power of two at or above its rows, B * T within the budget (at least
    one row a call)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    calls, start = [], 0
    while start < len(order):
        T = max(MIN_LENGTH, _pow2(lengths[order[start]]))
        cap = max(1, token_budget // T)
        rows = order[start:start + (1 << (cap.bit_length() - 1))]
        calls.append((rows, _pow2(len(rows)), T))
        start += len(rows)
    return calls


def score_prompts(params, bank, rows: list[tuple[list[int], int, int]], *, config: ModelConfig,
                  runtime: RuntimeConfig, num: int, token_budget: int, model=None) -> list[list]:
    """Prompt logprobs of (prompt ids, global slot or -1, k) rows: per prompt token, None for the first, then
    `entry` dicts with the k most likely. On `model`'s mesh if given (calls of a multiple of its dp rows)."""
    out: list[list | None] = [None] * len(rows)
    dp = 1 if model is None else model.dp
    for idx, B, T in plan([len(p) for p, _, _ in rows], token_budget):
        B = -(-B // dp) * dp
        tokens = np.zeros((B, T), np.int32)
        slots = np.full((B,), -1, np.int32)
        for b, i in enumerate(idx):
            tokens[b, :len(rows[i][0])] = rows[i][0]
            slots[b] = rows[i][1]
        picked, top_ids, top_lp = jax.device_get(prompt_logprobs(params, bank, tokens, slots, config=config,
                                                                 runtime=runtime, num=num, model=model))
        for b, i in enumerate(idx):
            ids, _, k = rows[i]
            out[i] = [None] + [entry(ids[t + 1], picked[b, t], top_ids[b, t], top_lp[b, t], k)
                               for t in range(len(ids) - 1)]
    return out


class PromptScorer:
    """Requests waiting for their prompt logprobs (or with max_tokens=0), before the scheduler sees them."""

    def __init__(self):
        self.pending: list = []  # `Sequence`s

    def __len__(self) -> int:
        return len(self.pending)

    def add(self, seq) -> None:
        self.pending.append(seq)

    def remove(self, seq) -> bool:
        if seq in self.pending:
            self.pending.remove(seq)
            return True
        return False

    def run(self, engine) -> list:
        """Scores every pending request that asks (its adapter made resident beside the running ones) and
        returns all pending requests, each with `prompt_logprobs` set if it asked. Raises what
        `AdapterStore.ensure_resident` raises; nothing is taken from `pending` then."""
        seqs, asking = list(self.pending), [s for s in self.pending if s.sampling.prompt_logprobs is not None]
        if asking:
            store = engine.store
            slots = store.ensure_resident({s.adapter for s in asking if s.adapter is not None},
                                          running={s.adapter for s in engine.scheduler.running if s.adapter})
            rows = [(s.prompt_ids, -1 if s.adapter is None else slots[s.adapter], s.sampling.prompt_logprobs)
                    for s in asking]
            scored = score_prompts(engine.runner.params, store.bank, rows, config=engine.model_config,
                                   runtime=engine.runner.runtime, num=engine.runner.num_logprobs,
                                   token_budget=engine.config.max_num_batched_tokens,
                                   model=engine.runner.model)
            for s, lp in zip(asking, scored):
                s.prompt_logprobs = lp
        self.pending = []
        return seqs
