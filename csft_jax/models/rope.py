"""Rotary position embeddings (the half-split "rotate_half" form used by HF Llama/Qwen/InternLM2)."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from csft_jax.models.config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> np.ndarray:
  """Per-pair inverse frequencies `[head_dim // 2]` in float32, with the config's scaling rule.

  `dynamic` (NTK) scaling only changes frequencies past `max_position_embeddings`; within the
  trained context it equals `default`, which is what we implement (sequences here are <= 32k).
  """
  dim = config.head_dim
  inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
  inv_freq = inv_freq.astype(np.float32)
  scaling = config.rope_scaling_dict
  rope_type = scaling.get("rope_type", "default")
  if rope_type == "linear":
    inv_freq = inv_freq / np.float32(scaling["factor"])
  elif rope_type == "llama3":
    inv_freq = _llama3_scaled(inv_freq, scaling)
  return inv_freq.astype(np.float32)


def _llama3_scaled(inv_freq: np.ndarray, scaling: dict) -> np.ndarray:
  # Llama 3.1 keeps high frequencies, divides low ones by `factor`, and interpolates in between.
  factor = scaling["factor"]
  low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
  old_context = scaling["original_max_position_embeddings"]
  low_freq_wavelen = old_context / low
  high_freq_wavelen = old_context / high
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
  smooth = (old_context / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return np.where(is_medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, inv_freq: np.ndarray) -> jnp.ndarray:
  """Rotates `x [B, T, heads, head_dim]` by `positions [B, T]`; angles are computed in float32.

  Returns:
    An array of `x`'s shape and dtype.
  """
  angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)[None, None, :]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin
