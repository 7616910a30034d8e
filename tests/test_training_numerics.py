"""Pure training numerics against hand-written references: loss sums, schedule, decay mask, FLOPs."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from csft_jax.models import Decoder, get_preset
from csft_jax.training.loss import loss_sums
from csft_jax.training.metrics import peak_flops, training_flops_per_token
from csft_jax.training.optimizer import decay_mask, learning_rate_schedule


def test_loss_sums_match_numpy_per_source():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((2, 5, 7)).astype(np.float32)
  targets = rng.integers(0, 7, (2, 5))
  mask = np.array([[0, 1, 1, 0, 1], [1, 1, 0, 0, 0]])
  sources = np.array([[0, 0, 2, 2, 2], [1, 1, 1, 1, 1]])
  sums = loss_sums(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask), jnp.asarray(sources), 3)
  log_z = np.log(np.exp(logits).sum(-1))
  token_loss = log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(sums.loss, (token_loss * mask).sum(), rtol=1e-6)
  np.testing.assert_allclose(sums.z_loss, (log_z**2 * mask).sum(), rtol=1e-6)
  assert float(sums.tokens) == 5
  for s in range(3):
    np.testing.assert_allclose(sums.source_loss[s], (token_loss * mask * (sources == s)).sum(), rtol=1e-6, atol=1e-7)
    assert float(sums.source_tokens[s]) == (mask * (sources == s)).sum()


def _optim(schedule, **kw):
  base = dict(lr=1.0, warmup_steps=0, warmup_fraction=0.1, min_lr_ratio=0.1, schedule=schedule)
  base.update(kw)
  return ml_collections.ConfigDict(base)


def test_schedules_warm_up_then_decay_to_min_ratio():
  cosine = learning_rate_schedule(_optim("cosine"), 100)
  assert float(cosine(0)) == 0.0 and math.isclose(float(cosine(5)), 0.5, rel_tol=1e-6)
  assert math.isclose(float(cosine(10)), 1.0, rel_tol=1e-6)
  # Half-way through the decay: min + (1 - min) * (1 + cos(pi / 2)) / 2 = 0.55.
  assert math.isclose(float(cosine(55)), 0.55, rel_tol=1e-5)
  assert math.isclose(float(cosine(100)), 0.1, rel_tol=1e-5)
  linear = learning_rate_schedule(_optim("linear", warmup_steps=20), 100)
  assert math.isclose(float(linear(20)), 1.0, rel_tol=1e-6) and math.isclose(float(linear(60)), 0.55, rel_tol=1e-5)
  constant = learning_rate_schedule(_optim("constant"), 100)
  assert float(constant(50)) == 1.0


def test_no_weight_decay_on_norms_and_biases():
  config = get_preset("tiny", qkv_bias=True, qk_norm=True)
  params = nnx.state(Decoder(config, rngs=nnx.Rngs(0)), nnx.Param)
  flags = {}
  for path, decays in jax.tree_util.tree_flatten_with_path(decay_mask(params))[0]:
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    flags["/".join(n for n in names if n != "value")] = bool(decays)
  assert len(flags) == 17
  assert sorted(k for k, v in flags.items() if v) == [
    "embed/embedding",
    "layers/attn/k_proj/kernel",
    "layers/attn/o_proj/kernel",
    "layers/attn/q_proj/kernel",
    "layers/attn/v_proj/kernel",
    "layers/mlp/down_proj/kernel",
    "layers/mlp/gate_proj/kernel",
    "layers/mlp/up_proj/kernel",
    "lm_head/kernel",
  ]


def test_training_flops_formula():
  config = get_preset("tiny")  # d=64, 4 heads (hd 16), 2 kv heads, mlp 128, 2 layers, vocab 512
  per_layer = 64 * (4 + 2 * 2) * 16 + 4 * 16 * 64 + 3 * 64 * 128
  expected = 6 * (2 * per_layer + 64 * 512) + 12 * 2 * 4 * 16 * 256
  assert training_flops_per_token(config, 256) == expected
  assert peak_flops(jax.devices()[0], override_tflops=100.0) == 100e12
