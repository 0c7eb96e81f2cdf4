"""Log-likelihoods of continuations given prompts (`LLM.score`): one jitted forward over each whole sequence.

Rows are padded to power-of-two lengths and batch sizes within a token budget, so scoring compiles one program
per (rows, length) bucket whatever the texts are.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jlora.config import ModelConfig, RuntimeConfig
from jlora.errors import RequestError
from jlora.model.sequences import sequence_logits

MIN_LENGTH = 16  # the shortest padded sequence: short texts share one program


@dataclasses.dataclass(frozen=True)
class ScoreOutput:
    """One continuation's log-likelihood given its prompt.

    Attributes:
      logprob: sum of `token_logprobs`.
      is_greedy: whether every continuation token is the most likely one given what precedes it (lm-eval's
        loglikelihood flag).
      token_logprobs: log p(c_j | prompt, c_<j) for each continuation token c_j, from a float32 log-softmax.
      prompt_token_ids, token_ids: the prompt's and the continuation's tokens.
    """

    logprob: float
    is_greedy: bool
    token_logprobs: list[float]
    prompt_token_ids: list[int]
    token_ids: list[int]


def encode_pair(tokenizer, prompt, continuation) -> tuple[list[int], list[int]]:
    """(prompt ids, continuation ids). Token ids pass through. Texts are split as lm-eval splits them: spaces that
    end the prompt move to the continuation, the prompt is encoded alone, and the continuation is what the encoding
    of prompt + continuation holds after as many tokens, so a word keeps the tokens it has in running text."""
    if isinstance(prompt, str) != isinstance(continuation, str):
        raise RequestError("a prompt and its continuation must both be text or both be token ids")
    if not isinstance(prompt, str):
        return _ids(prompt, "prompt"), _ids(continuation, "continuation")
    if tokenizer is None:
        raise RequestError("this model has no tokenizer: send token ids")
    spaces = len(prompt) - len(prompt.rstrip())
    if spaces:
        prompt, continuation = prompt[:-spaces], prompt[-spaces:] + continuation
    try:
        context = tokenizer.encode(prompt)
        whole = tokenizer.encode(prompt + continuation)
    except Exception as e:  # noqa: BLE001 - e.g. a lone surrogate: the text is at fault
        raise RequestError(f"the text cannot be tokenized ({type(e).__name__})") from None
    return context, whole[len(context):]


def _ids(ids, what: str) -> list[int]:
    try:
        ids = list(ids)
    except TypeError:
        raise RequestError(f"{what} must be text or a list of token ids, got {type(ids).__name__}") from None
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise RequestError(f"{what} token ids must be integers")
    return ids


def check_pair(prompt: list[int], continuation: list[int], vocab_size: int, max_len: int, i: int) -> None:
    """Raises `RequestError` naming pair `i` if it cannot be scored."""
    if not prompt:
        raise RequestError(f"prompt {i} has no tokens: a continuation needs at least one token before it")
    if not continuation:
        raise RequestError(f"continuation {i} is empty: there is nothing to score")
    if not all(0 <= t < vocab_size for t in prompt + continuation):
        raise RequestError(f"pair {i}: token ids must be in [0, {vocab_size})")
    if len(prompt) + len(continuation) > max_len:
        raise RequestError(f"pair {i}: prompt + continuation is {len(prompt) + len(continuation)} tokens, above "
                           f"the context length {max_len}")


@functools.partial(jax.jit, static_argnames=("config", "runtime", "model"))
def sequence_logprobs(params, bank, tokens: jax.Array, lora_ids: jax.Array, *, config: ModelConfig,
                      runtime: RuntimeConfig = RuntimeConfig(), model=None):
    """Semantics: logprob[b, t] = log_softmax(logits[b, t])[tokens[b, t + 1]] (in float32) and
    greedy[b, t] = argmax(logits[b, t]) == tokens[b, t + 1], for t < T - 1, where logits = forward(tokens).

    Args:
      params, bank: the base weights and the LoRA bank, as `forward` takes them (placed on `model`'s mesh, if
        given: a `ShardedModel`).
      tokens: [B, T] int32, each row from position 0; padding at a row's end changes nothing before it.
      lora_ids: [B] int32 global slot id per row; -1 for the base model.
    Returns:
      (logprob [B, T - 1] float32, greedy [B, T - 1] bool).
    """
    logits = sequence_logits(params, bank, tokens, lora_ids, config=config, runtime=runtime, model=model)
    logits = logits[:, :-1].astype(jnp.float32)  # [B, T - 1, V]: the prediction of each next token
    targets = tokens[:, 1:]
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return picked, jnp.argmax(logits, axis=-1) == targets


def _pow2(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


def plan_batches(lengths: list[int], token_budget: int, max_len: int) -> list[tuple[list[int], int, int]]:
    """Groups rows into forward calls: [(row indices, padded rows B, padded length T)].

    1. Rows go longest first, so each call pads to its own longest row.
    2. T is the power of two at or above that row's length (at least MIN_LENGTH, at most max_len).
    3. A call takes the largest power of two of rows with B * T <= token_budget (at least one row); B is its row
       count rounded up to a power of two.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    calls, start = [], 0
    while start < len(order):
        longest = lengths[order[start]]
        T = min(max(MIN_LENGTH, _pow2(longest)), max(max_len, longest))
        cap = max(1, token_budget // T)
        cap = 1 << (cap.bit_length() - 1)
        rows = order[start:start + cap]
        calls.append((rows, _pow2(len(rows)), T))
        start += len(rows)
    return calls


def score_rows(params, bank, rows: list[tuple[list[int], list[int], int]], *, config: ModelConfig,
               runtime: RuntimeConfig, token_budget: int, max_len: int, model=None) -> list[ScoreOutput]:
    """Scores (prompt ids, continuation ids, global slot or -1) rows, checked by `check_pair`; on `model`'s mesh
    if given (a `ShardedModel`: calls of a multiple of its dp rows)."""
    out: list[ScoreOutput | None] = [None] * len(rows)
    dp = 1 if model is None else model.dp
    for idx, B, T in plan_batches([len(p) + len(c) for p, c, _ in rows], token_budget, max_len):
        B = -(-B // dp) * dp
        idx = sorted(idx, key=lambda i: rows[i][2])  # rows of one adapter side by side: fewer LoRA tiles
        tokens = np.zeros((B, T), np.int32)
        slots = np.full((B,), -1, np.int32)
        for b, i in enumerate(idx):
            p, c, slot = rows[i]
            tokens[b, :len(p) + len(c)] = p + c
            slots[b] = slot
        logp, greedy = jax.device_get(sequence_logprobs(params, bank, tokens, slots, config=config,
                                                        runtime=runtime, model=model))
        for b, i in enumerate(idx):
            p, c, _ = rows[i]
            span = slice(len(p) - 1, len(p) + len(c) - 1)  # the predictions of the continuation's tokens
            lp = logp[b, span].astype(np.float64)
            out[i] = ScoreOutput(float(lp.sum()), bool(greedy[b, span].all()), lp.tolist(), list(p), list(c))
    return out
