"""Plain-jnp float32 references for the multi-LoRA shrink and expand ops.

These are the ground truth the Pallas kernels are tested against, and the XLA path used on CPU.
They gather each token's adapter weights, so they are simple rather than fast.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def _gather_slots(w: jax.Array, slot_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Returns (w[clip(slot_ids)], valid) with valid[t] = slot_ids[t] >= 0."""
  valid = slot_ids >= 0
  idx = jnp.where(valid, slot_ids, 0)
  return jnp.take(w, idx, axis=0), valid


def ref_lora_shrink(x: jax.Array, a: jax.Array, slot_ids: jax.Array, *, meta=None,
                    backend=None) -> jax.Array:
  """Reference shrink: per-token x @ A[slot], in float32.

  Semantics: v[t] = x[t] @ a[slot_ids[t]], and v[t] = 0 where slot_ids[t] == -1.

  Args:
    x: [T, d_in] bf16 or f32 activations.
    a: [S, d_in, R] LoRA A weights, one per slot.
    slot_ids: [T] int32 in [-1, S); -1 means no adapter.
    meta: ignored (accepted so the signature matches `lora_shrink`).
    backend: ignored.

  Returns:
    v: [T, R] float32.
  """
  del meta, backend
  a_t, valid = _gather_slots(a, slot_ids)  # a_t: [T, d_in, R]
  v = jnp.einsum("td,tdr->tr", x.astype(jnp.float32), a_t.astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST)
  return jnp.where(valid[:, None], v, 0.0)


def ref_lora_expand(y: jax.Array, v: jax.Array, b_slices: Sequence[jax.Array],
                    slot_ids: jax.Array, *, meta=None, backend=None) -> jax.Array:
  """Reference fused expand: per-token y += v @ B[slot], slice by slice, in float32.

  Semantics: with n = len(b_slices), r = v.shape[1] // n, off_j = sum_{i<j} d_i:
    y_out[t, off_j:off_j+d_j] = y[t, off_j:off_j+d_j] + v[t, j*r:(j+1)*r] @ b_slices[j][slot_ids[t]],
    and y_out[t] = y[t] where slot_ids[t] == -1.

  Args:
    y: [T, sum_j d_j] bf16 or f32 base output.
    v: [T, n*r] float32 shrink output.
    b_slices: tuple of n arrays [S, r, d_j] (LoRA B weights, scale folded in).
    slot_ids: [T] int32 in [-1, S).
    meta: ignored.
    backend: ignored.

  Returns:
    y_out: [T, sum_j d_j] in y.dtype.
  """
  del meta, backend
  b_slices = tuple(b_slices)
  n = len(b_slices)
  r = v.shape[1] // n
  deltas = []
  valid = slot_ids >= 0
  for j, b in enumerate(b_slices):
    b_t, valid = _gather_slots(b, slot_ids)  # b_t: [T, r, d_j]
    deltas.append(jnp.einsum("tr,tro->to", v[:, j * r:(j + 1) * r].astype(jnp.float32),
                             b_t.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST))
  delta = jnp.concatenate(deltas, axis=1)
  out = y.astype(jnp.float32) + delta
  return jnp.where(valid[:, None], out, y.astype(jnp.float32)).astype(y.dtype)
