"""`attend` implementations against `xla` (the dense masked reference), values and gradients in f32."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from csft_jax.models import Decoder, KVCache, get_preset
from csft_jax.models.attention import AttentionMask, _live_pairs, attend
from csft_jax.sharding import activation_sharding, make_mesh

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16


def _packed_rows(length: int, segments_per_row: list[int], padding: int, seed: int = 0) -> np.ndarray:
  """Segment ids `[rows, length]`: row r holds `segments_per_row[r]` packed examples, then `padding` zeros."""
  rng = np.random.default_rng(seed)
  rows = np.zeros((len(segments_per_row), length), np.int32)
  for row, count in enumerate(segments_per_row):
    cuts = np.sort(rng.choice(np.arange(1, length - padding), count - 1, replace=False))
    rows[row, : length - padding] = 1 + np.searchsorted(cuts, np.arange(length - padding), side="right")
  return rows


def _qkv(batch: int, q_len: int, kv_len: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(batch, q_len, HEADS, HEAD_DIM))
  k = rng.normal(size=(batch, kv_len, KV_HEADS, HEAD_DIM))
  v = rng.normal(size=(batch, kv_len, KV_HEADS, HEAD_DIM))
  return tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v))


@functools.partial(jax.jit, static_argnums=0, static_argnames=("block_q", "block_kv"))
def _values_and_grads(implementation: str, q, k, v, mask: AttentionMask, **blocks):
  """Outputs on real queries and the gradients of a loss over them (padding rows carry no loss)."""
  real = (mask.q_segment_ids != 0)[:, :, None, None]
  weights = jnp.cos(jnp.arange(HEADS * HEAD_DIM, dtype=jnp.float32)).reshape(HEADS, HEAD_DIM)

  def loss(q, k, v):
    out = jnp.where(real, attend(q, k, v, mask, implementation=implementation, **blocks), 0.0)
    return jnp.sum(out * weights), out

  grads, out = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  return out, grads


def _assert_same(implementation: str, q, k, v, mask: AttentionMask, **blocks):
  want, want_grads = _values_and_grads("xla", q, k, v, mask)
  got, got_grads = _values_and_grads(implementation, q, k, v, mask, **blocks)
  np.testing.assert_allclose(got, want, atol=1e-5)
  for name, g, w in zip("qkv", got_grads, want_grads):
    np.testing.assert_allclose(g, w, atol=1e-5, err_msg=f"d{name}")


# Rows of 1, 3 and 7 packed examples plus a padded tail; 100 slots is not a multiple of the blocks.
SEGMENTS = _packed_rows(100, [1, 3, 7], padding=13)


@pytest.mark.parametrize("window", [None, 9])
def test_blockwise_equals_xla_on_packed_padded_rows(window):
  q, k, v = _qkv(3, 100, 100)
  _assert_same("blockwise", q, k, v, AttentionMask.causal(jnp.asarray(SEGMENTS), window), block_q=16, block_kv=32)


@pytest.mark.parametrize("window", [None, 9])
def test_splash_interpret_equals_xla_on_packed_padded_rows(window):
  # The kernel's tiles are 128 wide: 300 slots make a 3 x 3 grid of them, the last one padded.
  segments = jnp.asarray(_packed_rows(300, [1, 3, 7], padding=29))
  q, k, v = _qkv(3, 300, 300)
  _assert_same("splash", q, k, v, AttentionMask.causal(segments, window), block_q=128, block_kv=128)


def test_blockwise_equals_xla_against_a_kv_cache():
  # Queries at cache slots 20..27 over a 64-slot cache: left padding, then filled slots, then empty ones.
  q, k, v = _qkv(2, 8, 64, seed=1)
  kv_segments = np.zeros((2, 64), np.int32)
  kv_segments[0, :28] = 1
  kv_segments[1, 5:28] = 1
  mask = AttentionMask(
    jnp.ones((2, 8), jnp.int32), jnp.asarray(kv_segments), 20 + jnp.arange(8), jnp.arange(64), sliding_window=6
  )
  _assert_same("blockwise", q, k, v, mask, block_q=4, block_kv=16)


def test_blockwise_runs_only_the_live_pairs():
  # With contiguous segments, a pair is live exactly when its block of the dense mask has an allowed entry.
  block = 10
  mask = AttentionMask.causal(jnp.asarray(SEGMENTS))
  pairs, count = jax.jit(_live_pairs, static_argnums=(1, 2))(mask, block, block)
  dense = np.asarray(mask.dense())[:, 0].reshape(3, 10, block, 10, block).any(axis=(2, 4))
  assert int(count) == dense.sum() == 105  # of 300 pairs, 165 of them causal
  np.testing.assert_array_equal(np.sort(np.asarray(pairs[:count])), np.flatnonzero(dense))


def test_blockwise_per_shard_equals_unsharded():
  segments = jnp.asarray(_packed_rows(64, [1, 3, 7, 2], padding=5))
  q, k, v = _qkv(4, 64, 64)
  mask = AttentionMask.causal(segments)
  want, want_grads = _values_and_grads("blockwise", q, k, v, mask, block_q=16, block_kv=16)
  with activation_sharding(make_mesh(2, 2, 2, devices=jax.devices()[:8])):
    # A fresh trace (not the cached unsharded one), made under the mesh.
    got, got_grads = jax.jit(
      lambda q, k, v: _values_and_grads.__wrapped__("blockwise", q, k, v, mask, block_q=16, block_kv=16)
    )(q, k, v)
  np.testing.assert_allclose(got, want, atol=1e-6)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, atol=1e-6)


def test_decoder_blockwise_prefill_and_decode_equal_xla():
  # Mistral's sliding window (4 slots) over a left-padded prompt, then two decode steps.
  config = get_preset("tiny", sliding_window=4, attention_block_q=4, attention_block_kv=4)
  xla = Decoder(config, rngs=nnx.Rngs(0))
  blockwise = Decoder(config.replace(attention_impl="blockwise"), rngs=nnx.Rngs(0))
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 512, (2, 8)))
  segments = jnp.asarray([[1] * 6, [0, 0, 0, 1, 1, 1]])  # row 1 left-padded
  positions = jnp.asarray([list(range(6)), [0, 0, 0, 0, 1, 2]])
  run = nnx.jit(
    lambda model, ids, positions, segments, cache: model(ids, positions=positions, segment_ids=segments, cache=cache)
  )
  outputs = []
  for model in (xla, blockwise):
    logits, cache = run(model, ids[:, :6], positions, segments, KVCache.empty(config, 2, 12))
    steps = [logits[:, 3:]]
    for t in range(6, 8):
      step, cache = run(model, ids[:, t : t + 1], positions[:, -1:] + (t - 5), jnp.ones((2, 1), jnp.int32), cache)
      steps.append(step)
    outputs.append(jnp.concatenate(steps, axis=1))
  np.testing.assert_allclose(outputs[1], outputs[0], atol=1e-5)
