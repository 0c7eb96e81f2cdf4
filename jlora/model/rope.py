"""Rotary position embeddings, Hugging Face layout (rotate-half), with Llama 3 and linear frequency scaling."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from jlora.config import ModelConfig


def inverse_frequencies(config: ModelConfig, local: bool = False) -> np.ndarray:
    """The per-pair inverse frequencies, [head_dim // 2] float32 (host constant); with `local`, those of the sliding
    layers (`config.rope_local_theta`, unscaled)."""
    hd = config.head_dim
    theta = config.rope_local_theta if local else config.rope_theta
    inv = 1.0 / (theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    s = None if local else config.rope_scaling
    if s is None:
        return inv.astype(np.float32)
    if s.rope_type == "linear":
        return (inv / s.factor).astype(np.float32)
    old = s.original_max_position_embeddings
    low_wavelen = old / s.low_freq_factor
    high_wavelen = old / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, inv_freq: np.ndarray) -> jnp.ndarray:
    """Rotates `x` by its positions.

    Args:
      x: [B, T, N, H] queries or keys.
      positions: [B, T] int32; negative (padding) positions are treated as 0.
      inv_freq: [H // 2] float32.
    """
    pos = jnp.maximum(positions, 0).astype(jnp.float32)
    freqs = pos[..., None] * jnp.asarray(inv_freq)  # [B, T, H/2]
    cos = jnp.cos(freqs)[:, :, None, :]
    sin = jnp.sin(freqs)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
