"""Stacked-bank views shared by the kernels: a [L, S, ...] bank read in place at one layer."""
from __future__ import annotations

import jax
import jax.numpy as jnp

MAX_INT32 = 2**31 - 1


def in_place(weights: tuple[jax.Array, ...], layer):
  """(weights viewed as [L * S, ...], layer as a [1] int32 array, S) for a stacked [L, S, ...] bank.

  The kernels read a stacked bank in place at row layer * S + slot: slicing one layer out first would copy
  that layer's whole bank (every slot, used or not) before each call. The reshape is free (a bitcast).
  Without a layer, or when element offsets could overflow the kernels' int32 arithmetic, the arrays are
  per-layer [S, ...] (sliced here if need be) and the layer is 0.
  """
  if layer is not None and max(w.size for w in weights) >= MAX_INT32:
    weights = tuple(jax.lax.dynamic_index_in_dim(w, layer, 0, keepdims=False) for w in weights)
    layer = None
  if layer is None:
    return weights, jnp.zeros((1,), jnp.int32), weights[0].shape[0]
  num_slots = weights[0].shape[1]
  flat = tuple(w.reshape((w.shape[0] * num_slots,) + w.shape[2:]) for w in weights)
  return flat, jnp.asarray(layer, jnp.int32).reshape(1), num_slots
