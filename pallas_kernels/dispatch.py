"""Public multi-LoRA ops: argument checks and backend dispatch."""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from pallas_kernels import metadata, mosaic_gpu_lora, mosaic_lora, reference, triton_lora, tuning, xla
from pallas_kernels.backend import BACKENDS, MOSAIC_GPU, resolve_backend

__all__ = ["BACKENDS", "lora_expand", "lora_shrink", "lora_shrink_expand", "resolve_backend"]


def _validate_shrink(x, a, slot_ids) -> None:
  if x.ndim != 2:
    raise ValueError(f"x must be [T, d_in], got shape {x.shape}")
  if a.ndim != 3:
    raise ValueError(f"a must be [S, d_in, R], got shape {a.shape}")
  if a.shape[1] != x.shape[1]:
    raise ValueError(f"a.shape[1] (d_in) must equal x.shape[1]={x.shape[1]}, got {a.shape[1]}")
  _validate_slot_ids(slot_ids, x.shape[0])


def _validate_expand(y, v, b_slices, slot_ids) -> None:
  if y.ndim != 2:
    raise ValueError(f"y must be [T, sum d_j], got shape {y.shape}")
  if v.ndim != 2 or v.shape[0] != y.shape[0]:
    raise ValueError(f"v must be [T={y.shape[0]}, n*r], got shape {v.shape}")
  if not isinstance(b_slices, (tuple, list)) or not b_slices:
    raise ValueError("b_slices must be a non-empty tuple of [S, r, d_j] arrays")
  n = len(b_slices)
  if v.shape[1] % n:
    raise ValueError(f"v.shape[1]={v.shape[1]} must be a multiple of len(b_slices)={n}")
  r = v.shape[1] // n
  s = b_slices[0].shape[0] if b_slices[0].ndim == 3 else None
  for j, b in enumerate(b_slices):
    if b.ndim != 3 or b.shape[1] != r or b.shape[0] != s:
      raise ValueError(f"b_slices[{j}] must be [S={s}, r={r}, d_j], got shape {b.shape}")
  d_total = sum(b.shape[2] for b in b_slices)
  if y.shape[1] != d_total:
    raise ValueError(f"y.shape[1] must equal sum of b_slices d_j = {d_total}, got {y.shape[1]}")
  _validate_slot_ids(slot_ids, y.shape[0])


def _validate_slot_ids(slot_ids, num_tokens: int) -> None:
  if slot_ids.ndim != 1 or slot_ids.shape[0] != num_tokens:
    raise ValueError(f"slot_ids must be [T={num_tokens}], got shape {slot_ids.shape}")
  if not jnp.issubdtype(slot_ids.dtype, jnp.integer):
    raise ValueError(f"slot_ids must be an integer array, got {slot_ids.dtype}")


def _per_layer(w, layer, name: str):
  """The shape a per-layer [S, ...] weight has, as a struct; checks that a stacked one has its L axis."""
  if layer is None:
    return w
  if w.ndim != 4:
    raise ValueError(f"with layer=, {name} must be a stacked [L, S, ...] bank (4-D), got shape {w.shape}")
  return jax.ShapeDtypeStruct(w.shape[1:], w.dtype)


def _layer_of(w, layer):
  return w if layer is None else jax.lax.dynamic_index_in_dim(w, layer, 0, keepdims=False)


def _per_layer_slices(b_slices, layer):
  return tuple(_per_layer(b, layer, f"b_slices[{j}]") for j, b in enumerate(b_slices))


def _check_meta(meta, slot_ids, backend: str):
  """Returns `meta`, or builds it; checks that it was made for these tokens and this backend."""
  if meta is None:
    return metadata.segment_metadata(slot_ids, backend=backend)
  if not isinstance(meta, metadata.SegmentMetadata):
    raise ValueError(f"meta must be a SegmentMetadata from segment_metadata(), got {type(meta)}")
  if meta.num_tokens != slot_ids.shape[0]:
    raise ValueError(f"meta was built for T={meta.num_tokens} tokens, but slot_ids has "
                     f"{slot_ids.shape[0]}")
  if backend in ("mosaic", "interpret_mosaic") and not meta.aligned:
    raise ValueError("meta must be built with aligned=True (or backend=...) for the Mosaic kernel")
  if backend in MOSAIC_GPU and (not meta.aligned or meta.block_t != mosaic_gpu_lora.TILE_M):
    raise ValueError(f"meta must be built with aligned=True and block_t={mosaic_gpu_lora.TILE_M} "
                     f"(or backend={backend!r}) for the Mosaic GPU kernels")
  return meta


def _triton_fallback(backend: str) -> str:
  """The Triton-backend kernels that take the calls the Mosaic GPU kernels do not (float32, ranks or widths that
  miss wgmma's tiles), in the same mode."""
  return "interpret" if backend == "interpret_mosaic_gpu" else "triton"


