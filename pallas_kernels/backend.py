"""Names of the LoRA kernel backends, and the choice by platform."""
from __future__ import annotations

import jax

BACKENDS = ("xla", "reference", "interpret", "triton", "mosaic", "interpret_mosaic")


def resolve_backend(backend: str | None) -> str:
  """Returns the concrete backend: the argument, or for None / "auto" the platform's.

  Platform defaults: gpu -> "triton", tpu -> "mosaic", anything else -> "xla" (dense over slots).
  "reference" is the per-token gather oracle the others are tested against.
  "interpret" runs the Triton kernel in interpret mode; "interpret_mosaic" the Mosaic one.
  """
  if backend is None or backend == "auto":
    platform = jax.default_backend()
    if platform in ("gpu", "cuda", "rocm"):
      return "triton"
    if platform == "tpu":
      return "mosaic"
    return "xla"
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, 'auto' or None, got {backend!r}")
  return backend
