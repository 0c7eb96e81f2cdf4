"""The elementwise pieces that differ between families: RMSNorm, the MLP activation, embedding scale, soft-capping.

Each reads its switch from the frozen `ModelConfig` (a jit key), so a family is chosen when the program is traced.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jlora.config import ModelConfig


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, unit_offset: bool = False) -> jax.Array:
    """Semantics: x / sqrt(mean(x^2) + eps) * weight, in float32, over the last axis.

    With `unit_offset` (Gemma) the scale is (1 + weight), applied in float32 before the cast back to x's dtype;
    otherwise (Llama) the normalized x is cast first and then scaled, as each family's reference does.
    """
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if unit_offset:
        return (xf * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)
    return weight * xf.astype(x.dtype)


def norm(x: jax.Array, weight: jax.Array, config: ModelConfig) -> jax.Array:
    """The config's RMSNorm (its eps and weight offset)."""
    return rms_norm(x, weight, config.rms_norm_eps, config.norm_unit_offset)


def activation(x: jax.Array, name: str) -> jax.Array:
    """The gate's activation: "silu" (Llama) or "gelu_pytorch_tanh" (Gemma's GeGLU: the tanh approximation)."""
    if name == "silu":
        return jax.nn.silu(x)
    if name == "gelu_pytorch_tanh":
        return jax.nn.gelu(x, approximate=True)
    raise ValueError(f"unknown activation {name!r}")


def scale_embeddings(h: jax.Array, config: ModelConfig) -> jax.Array:
    """Gemma multiplies looked-up embeddings by sqrt(hidden_size), rounded to the embeddings' dtype first."""
    if not config.embed_scale:
        return h
    return h * jnp.asarray(math.sqrt(config.hidden_size), h.dtype)


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
    """Semantics: cap * tanh(x / cap) (Gemma 2's attention and final logits); the identity when cap is None."""
    if cap is None:
        return x
    return jnp.tanh(x / cap) * cap
