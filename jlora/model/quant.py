"""FP8 base weights: the four linear weights of every layer stored as float8_e4m3fn with one float32 scale per
output channel. W8A16 casts them to the activations' dtype inside the matmul; W8A8 (`RuntimeConfig.fp8_compute`, the
GPU default) also quantizes the activations per token and multiplies fp8 by fp8 (cuBLASLt's FP8 GEMM on Hopper: at
the 8B decode shapes 3.3 against W8A16's 4.1 ms of matmuls per step, `benchmarks/results/fp8_matmul_h200.json`).

`x @ (q * s)` equals `(x @ q) * s` for a scale `s` per output column, so the product runs on the fp8 values (cast to
the activations' dtype, which XLA fuses into the dot) and is scaled after. Quantization is absmax per output
channel: `s = max|w| / 448`, `q = round_fp8(w / s)`. A checkpoint already quantized that way (compressed-tensors,
strategy `channel`) comes back bit for bit. LoRA deltas are added in the activations' dtype, on top, unchanged.
The embedding and the output head stay in the model dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite float8_e4m3fn
LINEAR = ("w_qkv", "w_o", "w_gate_up", "w_down")  # [L, d_in, d_out] each
QUANTIZATIONS = ("fp8",)


def scale_name(weight: str) -> str:
    return weight + "_scale"


def is_quantized(params) -> bool:
    return scale_name("w_qkv") in params["layers"]


def quantize_weight(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(fp8 [..., d_in, d_out], float32 scale [..., d_out]): absmax per output channel (an all-zero column gets 1)."""
    w32 = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w32), axis=-2)
    scale = jnp.where(amax > 0, amax / FP8_MAX, 1.0)
    q = jnp.clip(w32 / scale[..., None, :], -FP8_MAX, FP8_MAX).astype(FP8)
    return q, scale


_quantize_weight = jax.jit(quantize_weight)


def quantize_params(params, quantization: str = "fp8"):
    """`params` with the layers' linear weights in FP8 and their scales beside them (`w_qkv_scale`, ...)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    if is_quantized(params):
        return params
    layers = dict(params["layers"])
    for name in LINEAR:
        layers[name], layers[scale_name(name)] = _quantize_weight(layers[name])
    return {**params, "layers": layers}


def quantize_activations(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(fp8 x, float32 scale [..., 1]): absmax per token (row), so the scale applies after the dot, as the weight's
    per-column scale does."""
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1, keepdims=True)
    scale = jnp.where(amax > 0, amax / FP8_MAX, 1.0)
    return (x.astype(jnp.float32) / scale).astype(FP8), scale


def matmul(x: jax.Array, w: jax.Array, scale: jax.Array | None, compute: str = "w8a16") -> jax.Array:
    """x @ w, for a plain weight or an FP8 one with its per-output-channel scale. `compute` ("w8a16" or "w8a8",
    `RuntimeConfig.fp8_compute` resolved) says whether x stays in its dtype or is quantized per token too."""
    if scale is None:
        return x @ w
    if compute == "w8a8":
        xq, x_scale = quantize_activations(x)
        y = jnp.dot(xq, w, preferred_element_type=jnp.float32)
        return (y * x_scale * scale).astype(x.dtype)
    y = jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32)
    return (y * scale).astype(x.dtype)
