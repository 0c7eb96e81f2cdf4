"""Sampling inside the jitted step programs: the one-step sampler, the multi-step decode loop, and the per-row
arrays they read (`row_arrays`, filled by `fill_row`).

A one-step program (prefill, or decode when pages are short) decides on the device: if every row is greedy and
no row uses processors or asks for logprobs, a conditional takes the argmax alone; otherwise it processes the logits
(`sampling_penalties`), samples, computes logprobs only if some row asks (a second conditional), and counts the
sampled tokens into the penalty state. With a grammar bitmask (structured output: one-step programs only), the
tokens it disallows are -inf before all of that; logprobs stay those of the raw logits. The decode loop has no
conditionals (XLA's GPU runtime reads a predicate back to the host): whether it is greedy-only and whether it computes
logprobs are static, so it is one of three programs per shape (`loop_kind`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jlora import sampling_penalties as penalties
from jlora.sampling import sample
from jlora.structured import apply_bitmask

# Per-row sampling arrays of every step program, with the value of a padding row.
_ROW_FIELDS = {"temperature": (np.float32, 0.0), "top_k": (np.int32, 0), "top_p": (np.float32, 1.0),
               "min_p": (np.float32, 0.0), "seeds": (np.uint32, 0), "steps": (np.int32, 0),
               "presence": (np.float32, 0.0), "frequency": (np.float32, 0.0), "repetition": (np.float32, 1.0),
               "min_tokens": (np.int32, 0), "extras": (np.bool_, False), "logprobs": (np.bool_, False),
               "live": (np.bool_, False)}


def row_arrays(B: int, spare_slot: int) -> dict[str, np.ndarray]:
    """All-padding per-row arrays: greedy rows without processors, on the spare penalty slot, sampling nothing."""
    a = {k: np.full((B,), v, dtype) for k, (dtype, v) in _ROW_FIELDS.items()}
    a["slot"] = np.full((B,), spare_slot, np.int32)
    return a


def fill_row(a: dict, row: int, seq, slot: int, live: bool) -> None:
    """Row `row` of `row_arrays` for `seq` (a `Sequence`), holding penalty slot `slot`; `live`: the row samples a
    real next token (its chunk reaches the end of what the sequence has)."""
    sp = seq.sampling
    a["temperature"][row], a["top_k"][row], a["top_p"][row], a["min_p"][row] = (sp.temperature, sp.top_k, sp.top_p,
                                                                               sp.min_p)
    a["seeds"][row], a["steps"][row] = seq.sampling_seed, len(seq.output_ids)
    a["presence"][row], a["frequency"][row] = sp.presence_penalty, sp.frequency_penalty
    a["repetition"][row], a["min_tokens"][row] = sp.repetition_penalty, sp.min_tokens
    a["extras"][row], a["logprobs"][row], a["live"][row] = sp.uses_processors, seq.want_logprobs, live
    a["slot"][row] = slot


def loop_kind(a: dict) -> str:
    """The decode loop program rows `a` need: "decode_loop_greedy" (argmax alone: every row greedy without
    processors or logprobs), "decode_loop_logprobs" (some row asks for logprobs) or "decode_loop"."""
    if np.any(a["logprobs"]):
        return "decode_loop_logprobs"
    return "decode_loop" if np.any(a["temperature"] > 0) or np.any(a["extras"]) else "decode_loop_greedy"


def _keys(s: dict, k=0):
    """Row b samples with key fold_in(key(seeds[b]), steps[b] + k): a request's draws depend on its seed and how
    many tokens it has, never on the batch around it. Derived inside the program (no per-step host dispatch)."""
    return jax.vmap(lambda sd, st: jax.random.fold_in(jax.random.key(sd), st))(s["seeds"], s["steps"] + k)


def _logprobs(logits, token, num_logprobs: int):
    """(log p(token) [B], top ids [B, n], top log p [B, n]) of the raw logits' float32 log-softmax."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    top_lp, top_ids = jax.lax.top_k(logp, num_logprobs)
    return jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0], top_ids, top_lp


