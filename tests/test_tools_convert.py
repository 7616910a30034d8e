"""The conversion CLIs: HF -> Orbax (trainer start point) -> HF, bitwise; workdir -> HF loads in transformers."""

import os
import subprocess
import sys

import numpy as np
import transformers

from csft_jax.convert.safetensors_io import SafetensorsReader
from tests.hf_models import make_hf_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool(name, *args):
  result = subprocess.run(
    [sys.executable, os.path.join(REPO, "tools", name), *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def test_hf_to_orbax_to_hf_is_bitwise(tmp_path):
  hf_dir = tmp_path / "hf"
  make_hf_model("qwen2").save_pretrained(hf_dir)
  (hf_dir / "tokenizer_config.json").write_text("{}")
  _tool("convert_from_hf.py", f"--hf_dir={hf_dir}", f"--out={tmp_path / 'ckpt'}")
  assert (tmp_path / "ckpt" / "0" / "state").is_dir()
  assert (tmp_path / "ckpt" / "tokenizer" / "tokenizer_config.json").exists()
  _tool("convert_to_hf.py", f"--checkpoint={tmp_path / 'ckpt'}", f"--out={tmp_path / 'back'}")
  source, back = SafetensorsReader(str(hf_dir)), SafetensorsReader(str(tmp_path / "back"))
  assert sorted(source.names()) == sorted(back.names())
  for name in source.names():
    assert np.asarray(source.get(name)).tobytes() == np.asarray(back.get(name)).tobytes(), name
  assert (tmp_path / "back" / "tokenizer_config.json").exists()


def test_training_workdir_exports_to_transformers(tmp_path):
  import jax

  from csft_jax import train
  from csft_jax.sharding import make_mesh
  from tests.train_fixtures import small_config

  workdir = str(tmp_path / "run")
  summary = train.run(
    small_config(num_steps=2, export_hf="hf_export"), workdir, mesh=make_mesh(1, 1, 1, devices=jax.devices()[:1])
  )
  _tool("convert_to_hf.py", f"--checkpoint={workdir}", f"--out={tmp_path / 'hf'}")
  model, info = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))  # demo tokenizer travelled along
  assert len(tokenizer) <= model.config.vocab_size
  # The run's chat template and its stop tokens travelled along too (chatml: <|im_end|>, <|endoftext|>).
  stops = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
  assert model.generation_config.eos_token_id == stops and model.config.eos_token_id == stops
  assert (tmp_path / "hf" / "chat_template.jinja").is_file()
  # train.export_hf wrote the same weights at the end of the run.
  assert summary["hf_export"] == os.path.join(workdir, "hf_export")
  at_end, cli = SafetensorsReader(summary["hf_export"]), SafetensorsReader(str(tmp_path / "hf"))
  for name in cli.names():
    assert np.asarray(at_end.get(name)).tobytes() == np.asarray(cli.get(name)).tobytes(), name