def lora_shrink(x: jax.Array, a: jax.Array, slot_ids: jax.Array, *, meta=None,
                backend: str | None = None, layer=None) -> jax.Array:
  """Segmented LoRA shrink.

  Semantics: v[t] = x[t] @ a[slot_ids[t]] accumulated in float32, and v[t] = 0 where slot_ids[t] == -1.

  Args:
    x: [T, d_in] bf16 or f32 activations.
    a: [S, d_in, R] LoRA A weights (R = n*r for a fused group).
    slot_ids: [T] int32 in [-1, S); runs of equal ids are segments (fastest when sorted).
    meta: `segment_metadata(slot_ids)`, computed once per step; built here if None.
    backend: None or "auto" (by platform), "xla", "reference", "interpret", "triton", "mosaic",
      "interpret_mosaic", "mosaic_gpu", "interpret_mosaic_gpu".
    layer: optional int32 scalar (may be traced). If given, `a` is a stacked [L, S, d_in, R] bank and layer
      `layer` is used. The kernels then read it in place, where slicing a layer out inside a scan would copy
      that layer's every slot before each call.

  Returns:
    v: [T, R] float32.
  """
  _validate_shrink(x, _per_layer(a, layer, "a"), slot_ids)
  backend = resolve_backend(backend)
  if backend == "reference":
    return reference.ref_lora_shrink(x, _layer_of(a, layer), slot_ids)
  if backend == "xla":
    return xla.xla_lora_shrink(x, _layer_of(a, layer), slot_ids)
  meta = _check_meta(meta, slot_ids, backend)
  if backend in MOSAIC_GPU:
    if mosaic_gpu_lora.shrink_supported(x.dtype, a.dtype, x.shape[1], a.shape[-1]):
      return mosaic_gpu_lora.shrink(x, a, meta, layer, interpret=backend == "interpret_mosaic_gpu")
    backend = _triton_fallback(backend)
  if backend in ("triton", "interpret"):
    return triton_lora.shrink(x, a, slot_ids, meta, layer, interpret=backend == "interpret")
  return mosaic_lora.shrink(x, a, slot_ids, meta, layer, interpret=backend == "interpret_mosaic")


def lora_expand(y: jax.Array, v: jax.Array, b_slices: Sequence[jax.Array], slot_ids: jax.Array, *,
                meta=None, backend: str | None = None, layer=None,
                decode_expand: str = tuning.DEFAULT_DECODE_EXPAND) -> jax.Array:
  """Segmented, fused-slice LoRA expand, added into y.

  Semantics: with n = len(b_slices), r = v.shape[1] // n, off_j = sum_{i<j} d_i:
    y_out[t, off_j:off_j+d_j] = y[t, off_j:off_j+d_j] + v[t, j*r:(j+1)*r] @ b_slices[j][slot_ids[t]],
    and y_out[t] = y[t] where slot_ids[t] == -1.

  Args:
    y: [T, sum_j d_j] bf16 or f32 base output.
    v: [T, n*r] float32 from `lora_shrink`.
    b_slices: tuple of n arrays [S, r, d_j] (e.g. q, k, v under GQA, or gate, up).
    slot_ids: [T] int32 in [-1, S).
    meta: `segment_metadata(slot_ids)`; built here if None.
    backend: as in `lora_shrink`.
    layer: as in `lora_shrink`: if given, each b_slices[j] is a stacked [L, S, r, d_j] bank.
    decode_expand: on GPU, how steps of at most 256 tokens run: "gather" (XLA's gather-einsum) or "triton" (the
      tiled kernel); static.

  Returns:
    y_out: [T, sum_j d_j] in y.dtype.
  """
  b_slices = tuple(b_slices)
  _validate_expand(y, v, _per_layer_slices(b_slices, layer), slot_ids)
  backend = resolve_backend(backend)
  if backend == "reference":
    return reference.ref_lora_expand(y, v, tuple(_layer_of(b, layer) for b in b_slices), slot_ids)
  if backend == "xla":
    return xla.xla_lora_expand(y, v, tuple(_layer_of(b, layer) for b in b_slices), slot_ids)
  meta = _check_meta(meta, slot_ids, backend)
  if backend in MOSAIC_GPU:
    return _mosaic_gpu_expand(y, v, b_slices, slot_ids, meta, layer, backend, decode_expand)
  if backend in ("triton", "interpret"):
    return _triton_expand(y, v, b_slices, slot_ids, meta, layer, backend, decode_expand)
  if any(b.shape[-1] % 128 for b in b_slices):
    # Mosaic blocks are 128 lanes wide; widths such as SmolLM2's 576/192 take the dense XLA path (not the oracle).
    return xla.xla_lora_expand(y, v, tuple(_layer_of(b, layer) for b in b_slices), slot_ids)
  return mosaic_lora.expand(y, v, b_slices, meta, layer, interpret=backend == "interpret_mosaic")