def step_sample(logits, s: dict, state: penalties.PenaltyState, num_logprobs: int, bitmask=None):
    """One token per row of logits [B, V], with rows `s` (see `row_arrays`), among the tokens `bitmask` allows
    (int32 [B, ceil(V / 32)], `structured.apply_bitmask`; None: all). Returns ((token [B], log p [B], top ids
    [B, n], top log p [B, n]), the penalty state); logprobs, of the unmasked logits, are zeros unless some row
    asks."""
    B = logits.shape[0]
    zeros = (jnp.zeros((B,), jnp.float32), jnp.zeros((B, num_logprobs), jnp.int32),
             jnp.zeros((B, num_logprobs), jnp.float32))
    allowed = logits if bitmask is None else apply_bitmask(logits, bitmask)

    def greedy():
        return (jnp.argmax(allowed, axis=-1).astype(jnp.int32), *zeros), state

    def full():
        rows = penalties.gather(state, s["slot"])
        processed = penalties.apply(allowed, rows, s, s["steps"])
        token = sample(processed, s["temperature"], s["top_k"], s["top_p"], _keys(s), min_p=s["min_p"])
        lp = jax.lax.cond(jnp.any(s["logprobs"]), lambda: _logprobs(logits, token, num_logprobs), lambda: zeros)
        rows = penalties.count(rows, token, s["live"])
        return (token, *lp), penalties.scatter_counts(state, s["slot"], rows)

    plain = (s["temperature"] <= 0) & ~s["extras"] & ~s["logprobs"]
    return jax.lax.cond(jnp.all(plain), greedy, full)


def decode_loop(fwd, cache, state, tokens, positions, row_steps, s: dict, max_steps: int, greedy: bool,
                num_logprobs: int = 0):
    """Up to `max_steps` decode steps in one program, each feeding its sampled tokens to the next on the device.

    Row b decodes row_steps[b] <= max_steps tokens from position positions[b, 0]; after that its positions are -1
    (it writes and attends nothing). The loop always runs max_steps times: a trip count fixed at compile time
    measured faster on the H100 than one read from row_steps (LoRA off, 4 steps: 6490 against 5963 tok/s).
    `greedy` (static) says whether every row is greedy without processors or logprobs, so that no step holds a
    `lax.cond`: XLA's GPU runtime reads a conditional's predicate back to the host, which stalled the device once per
    step; `num_logprobs` (static) is 0 unless some row asks for logprobs.
    (The loop itself still makes one device-to-host copy per iteration in the H100 profile.) Step k of row b samples
    with the key of its (steps[b] + k)-th token, so a request's draws are those of k single steps, and its penalty
    counts are gathered once, updated after every token and scattered back at the end.

    Args:
      fwd: (tokens [B, 1], positions [B, 1], cache) -> (logits [B, V], cache).
      state: the `PenaltyState` (None for a greedy loop).
    Returns:
      tokens [max_steps, B], or with num_logprobs (tokens, log p [max_steps, B], top ids and top log p
      [max_steps, B, num_logprobs]); the cache; the penalty state.
    """
    B, n = tokens.shape[0], num_logprobs
    rows = None if greedy else penalties.gather(state, s["slot"])

    def body(k, carry):
        cache, tok, rows, outs = carry
        pos = jnp.where(k < row_steps, positions[:, 0] + k, -1)[:, None]
        logits, cache = fwd(tok, pos, cache)
        if greedy:
            new = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        else:
            processed = penalties.apply(logits, rows, s, s["steps"] + k)
            new = sample(processed, s["temperature"], s["top_k"], s["top_p"], _keys(s, k), greedy_only=False,
                         min_p=s["min_p"])
            rows = penalties.count(rows, new, k < row_steps)
        step = (new, *_logprobs(logits, new, n)) if n else (new,)
        return cache, new.astype(tokens.dtype)[:, None], rows, tuple(o.at[k].set(x) for o, x in zip(outs, step))

    outs = (jnp.zeros((max_steps, B), jnp.int32),)
    if n:
        outs += (jnp.zeros((max_steps, B), jnp.float32), jnp.zeros((max_steps, B, n), jnp.int32),
                 jnp.zeros((max_steps, B, n), jnp.float32))
    cache, _, rows, outs = jax.lax.fori_loop(0, max_steps, body, (cache, tokens, rows, outs))
    state = state if greedy else penalties.scatter_counts(state, s["slot"], rows)
    return (outs if n else outs[0]), cache, state
