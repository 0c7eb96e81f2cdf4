"""Shared helpers for the kernel tests.

The kernels run in Pallas interpret mode on CPU. Set JLORA_TEST_BACKENDS=triton on a GPU machine to run
the same tests against the compiled Triton kernels.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))  # repo root: pallas_kernels

import jax
import jax.numpy as jnp
import numpy as np
import pytest

BACKENDS = tuple(os.environ.get("JLORA_TEST_BACKENDS", "interpret,interpret_mosaic").split(","))
POPULARITY = ("distinct", "uniform", "zipf", "identical", "skewed")


@pytest.fixture(params=BACKENDS)
def backend(request):
  return request.param


def popularity_ids(rng: np.random.Generator, tokens: int, slots: int, kind: str) -> np.ndarray:
  """Sorted slot ids for `tokens` tokens over `slots` slots with the given popularity."""
  if kind == "distinct":
    ids = rng.permutation(max(slots, tokens))[:tokens] % slots
  elif kind == "uniform":
    ids = rng.integers(0, slots, tokens)
  elif kind == "zipf":
    ids = np.minimum(rng.zipf(1.5, tokens) - 1, slots - 1)
  elif kind == "identical":
    ids = np.full(tokens, rng.integers(0, slots))
  elif kind == "skewed":
    ids = np.where(rng.random(tokens) < 0.9, 0, rng.integers(0, slots, tokens))
  else:
    raise ValueError(kind)
  return np.sort(ids).astype(np.int32)


def rand(key, shape, dtype, scale=1.0):
  return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def assert_close(out, ref, dtype, what=""):
  """Relative-norm and elementwise checks with dtype-aware tolerances; NaN never passes."""
  out = np.asarray(jnp.asarray(out, jnp.float32))
  ref = np.asarray(jnp.asarray(ref, jnp.float32))
  assert np.all(np.isfinite(out)), f"{what}: non-finite output"
  rel, atol = (2e-2, 5e-2) if jnp.dtype(dtype) == jnp.bfloat16 else (1e-5, 1e-4)
  err = np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-6)
  assert err < rel, f"{what}: relative error {err:.3g} >= {rel}"
  np.testing.assert_allclose(out, ref, rtol=rel, atol=atol * max(1.0, np.abs(ref).max()),
                             err_msg=what)
