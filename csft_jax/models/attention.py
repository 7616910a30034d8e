"""The one attention entry point of the model, and the segment-aware causal mask.

Every attention call goes through `attend`, so a Pallas/splash kernel can be added as another
`implementation` without touching the decoder.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_mask(q_segment_ids: jnp.ndarray, kv_segment_ids: jnp.ndarray, q_index: jnp.ndarray,
                   kv_index: jnp.ndarray, sliding_window: int | None = None) -> jnp.ndarray:
  """Boolean mask `[B, 1, Tq, Tkv]`: causal within a segment, never across segments.

  Args:
    q_segment_ids: `[B, Tq]`, 0 marks padding (attends nowhere).
    kv_segment_ids: `[B, Tkv]`, 0 marks padding or an empty cache slot (never attended).
    q_index: `[Tq]` slot index of each query in the row (cache slot when decoding).
    kv_index: `[Tkv]` slot index of each key.
    sliding_window: if set, a query sees at most this many most recent keys (Mistral).
  """
  same_segment = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
  valid = (q_segment_ids[:, :, None] != 0) & (kv_segment_ids[:, None, :] != 0)
  causal = kv_index[None, :] <= q_index[:, None]
  if sliding_window is not None:
    causal &= q_index[:, None] - kv_index[None, :] < sliding_window
  return (same_segment & valid & causal[None])[:, None]


def attend(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, mask: jnp.ndarray, *,
           implementation: str = "xla") -> jnp.ndarray:
  """Scaled dot-product attention with grouped KV heads.

  Args:
    q: `[B, Tq, heads, head_dim]`.
    k, v: `[B, Tkv, kv_heads, head_dim]`; heads must be a multiple of kv_heads.
    mask: boolean, broadcastable to `[B, heads, Tq, Tkv]`.
    implementation: 'xla' (any backend) or 'cudnn' (NVIDIA GPUs, flash attention).

  Returns:
    `[B, Tq, heads, head_dim]` in q's dtype. Rows whose mask is all False (padding) come out
    finite but meaningless; the loss masks them.
  """
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
