"""Bad checkpoints fail loudly, naming the tensor/field; nothing falls back to random weights."""

import json
import os
import shutil

import numpy as np
import pytest

from csft_jax.convert import load_hf, save_hf
from csft_jax.convert.safetensors_io import SafetensorsReader, write_sharded
from tests.hf_models import make_hf_model


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("llama")
  make_hf_model("llama").save_pretrained(path)
  return str(path)


def _rewrite(src: str, dst: str, edit) -> None:
  """Copies a checkpoint, letting `edit(dict name->array)` change its tensors."""
  shutil.copytree(src, dst)
  reader = SafetensorsReader(src)
  tensors = {n: np.array(reader.get(n)) for n in reader.names()}
  edit(tensors)
  os.remove(os.path.join(dst, "model.safetensors"))
  write_sharded(dst, [(n, a.shape, a.dtype) for n, a in tensors.items()], lambda n: tensors[n])


def test_unknown_architecture_lists_supported(llama_dir, tmp_path):
  dst = tmp_path / "gpt2"
  shutil.copytree(llama_dir, dst)
  config = json.loads((dst / "config.json").read_text())
  config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
  (dst / "config.json").write_text(json.dumps(config))
  with pytest.raises(
    ValueError, match=r"GPT2LMHeadModel.*Supported architectures: .*InternLM2ForCausalLM.*LlamaForCausalLM"
  ):
    load_hf(str(dst))


def test_missing_tensor_is_named(llama_dir, tmp_path):
  _rewrite(llama_dir, tmp_path / "m", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(ValueError, match=r"Missing \(1\): \['model.layers.1.mlp.up_proj.weight'\]"):
    load_hf(str(tmp_path / "m"))


def test_unexpected_tensor_is_named(llama_dir, tmp_path):
  def add(t):
    t["model.layers.0.self_attn.extra.weight"] = np.zeros((2, 2), np.float32)

  _rewrite(llama_dir, tmp_path / "u", add)
  with pytest.raises(ValueError, match=r"Unexpected \(1\): \['model.layers.0.self_attn.extra.weight'\]"):
    load_hf(str(tmp_path / "u"))


def test_shape_mismatch_names_tensor_and_both_shapes(llama_dir, tmp_path):
  def shrink(t):
    t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:8]

  _rewrite(llama_dir, tmp_path / "s", shrink)
  with pytest.raises(
    ValueError, match=r"model.layers.0.self_attn.k_proj.weight has shape \(8, 32\), expected \(16, 32\)"
  ):
    load_hf(str(tmp_path / "s"))


def test_missing_weights_file_and_config(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    load_hf(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps(make_hf_model("llama").config.to_dict()))
  with pytest.raises(FileNotFoundError, match="No safetensors weights"):
    load_hf(str(tmp_path))


def test_qwen_model_cannot_export_to_internlm2_layout(tmp_path):
  path = tmp_path / "q"
  make_hf_model("qwen2").save_pretrained(path)
  with pytest.raises(ValueError, match="Only InternLM2"):
    save_hf(load_hf(str(path)), str(tmp_path / "out"), layout="internlm2")
