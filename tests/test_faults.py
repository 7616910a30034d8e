"""Promises under the faults the world makes, through the command lines a user runs.

A pretrained checkpoint stands in as a demo-shaped model saved in HF format in several safetensors
shards; each test breaks one thing the way a crash, a copy or a person does and checks the promise.
"""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from configs import demo
from csft_jax import checkpointing, configuration
from csft_jax.convert import save_hf
from csft_jax.data.config import DEMO_TOKENIZER
from csft_jax.models import Decoder, model_config_from
from tests import REPO_ROOT

# The demo config at test size; the model shape is what the HF stand-in below has.
SMALL = ["--config=configs/demo.py", "--config.model.hidden_size=64", "--config.model.intermediate_size=128",
         "--config.model.num_layers=2", "--config.data.seq_len=128", "--config.train.log_every=1",
         "--config.train.eval_every=0", "--config.train.export_hf="]


def python(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, "PYTHONUNBUFFERED": "1"})


def error_line(done: subprocess.CompletedProcess) -> str:
  """The one `error:` line a CLI prints for an expected error (and no traceback)."""
  assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
  lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1, done.stderr[-3000:]
  return lines[0]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> str:
  """A demo-shaped model (2 layers) as an HF directory with the demo tokenizer, in 4+ shards."""
  config = configuration.load("configs/demo.py", {"model.hidden_size": 64, "model.intermediate_size": 128,
                                                  "model.num_layers": 2})
  tokenizer_dir = configuration.resolve_path(DEMO_TOKENIZER)
  model = Decoder(model_config_from(config.model, 3000), rngs=nnx.Rngs(7))
  path = str(tmp_path_factory.mktemp("pretrained") / "hf")
  save_hf(model, path, max_shard_bytes=200_000, tokenizer_dir=tokenizer_dir)
  assert len(glob.glob(os.path.join(path, "model-*.safetensors"))) >= 4
  return path


def _first_loss(workdir) -> float:
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return next(json.loads(line)["loss"] for line in f if '"loss"' in line)


def test_converted_checkpoint_trains_from_either_layer_layout(pretrained, tmp_path):
  """Item 2: `convert_from_hf.py` saves scanned layers; the demo trains unrolled, and starts from it with the
  HF directory's weights (its first loss equals the run started from the HF directory)."""
  converted = tmp_path / "orbax"
  done = python("tools/convert_from_hf.py", f"--hf_dir={pretrained}", f"--out={converted}")
  assert done.returncode == 0, done.stderr[-3000:]
  from_hf = python("-m", "csft_jax.train", *SMALL, "--config.train.num_steps=1", f"--workdir={tmp_path / 'a'}",
                   f"--config.init.from_hf={pretrained}")
  assert from_hf.returncode == 0, from_hf.stderr[-3000:]
  from_orbax = python("-m", "csft_jax.train", *SMALL, "--config.train.num_steps=1", f"--workdir={tmp_path / 'b'}",
                      f"--config.init.from_checkpoint={converted}", f"--config.data.tokenizer={converted}/tokenizer")
  assert from_orbax.returncode == 0, from_orbax.stderr[-3000:]
  assert "started from config.init.from_checkpoint" in from_orbax.stderr
  assert _first_loss(tmp_path / "b") == _first_loss(tmp_path / "a")

  # The stored parameters, restored unrolled and scanned, are bitwise the HF import's.
  step_dir = checkpointing.resolve_step_dir(str(converted))
  scanned = nnx.to_pure_dict(nnx.state(checkpointing.restore_model(step_dir), nnx.Param))
  unrolled = nnx.to_pure_dict(nnx.state(checkpointing.restore_model(step_dir, scan_layers=False), nnx.Param))
  for layer in range(2):
    for a, b in zip(jax_leaves(unrolled["layers"][layer]), jax_leaves(scanned["layers"])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b)[layer])


def jax_leaves(tree):
  import jax  # pylint: disable=import-outside-toplevel
  return jax.tree.leaves(tree)


def test_a_checkpoint_missing_parameters_is_refused_naming_them(pretrained, tmp_path):
  """Item 2: a partial restore never half-fills the model."""
  converted = tmp_path / "orbax"
  assert python("tools/convert_from_hf.py", f"--hf_dir={pretrained}", f"--out={converted}").returncode == 0
  done = python("-m", "csft_jax.train", *SMALL, "--config.model.num_layers=3", "--config.train.num_steps=1",
                f"--workdir={tmp_path / 'w'}", f"--config.init.from_checkpoint={converted}",
                f"--config.data.tokenizer={converted}/tokenizer")
  message = error_line(done)
  assert "config.model.num_layers=3 but config.init.from_checkpoint" in message


def test_a_truncated_safetensors_shard_is_named_by_every_cli(pretrained, tmp_path):
  """Item 8: train, evaluate and convert each name the shard that is cut short."""
  broken = tmp_path / "hf"
  os.makedirs(broken)
  for name in os.listdir(pretrained):
    with open(os.path.join(pretrained, name), "rb") as src, open(broken / name, "wb") as dst:
      dst.write(src.read())
  shard = sorted(glob.glob(str(broken / "model-*.safetensors")))[1]
  with open(shard, "r+b") as f:
    f.truncate(os.path.getsize(shard) - 1000)
  runs = {
      "train": python("-m", "csft_jax.train", *SMALL, "--config.train.num_steps=1", f"--workdir={tmp_path / 'w'}",
                      f"--config.init.from_hf={broken}"),
      "evaluate": python("-m", "csft_jax.evaluate", "--config=configs/eval/cmb.py", f"--config.checkpoint={broken}",
                         f"--config.out_dir={tmp_path / 'eval'}"),
      "convert": python("tools/convert_from_hf.py", f"--hf_dir={broken}", f"--out={tmp_path / 'orbax'}"),
  }
  for name, done in runs.items():
    message = error_line(done)
    assert message.startswith(f"error: {shard}: ") and "cut short" in message, (name, message)
  assert not (tmp_path / "w").exists() and not (tmp_path / "eval").exists()
