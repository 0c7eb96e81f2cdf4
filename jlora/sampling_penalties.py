"""Logit processors on the device, per row of a mixed batch: logit_bias, min_tokens and vLLM's penalties.

Each request that uses one (`SamplingParams.uses_processors`) holds a slot of `PenaltyState` while it runs: its
output token counts, which tokens are in its prompt, which are stop tokens, and its bias table. Rows of a step
name their slot; rows without processors name the spare slot S, whose counts stay zero and whose tables are
empty, so processing them changes nothing. A step gathers its rows' slots once, updates the counts on the device
after every sampled token (inside the multi-step decode loop too) and scatters them back.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
PROMPT, STOP = 1, 2  # bits of `PenaltyState.flags`


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PenaltyState:
    """Per-slot processor state; S slots plus the spare slot S.

    counts: [S + 1, V] int32, times each token is in the slot's output so far.
    flags: [S + 1, V] int8, PROMPT if the token is in the prompt, STOP if it is a stop token (EOS unless ignore_eos,
      and stop_token_ids) that min_tokens masks.
    bias_ids: [S + 1, N] int32 and bias: [S + 1, N] float32, the logit_bias entries (padding: id 0, bias 0).
    """

    counts: jax.Array
    flags: jax.Array
    bias_ids: jax.Array
    bias: jax.Array

    @staticmethod
    def zeros(num_slots: int, vocab_size: int, num_bias: int) -> "PenaltyState":
        S = num_slots + 1
        return PenaltyState(jnp.zeros((S, vocab_size), jnp.int32), jnp.zeros((S, vocab_size), jnp.int8),
                            jnp.zeros((S, num_bias), jnp.int32), jnp.zeros((S, num_bias), jnp.float32))

    @property
    def spare(self) -> int:
        return self.counts.shape[0] - 1


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RowState:
    """A step's rows of `PenaltyState` (`gather`): the same fields with B rows."""

    counts: jax.Array
    flags: jax.Array
    bias_ids: jax.Array
    bias: jax.Array


def gather(state: PenaltyState, slot: jax.Array) -> RowState:
    """Rows `slot` [B] of `state`."""
    return RowState(state.counts[slot], state.flags[slot], state.bias_ids[slot], state.bias[slot])


def scatter_counts(state: PenaltyState, slot: jax.Array, rows: RowState) -> PenaltyState:
    """`state` with its counts of slots `slot` replaced by the rows' (the spare slot is left at zero)."""
    keep = slot < state.spare
    counts = state.counts.at[jnp.where(keep, slot, state.spare)].set(
        jnp.where(keep[:, None], rows.counts, 0))
    return dataclasses.replace(state, counts=counts)


def count(rows: RowState, token: jax.Array, live: jax.Array) -> RowState:
    """The rows after sampling `token` [B]; only `live` [B] rows (a real token of a sequence) count it."""
    B = token.shape[0]
    return dataclasses.replace(rows, counts=rows.counts.at[jnp.arange(B), token].add(live.astype(jnp.int32)))


def apply(logits: jax.Array, rows: RowState, p: dict, num_output: jax.Array) -> jax.Array:
    """Processed logits, in vLLM's order.

    Semantics, for row b and token v (c = counts[b, v], seen = v in the prompt or c > 0):
      l += bias[b, v];  l = -inf if v is a stop token and num_output[b] < min_tokens[b];
      l = l / rep[b] if l > 0 else l * rep[b]  (where seen);  l -= frequency[b] * c + presence[b] * (c > 0).

    Args:
      logits: [B, V] float32.
      rows: the step's `RowState`.
      p: per-row [B] arrays "presence", "frequency", "repetition" (float32) and "min_tokens" (int32).
      num_output: [B] int32, tokens each row has output before this one.
    """
    B = logits.shape[0]
    logits = logits.at[jnp.arange(B)[:, None], rows.bias_ids].add(rows.bias)
    stop = (rows.flags & STOP) != 0
    logits = jnp.where(stop & (num_output < p["min_tokens"])[:, None], -jnp.inf, logits)
    out = rows.counts > 0
    seen = ((rows.flags & PROMPT) != 0) | out
    rep = jnp.where(seen, p["repetition"][:, None], 1.0)
    logits = jnp.where(logits > 0, logits / rep, logits * rep)
    return logits - p["frequency"][:, None] * rows.counts.astype(jnp.float32) - p["presence"][:, None] * out


@functools.partial(jax.jit, donate_argnums=(0,))
def write_slots(state: PenaltyState, slot, counts, flags, bias_ids, bias) -> PenaltyState:
    """`state` with slots `slot` [R] set to the given rows ([R, V] counts and flags, [R, N] bias tables). Padding
    rows name the spare slot with zero rows."""
    return PenaltyState(state.counts.at[slot].set(counts), state.flags.at[slot].set(flags),
                        state.bias_ids.at[slot].set(bias_ids), state.bias.at[slot].set(bias))
