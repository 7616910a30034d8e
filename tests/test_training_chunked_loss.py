"""The chunked LM head + cross-entropy equals the dense one: values, per-source sums, z-loss, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from csft_jax.training.loss import chunked_loss_sums, loss_sums

NUM_SOURCES = 3


def _inputs(seed: int, batch: int = 2, length: int = 37, dim: int = 16, vocab: int = 50):
  rng = np.random.default_rng(seed)
  hidden = jnp.asarray(rng.normal(size=(batch, length, dim)), jnp.float32)
  head = jnp.asarray(rng.normal(size=(dim, vocab)) / np.sqrt(dim), jnp.float32)
  targets = jnp.asarray(rng.integers(0, vocab, (batch, length)), jnp.int32)
  mask = jnp.asarray(rng.random((batch, length)) < 0.6, jnp.int8)
  sources = jnp.asarray(rng.integers(0, NUM_SOURCES, (batch, length)), jnp.int32)
  return hidden, head, targets, mask, sources


def _objective(sums):
  # Everything the trainer uses: the loss, z-loss and per-source sums all carry gradient here.
  return sums.loss + 0.1 * sums.z_loss + jnp.dot(sums.source_loss, jnp.arange(1.0, NUM_SOURCES + 1))


@pytest.mark.parametrize("chunk_size", [1, 8, 37, 64])
@pytest.mark.parametrize("layout", ["dv", "vd"])
def test_chunked_equals_dense_values_and_gradients(chunk_size, layout):
  hidden, head, targets, mask, sources = _inputs(seed=chunk_size)
  if layout == "vd":
    head = head.T

  def dense(hidden, head):
    equation = "btd,dv->btv" if layout == "dv" else "btd,vd->btv"
    return loss_sums(jnp.einsum(equation, hidden, head), targets, mask, sources, NUM_SOURCES)

  def chunked(hidden, head):
    return chunked_loss_sums(
      hidden, head, targets, mask, sources, NUM_SOURCES, chunk_size=chunk_size, head_layout=layout
    )

  want, got = dense(hidden, head), jax.jit(chunked)(hidden, head)
  for name in ("loss", "z_loss", "tokens", "source_loss", "source_tokens"):
    np.testing.assert_allclose(
      np.asarray(getattr(got, name)), np.asarray(getattr(want, name)), rtol=1e-5, atol=1e-5, err_msg=name
    )
  assert float(got.tokens) == float(mask.sum())  # padding of the last chunk adds no loss token

  grad_dense = jax.grad(lambda h, w: _objective(dense(h, w)), argnums=(0, 1))(hidden, head)
  grad_chunked = jax.jit(jax.grad(lambda h, w: _objective(chunked(h, w)), argnums=(0, 1)))(hidden, head)
  for want_grad, got_grad in zip(grad_dense, grad_chunked):
    np.testing.assert_allclose(np.asarray(got_grad), np.asarray(want_grad), rtol=1e-5, atol=1e-5)


def test_chunked_loss_never_materializes_full_logits():
  """The compiled backward keeps no [B, T, V] buffer: its temporaries stay far below the dense logits."""
  hidden, head, targets, mask, sources = _inputs(seed=0, batch=4, length=512, dim=32, vocab=4096)
  full_logits_bytes = 4 * 512 * 4096 * 4

  def grad_of(chunk_size):
    def f(h, w):
      if chunk_size:
        return _objective(chunked_loss_sums(h, w, targets, mask, sources, NUM_SOURCES, chunk_size=chunk_size))
      return _objective(loss_sums(jnp.einsum("btd,dv->btv", h, w), targets, mask, sources, NUM_SOURCES))

    compiled = jax.jit(jax.grad(f, argnums=(0, 1))).lower(hidden, head).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  chunk_logits_bytes = 4 * 64 * 4096 * 4
  dense_temp, chunked_temp = grad_of(0), grad_of(64)
  assert dense_temp >= full_logits_bytes  # the logits and their gradient
  assert chunked_temp <= 3 * chunk_logits_bytes, (dense_temp, chunked_temp)  # a chunk's, not the whole
