"""XLA paths: the one for platforms without the Pallas kernels (the CPU default), and the gather expand of GPU decode.

On the CPU each token's adapter is picked out of dense products with every slot of the bank, so no per-token copy
of the weights is ever materialized (the reference gathers [T, d_in, R]); cost T * d * S * R, small for a bank's
slots. A bucket with no tokens skips all of it.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def xla_lora_shrink(x: jax.Array, a: jax.Array, slot_ids: jax.Array) -> jax.Array:
  """Semantics: v[t] = x[t] @ a[slot_ids[t]] in float32, 0 where slot_ids[t] == -1.

  Args:
    x: [T, d_in]; a: [S, d_in, R]; slot_ids: [T] int32 in [-1, S).
  Returns:
    v: [T, R] float32.
  """
  num_tokens, num_slots, rank = x.shape[0], a.shape[0], a.shape[2]

  def compute(_):
    full = jnp.einsum("td,sdr->tsr", x, a, preferred_element_type=jnp.float32)  # [T, S, R]
    idx = jnp.clip(slot_ids, 0, num_slots - 1)
    v = jnp.take_along_axis(full, idx[:, None, None], axis=1)[:, 0]
    return jnp.where(slot_ids[:, None] >= 0, v, 0.0)

  return jax.lax.cond(jnp.any(slot_ids >= 0), compute,
                      lambda _: jnp.zeros((num_tokens, rank), jnp.float32), None)


def xla_lora_expand(y: jax.Array, v: jax.Array, b_slices: Sequence[jax.Array], slot_ids: jax.Array) -> jax.Array:
  """Semantics: y_out[t, slice j] = y[t, slice j] + v[t, j*r:(j+1)*r] @ b_slices[j][slot_ids[t]].

  Args:
    y: [T, sum_j d_j]; v: [T, n*r] float32; b_slices: n arrays [S, r, d_j]; slot_ids: [T] int32 in [-1, S).
  Returns:
    y_out in y.dtype; rows with slot -1 unchanged.
  """
  b_slices = tuple(b_slices)
  r = v.shape[1] // len(b_slices)
  num_slots = b_slices[0].shape[0]

  def compute(y):
    onehot = (slot_ids[:, None] == jnp.arange(num_slots)[None, :]).astype(jnp.float32)  # [T, S]
    deltas = []
    for j, b in enumerate(b_slices):
      routed = onehot[:, :, None] * v[:, None, j * r:(j + 1) * r]  # [T, S, r]: v in its slot's block
      deltas.append(jnp.einsum("tsr,sro->to", routed, b, preferred_element_type=jnp.float32))
    return (y.astype(jnp.float32) + jnp.concatenate(deltas, axis=1)).astype(y.dtype)

  return jax.lax.cond(jnp.any(slot_ids >= 0), compute, lambda y: y, y)


def gather_lora_expand(y: jax.Array, v: jax.Array, b_slices: Sequence[jax.Array], slot_ids: jax.Array,
                       layer=None) -> jax.Array:
  """The expand as one XLA gather-einsum, a decode-sized step's variant on GPU (`decode_expand="gather"`).

  Same semantics as `dispatch.lora_expand`; v may also be the [K, T, n r] partial sums of the Triton shrink, and
  with `layer` each b_slices[j] is a stacked [L, S, r, d_j] bank. XLA fuses the gather of each token's B rows, the
  product and the add into y into one kernel (no [T, r, d] copy is written). v is rounded to B's dtype as in the
  Triton expand. Rows of slot -1 keep y, whatever v holds there (the Triton shrink leaves them unwritten).
  """
  if v.ndim == 3:
    v = jnp.sum(v, axis=0)
  r = v.shape[1] // len(b_slices)
  valid = slot_ids >= 0
  idx = jnp.where(valid, slot_ids, 0)
  deltas = []
  for j, b in enumerate(b_slices):
    b_tok = b[idx] if layer is None else b[layer, idx]  # [T, r, d_j], fused into the einsum by XLA
    v_j = v[:, j * r:(j + 1) * r].astype(b.dtype)
    deltas.append(jnp.einsum("tr,trd->td", v_j, b_tok, preferred_element_type=jnp.float32))
  delta = jnp.concatenate(deltas, axis=1)
  out = y.astype(jnp.float32) + jnp.where(valid[:, None], delta, 0.0)
  return out.astype(y.dtype)