def lora_shrink_expand(x: jax.Array, y: jax.Array, a: jax.Array, b_slices: Sequence[jax.Array], slot_ids: jax.Array,
                       *, meta=None, backend: str | None = None, layer=None,
                       decode_expand: str = tuning.DEFAULT_DECODE_EXPAND) -> jax.Array:
  """One fused LoRA group: `lora_expand(y, lora_shrink(x, a, ...), b_slices, ...)`, the way the model calls it.

  Same semantics, arguments and result as the two calls. On the Triton path the shrink's per-program partial sums
  over d_in go straight to the expand, which adds them up: one launch fewer than the two public ops. (A one-launch
  decode kernel, a program per tile doing both, measured 1.3-2x slower on the H100: too little parallelism.)
  On Mosaic GPU, decode-sized steps hand the shrink's split-K partial sums to XLA's gather expand likewise.
  """
  b_slices = tuple(b_slices)
  backend = resolve_backend(backend)
  if backend in MOSAIC_GPU and _mosaic_gpu_partials(x, a, y, decode_expand):
    # Decode-sized: the Mosaic shrink's split-K partial sums go straight to XLA's gather expand, which adds them.
    _validate_shrink(x, _per_layer(a, layer, "a"), slot_ids)
    _validate_expand(y, jax.ShapeDtypeStruct((x.shape[0], a.shape[-1]), jnp.float32),
                     _per_layer_slices(b_slices, layer), slot_ids)
    meta = _check_meta(meta, slot_ids, backend)
    partials = mosaic_gpu_lora.shrink(x, a, meta, layer, interpret=backend == "interpret_mosaic_gpu",
                                      sum_splits=False)
    return xla.gather_lora_expand(y, partials, b_slices, slot_ids, layer)
  if backend not in ("triton", "interpret"):
    v = lora_shrink(x, a, slot_ids, meta=meta, backend=backend, layer=layer)
    return lora_expand(y, v, b_slices, slot_ids, meta=meta, backend=backend, layer=layer,
                       decode_expand=decode_expand)
  _validate_shrink(x, _per_layer(a, layer, "a"), slot_ids)
  meta = _check_meta(meta, slot_ids, backend)
  partials = triton_lora.shrink(x, a, slot_ids, meta, layer, interpret=backend == "interpret", sum_splits=False)
  v_shape = jax.ShapeDtypeStruct(partials.shape[1:], partials.dtype)
  _validate_expand(y, v_shape, _per_layer_slices(b_slices, layer), slot_ids)
  return _triton_expand(y, partials, b_slices, slot_ids, meta, layer, backend, decode_expand)


def _triton_expand(y, v, b_slices, slot_ids, meta, layer, backend: str, decode_expand: str):
  """The GPU expand: the tiled Triton kernel, or for decode-sized steps the variant `decode_expand` names."""
  variant = tuning.gpu_expand_variant(y.shape[0], decode_expand)
  if variant == "gather":
    return xla.gather_lora_expand(y, v, b_slices, slot_ids, layer)
  return triton_lora.expand(y, v, b_slices, meta, layer, interpret=backend == "interpret")


def _mosaic_gpu_partials(x, a, y, decode_expand: str) -> bool:
  """Whether the Mosaic shrink runs and the expand is XLA's gather-einsum (decode-sized steps by default)."""
  return (tuning.gpu_expand_variant(y.shape[0], decode_expand) == "gather"
          and mosaic_gpu_lora.shrink_supported(x.dtype, a.dtype, x.shape[1], a.shape[-1]))


def _mosaic_gpu_expand(y, v, b_slices, slot_ids, meta, layer, backend: str, decode_expand: str):
  """The Mosaic GPU expand; decode-sized steps take `decode_expand`'s variant as on Triton ("triton" there meaning
  the tiled kernel), and shapes the Mosaic kernel does not take the Triton-backend kernel."""
  if tuning.gpu_expand_variant(y.shape[0], decode_expand) == "gather":
    return xla.gather_lora_expand(y, v, b_slices, slot_ids, layer)
  dims = tuple(b.shape[-1] for b in b_slices)
  if mosaic_gpu_lora.expand_supported(tuple(b.dtype for b in b_slices), v.shape[1] // len(b_slices), dims):
    return mosaic_gpu_lora.expand(y, v, b_slices, meta, layer, interpret=backend == "interpret_mosaic_gpu")
  return triton_lora.expand(y, v, b_slices, meta, layer, interpret=_triton_fallback(backend) == "interpret")
