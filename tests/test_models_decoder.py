"""Decoder properties that do not need HF: layer scan, remat, KV cache, compile size."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from csft_jax.models import Decoder, KVCache, get_preset


def _ids(batch=2, length=10, vocab=512, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (batch, length)))


def _copy_stacked_into_unrolled(scanned: Decoder, unrolled: Decoder) -> None:
  flat = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(scanned))}
  for path, var in nnx.to_flat_state(nnx.state(unrolled)):
    if path[0] == "layers":
      var.set_value(flat[("layers",) + tuple(path[2:])][...][path[1]])
    else:
      var.set_value(flat[tuple(path)][...])


def test_scan_and_unrolled_layers_agree():
  scanned = Decoder(get_preset("tiny"), rngs=nnx.Rngs(0))
  unrolled = Decoder(get_preset("tiny", scan_layers=False), rngs=nnx.Rngs(1))
  _copy_stacked_into_unrolled(scanned, unrolled)
  np.testing.assert_allclose(scanned(_ids()), unrolled(_ids()), atol=1e-6)


@pytest.mark.parametrize("policy", ["full", "dots_saveable"])
def test_remat_keeps_values_and_gradients(policy):
  plain = Decoder(get_preset("tiny"), rngs=nnx.Rngs(0))
  remat = Decoder(get_preset("tiny", remat_policy=policy), rngs=nnx.Rngs(0))
  ids = _ids()

  def loss(model):
    return jnp.mean(jax.nn.log_softmax(model(ids))[..., 0])

  g_plain, g_remat = nnx.grad(loss)(plain), nnx.grad(loss)(remat)
  for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_kv_cache_prefill_and_decode_match_full_forward(scan_layers):
  config = get_preset("tiny", scan_layers=scan_layers)
  model = Decoder(config, rngs=nnx.Rngs(0))
  ids = _ids(length=9)
  # Row 1 is left-padded by 3 slots: its positions start at 0 on its first real token.
  segments = jnp.asarray([[1] * 6, [0, 0, 0, 1, 1, 1]])
  positions = jnp.asarray([list(range(6)), [0, 0, 0, 0, 1, 2]])
  logits, cache = model(ids[:, :6], positions=positions, segment_ids=segments, cache=KVCache.empty(config, 2, 12))
  steps = []
  for t in range(6, 9):
    step_logits, cache = model(
      ids[:, t : t + 1], positions=positions[:, -1:] + (t - 5), segment_ids=jnp.ones((2, 1), jnp.int32), cache=cache
    )
    steps.append(step_logits[:, 0])
  full_row0 = model(ids[:1])
  full_row1 = model(ids[1:, 3:])
  np.testing.assert_allclose(logits[0], full_row0[0, :6], atol=1e-5)
  np.testing.assert_allclose(logits[1, 3:], full_row1[0, :3], atol=1e-5)
  for i, t in enumerate(range(6, 9)):
    np.testing.assert_allclose(steps[i][0], full_row0[0, t], atol=1e-5)
    np.testing.assert_allclose(steps[i][1], full_row1[0, t - 3], atol=1e-5)


def _hlo_size(num_layers: int, scan_layers: bool) -> int:
  config = get_preset("tiny", num_layers=num_layers, scan_layers=scan_layers)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))))

  def forward(state, ids):
    return nnx.merge(graphdef, state)(ids)

  ids = jax.ShapeDtypeStruct((2, 16), jnp.int32)
  return len(jax.jit(forward).lower(state, ids).as_text())


def test_scanned_program_size_is_flat_in_depth():
  # Compile time follows program size: with nnx.scan one layer body is traced whatever the depth.
  scan_2, scan_16 = _hlo_size(2, True), _hlo_size(16, True)
  unrolled_2, unrolled_16 = _hlo_size(2, False), _hlo_size(16, False)
  assert scan_16 < 1.05 * scan_2
  assert unrolled_16 > 4 * unrolled_2
