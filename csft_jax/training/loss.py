"""Token-level cross-entropy on loss tokens only, with per-source sums (pure functions)."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


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

  def __add__(self, other: "LossSums") -> "LossSums":
    return jax.tree.map(jnp.add, self, other)

  @classmethod
  def zeros(cls, num_sources: int) -> "LossSums":
    z = jnp.zeros((), jnp.float32)
    return cls(z, z, z, jnp.zeros((num_sources,), jnp.float32), jnp.zeros((num_sources,), jnp.float32))


def loss_sums(logits: jax.Array, target_ids: jax.Array, loss_mask: jax.Array, source_ids: jax.Array,
              num_sources: int) -> LossSums:
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
      loss=token_loss.sum(), z_loss=(jnp.square(log_z) * mask).sum(), tokens=mask.sum(),
      source_loss=jnp.einsum("bt,bts->s", token_loss, one_hot),
      source_tokens=jnp.einsum("bt,bts->s", mask, one_hot))
