"""Token-level cross-entropy on loss tokens only, with per-source sums (pure functions)."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from csft_jax.models.decoder import lm_head_logits
from csft_jax.sharding import constrain


@flax.struct.dataclass
class LossSums:
  """Sums over a (micro)batch; divide by the *global* token count to get means.

  Keeping sums rather than means is what makes gradient accumulation and sharding exact: the
  global mean is one division at the end, whatever the split.
  """

  loss: jax.Array  # sum of token cross-entropies over loss tokens
  z_loss: jax.Array  # sum of logsumexp(logits)**2 over loss tokens
  tokens: jax.Array  # number of loss tokens
  source_loss: jax.Array  # [num_sources] cross-entropy sums per source
  source_tokens: jax.Array  # [num_sources] loss tokens per source

  def __add__(self, other: LossSums) -> LossSums:
    return jax.tree.map(jnp.add, self, other)

  @classmethod
  def zeros(cls, num_sources: int) -> LossSums:
    z = jnp.zeros((), jnp.float32)
    return cls(z, z, z, jnp.zeros((num_sources,), jnp.float32), jnp.zeros((num_sources,), jnp.float32))


def loss_sums(
  logits: jax.Array, target_ids: jax.Array, loss_mask: jax.Array, source_ids: jax.Array, num_sources: int
) -> LossSums:
  """Cross-entropy sums over the tokens where `loss_mask` is 1.

  Args:
    logits: `[B, T, V]` (float32 from the model).
    target_ids: `[B, T]` next-token targets.
    loss_mask: `[B, T]` 1 on assistant target tokens, 0 elsewhere (prompt, padding).
    source_ids: `[B, T]` source index of each token.
    num_sources: number of sources (static).
  """
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, target_ids[..., None], axis=-1)[..., 0]
  mask = loss_mask.astype(jnp.float32)
  token_loss = (log_z - target_logit) * mask
  one_hot = jax.nn.one_hot(source_ids, num_sources, dtype=jnp.float32)
  return LossSums(
    loss=token_loss.sum(),
    z_loss=(jnp.square(log_z) * mask).sum(),
    tokens=mask.sum(),
    source_loss=jnp.einsum("bt,bts->s", token_loss, one_hot),
    source_tokens=jnp.einsum("bt,bts->s", mask, one_hot),
  )


def chunked_loss_sums(
  hidden: jax.Array,
  head: jax.Array,
  target_ids: jax.Array,
  loss_mask: jax.Array,
  source_ids: jax.Array,
  num_sources: int,
  *,
  chunk_size: int,
  head_layout: str = "dv",
) -> LossSums:
  """`loss_sums` of `hidden @ head` without ever holding the full `[B, T, V]` logits.

  The sequence is cut into chunks of `chunk_size` tokens; a `lax.scan` computes each chunk's
  float32 logits, reduces them to sums, and drops them. The chunk body is under
  `jax.checkpoint`, so the backward pass recomputes a chunk's logits instead of keeping them:
  peak memory is one `[B, chunk_size, V]` block (plus its gradient) instead of `[B, T, V]`
  twice. At 32 x 1024 tokens x 92,544 vocab per device the dense f32 logits are 12 GB.

  Args:
    hidden: `[B, T, D]` final hidden states (after the final norm).
    head: the LM head, `[D, V]` (`head_layout="dv"`) or a tied embedding `[V, D]` ("vd").
    target_ids, loss_mask, source_ids: `[B, T]`, as in `loss_sums`.
    num_sources: number of sources (static).
    chunk_size: tokens per chunk; T is padded up to a multiple (padding is not a loss token).
    head_layout: "dv" or "vd".

  Returns:
    The same sums as `loss_sums(hidden @ head, ...)` (equal up to float summation order).
  """
  batch, length, _ = hidden.shape
  chunk = max(1, min(chunk_size, length))
  pad = -length % chunk
  if pad:
    widths = ((0, 0), (0, pad))
    hidden = jnp.pad(hidden, widths + ((0, 0),))
    target_ids, loss_mask, source_ids = (jnp.pad(x, widths) for x in (target_ids, loss_mask, source_ids))
  num_chunks = (length + pad) // chunk

  def to_chunks(x):  # [B, T, ...] -> [num_chunks, B, chunk, ...], rows still sharded like the batch
    x = jnp.swapaxes(x.reshape(batch, num_chunks, chunk, *x.shape[2:]), 0, 1)
    return constrain(x, (None, "batch", "length", "embed")[: x.ndim])

  @jax.checkpoint
  def chunk_sums(hidden_chunk, targets, mask, sources):
    logits = lm_head_logits(hidden_chunk, head, head_layout)
    # Without this each device would compute the chunk's logits for every row of the batch.
    logits = constrain(logits, ("batch", "length", "vocab"))
    return loss_sums(logits, targets, mask, sources, num_sources)

  def body(total, xs):
    return total + chunk_sums(*xs), None

  total, _ = jax.lax.scan(
    body,
    LossSums.zeros(num_sources),
    (to_chunks(hidden), to_chunks(target_ids), to_chunks(loss_mask), to_chunks(source_ids)),
  )
  return total
