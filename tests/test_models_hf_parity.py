"""HF transformers (PyTorch, float32) is the reference: import, export and round trips."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from csft_jax.convert import load_hf, save_hf
from csft_jax.convert.safetensors_io import SafetensorsReader
from tests.hf_models import CONFIGS, TINY, make_hf_model, padded_batch, save_as_internlm2

ARCHS = sorted(CONFIGS)


def _hf_logits(model, ids, mask):
  with torch.no_grad():
    return model(input_ids=ids, attention_mask=mask).logits.numpy()


def _our_logits(model, ids, mask):
  return np.asarray(model(jnp.asarray(ids.numpy()), segment_ids=jnp.asarray(mask.numpy())))


@pytest.fixture(scope="module", params=ARCHS)
def hf_checkpoint(request, tmp_path_factory):
  arch = request.param
  model = make_hf_model(arch)
  path = tmp_path_factory.mktemp(f"hf_{arch}")
  model.save_pretrained(path)
  return arch, model, str(path)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_import_matches_hf_logits_on_padded_batch(hf_checkpoint, scan_layers):
  arch, hf_model, path = hf_checkpoint
  ids, mask = padded_batch(hf_model.config.vocab_size, [12, 7, 9])
  ours = load_hf(path, dtype="float32", scan_layers=scan_layers)
  valid = mask.numpy().astype(bool)
  diff = np.abs(_our_logits(ours, ids, mask) - _hf_logits(hf_model, ids, mask))[valid]
  assert diff.max() < 1e-4, f"{arch}: max abs logit diff {diff.max()}"


def test_export_loads_in_transformers_with_same_logits(hf_checkpoint, tmp_path):
  arch, hf_model, path = hf_checkpoint
  save_hf(load_hf(path), str(tmp_path), max_shard_bytes=40_000)
  assert os.path.exists(tmp_path / "model.safetensors.index.json")  # sharded on purpose
  reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
    str(tmp_path), output_loading_info=True, attn_implementation="eager"
  )
  assert info["missing_keys"] == set() or not info["missing_keys"]
  assert not info["unexpected_keys"] and not info["mismatched_keys"]
  assert type(reloaded).__name__ == type(hf_model).__name__
  ids, mask = padded_batch(hf_model.config.vocab_size, [10, 6], seed=1)
  np.testing.assert_array_equal(_hf_logits(reloaded.eval(), ids, mask), _hf_logits(hf_model, ids, mask))


def test_round_trip_is_bitwise(hf_checkpoint, tmp_path):
  _, _, path = hf_checkpoint
  save_hf(load_hf(path), str(tmp_path))
  source, exported = SafetensorsReader(path), SafetensorsReader(str(tmp_path))
  assert sorted(source.names()) == sorted(exported.names())
  for name in source.names():
    a, b = np.asarray(source.get(name)), np.asarray(exported.get(name))
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes(), name


def test_packed_row_equals_each_sequence_alone(hf_checkpoint):
  _, hf_model, path = hf_checkpoint
  ours = load_hf(path)
  rng = np.random.default_rng(0)
  lengths = [5, 8, 4]
  sequences = [rng.integers(0, hf_model.config.vocab_size, n) for n in lengths]
  packed_ids = np.concatenate(sequences + [np.zeros(3, np.int64)])[None]
  segment_ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(3, np.int64)])[None]
  positions = np.concatenate([np.arange(n) for n in lengths] + [np.zeros(3, np.int64)])[None]
  packed = np.asarray(
    ours(jnp.asarray(packed_ids), positions=jnp.asarray(positions), segment_ids=jnp.asarray(segment_ids))
  )
  start = 0
  for seq in sequences:
    alone = np.asarray(ours(jnp.asarray(seq[None])))[0]
    np.testing.assert_allclose(packed[0, start : start + len(seq)], alone, atol=1e-5)
    start += len(seq)


# ---- InternLM2: not in transformers; a Llama checkpoint repacked into its layout is the reference.


@pytest.fixture(scope="module")
def internlm2_checkpoint(tmp_path_factory):
  torch.manual_seed(3)
  config = transformers.LlamaConfig(**TINY, rope_theta=1_000_000.0, rms_norm_eps=1e-5)
  llama = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
  with torch.no_grad():
    for name, p in llama.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
  path = tmp_path_factory.mktemp("internlm2")
  tensors = save_as_internlm2(llama, path, rope_scaling={"type": "dynamic", "factor": 2.0})
  (path / "tokenizer_config.json").write_text("{}")
  return llama, tensors, str(path)


def test_internlm2_import_matches_llama_reference(internlm2_checkpoint):
  llama, _, path = internlm2_checkpoint
  ours = load_hf(path)
  assert ours.config.arch == "internlm2"
  ids, mask = padded_batch(llama.config.vocab_size, [11, 6])
  valid = mask.numpy().astype(bool)
  diff = np.abs(_our_logits(ours, ids, mask) - _hf_logits(llama, ids, mask))[valid]
  assert diff.max() < 1e-4


def test_internlm2_exports_own_layout_bitwise_and_llama_layout(internlm2_checkpoint, tmp_path):
  llama, tensors, path = internlm2_checkpoint
  model = load_hf(path)
  own = tmp_path / "own"
  save_hf(model, str(own))
  exported = SafetensorsReader(str(own))
  assert sorted(exported.names()) == sorted(tensors)
  for name, t in tensors.items():
    assert np.asarray(exported.get(name)).tobytes() == t.numpy().tobytes(), name
  config = json.loads((own / "config.json").read_text())
  assert config["architectures"] == ["InternLM2ForCausalLM"] and config["rope_scaling"]["type"] == "dynamic"
  assert (own / "tokenizer_config.json").exists()  # tokenizer files travel with the weights

  as_llama = tmp_path / "llama"
  save_hf(model, str(as_llama), layout="llama")
  reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
    str(as_llama), output_loading_info=True, attn_implementation="eager"
  )
  assert not info["missing_keys"] and not info["unexpected_keys"]
  ids, mask = padded_batch(llama.config.vocab_size, [9, 9])
  np.testing.assert_array_equal(_hf_logits(reloaded.eval(), ids, mask), _hf_logits(llama, ids, mask))
