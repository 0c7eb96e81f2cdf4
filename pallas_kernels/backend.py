"""Names of the LoRA kernel backends, and the choice by platform."""
from __future__ import annotations

import jax

BACKENDS = ("xla", "reference", "interpret", "triton", "mosaic", "interpret_mosaic", "mosaic_gpu",
            "interpret_mosaic_gpu")
MOSAIC_GPU = ("mosaic_gpu", "interpret_mosaic_gpu")


def resolve_backend(backend: str | None) -> str:
  """Returns the concrete backend: the argument, or for None / "auto" the platform's.

  Platform defaults: gpu -> "triton", tpu -> "mosaic", anything else -> "xla" (dense over slots).
  "reference" is the per-token gather oracle the others are tested against.
  "interpret" runs the Triton kernel in interpret mode; "interpret_mosaic" the Mosaic (TPU) one.
  "mosaic_gpu" is the Pallas Mosaic GPU kernels (TMA, wgmma), "interpret_mosaic_gpu" them in interpret mode; only
  asked for by name until they measure at least as fast as "triton" on the GPU.
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
