"""Where a run's weights come from (restore_or_init), and the bad inputs a person can make there."""

import glob
import os
import subprocess
import sys

import jax
import pytest

from csft_jax import checkpointing, train
from csft_jax.models.config import ARCHITECTURE_FIELDS
from csft_jax.sharding import make_mesh
from csft_jax.workdir import RunDir
from tests import REPO_ROOT
from tests.hf_models import make_hf_model
from tests.train_fixtures import losses, sigterm_at, small_config


def _run(config, workdir, after_step=None):
  return train.run(config, str(workdir), mesh=make_mesh(1, 1, 1, devices=jax.devices()[:1]), after_step=after_step)


def _files_under(path) -> list[str]:
  return sorted(p for p in glob.glob(os.path.join(str(path), "**"), recursive=True) if os.path.isfile(p))


def test_init_from_a_missing_or_wrong_directory_is_refused_before_anything_is_written(tmp_path):
  config = small_config()
  config.init.from_hf = str(tmp_path / "missing")
  with pytest.raises(train.InitError, match=r"config.init.from_hf=.*missing.*no such directory"):
    _run(config, tmp_path / "a")
  orbax = tmp_path / "orbax_run"
  _run(small_config(num_steps=1), orbax)  # a csft_jax run, not an HF directory
  config.init.from_hf = str(orbax)
  with pytest.raises(train.InitError, match="not an HF model directory.*set config.init.from_checkpoint instead"):
    _run(config, tmp_path / "b")
  config = small_config()
  config.init.from_checkpoint = str(tmp_path / "missing")
  with pytest.raises(train.InitError, match="config.init.from_checkpoint: No checkpoint under"):
    _run(config, tmp_path / "c")
  assert not any((tmp_path / name).exists() for name in "abc")


def test_a_tokenizer_larger_than_the_model_is_refused_before_allocation(tmp_path):
  hf_dir = tmp_path / "hf"
  make_hf_model("qwen2").save_pretrained(hf_dir)  # vocab 101; the demo tokenizer has 3,000 tokens
  config = small_config()
  config.init.from_hf = str(hf_dir)
  with pytest.raises(train.InitError, match=r"config.model.hidden_size=64 but config.init.from_hf=.* has 32"):
    _run(config, tmp_path / "run")  # the demo's shape is not this model's
  for field in ARCHITECTURE_FIELDS:
    config.model[field] = None  # the architecture comes from the HF config
  with pytest.raises(
    train.InitError,
    match=r"has 3000 tokens but the model from config.init.from_hf=.* has "
    r"vocab_size 101",
  ):
    _run(config, tmp_path / "run")


def test_resume_refuses_a_changed_model_shape_naming_the_fields(tmp_path):
  workdir = tmp_path / "run"
  _run(small_config(num_steps=2), workdir)
  config = small_config(num_steps=4)
  config.model.update(hidden_size=96, num_layers=3)
  with pytest.raises(
    train.InitError,
    match=r"config.model.hidden_size=96 but the checkpoint of step 2 has 64, "
    r"config.model.num_layers=3 but the checkpoint of step 2 has 2",
  ):
    _run(config, workdir)


def _largest_tensor_file(step_dir: str) -> str:
  """The biggest array data file of a step (what a preemption cuts short)."""
  return max(glob.glob(os.path.join(step_dir, "state", "ocdbt.process_*", "d", "*")), key=os.path.getsize)


def _first_large_state_file(step_dir: str) -> str:
  return [p for p in _files_under(os.path.join(step_dir, "state")) if os.path.getsize(p) > 1000][0]


@pytest.mark.parametrize("broken", [_largest_tensor_file, _first_large_state_file])
def test_an_unreadable_latest_checkpoint_is_moved_aside_and_the_run_resumes_from_the_one_before(
  tmp_path, capsys, broken
):
  workdir = tmp_path / "run"
  config = small_config(num_steps=8)
  config.checkpoint.update(every_steps=2, keep=5)
  _run(config, workdir, after_step=sigterm_at(6))
  run_dir = RunDir(workdir)
  assert [int(s) for s in sorted(os.listdir(run_dir.checkpoints), key=int)] == [2, 4, 6]
  path = broken(os.path.join(run_dir.checkpoints, "6"))
  with open(path, "r+b") as f:  # a preempted copy: the file ends early
    f.truncate(os.path.getsize(path) // 2)

  summary = _run(config, workdir)
  err = capsys.readouterr().err
  assert "WARNING: checkpoint step 6 cannot be restored" in err and "moved it to" in err
  if broken is _largest_tensor_file:
    assert ", tensor " in err  # TensorStore names the array whose bytes are missing
  assert "resumed from step 4" in err and "unreadable steps [6]" in err
  assert os.path.isdir(os.path.join(run_dir.unreadable_checkpoints, "6"))
  assert summary["status"] == "finished" and summary["step"] == 8
  assert sorted(losses(str(workdir))) == list(range(1, 9))


def test_every_unreadable_checkpoint_stops_the_run_instead_of_starting_over(tmp_path):
  workdir = tmp_path / "run"
  config = small_config(num_steps=4)
  config.checkpoint.update(every_steps=2, keep=5)
  _run(config, workdir, after_step=sigterm_at(2))
  for path in _files_under(os.path.join(RunDir(workdir).checkpoints, "2", "state")):
    if os.path.getsize(path) > 1000:
      with open(path, "r+b") as f:
        f.truncate(10)
  with pytest.raises(
    checkpointing.CheckpointError, match=r"no checkpoint of .* can be read \(steps \[2\].*not starting over"
  ):
    _run(config, workdir)


def _cli(*args):
  return subprocess.run(
    [sys.executable, "-m", "csft_jax.train", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600
  )


def test_cli_sets_optional_source_fields_and_drops_sources(tmp_path):
  """Typed placeholders: weight/max_samples accept values from the command line; enabled=False drops a source."""
  done = _cli(
    "--config=configs/demo.py",
    f"--workdir={tmp_path / 'w'}",
    "--plan_only",
    "--config.data.mixing=explicit",
    "--config.data.sources.alpaca_qa.weight=2.0",
    "--config.data.sources.doctor_qa.max_samples=5",
    "--config.data.sources.messages_chat.enabled=False",
  )
  assert done.returncode == 0, done.stderr[-2000:]
  from csft_jax import configuration
  from csft_jax.data.pipeline import DataPipeline

  config = configuration.load(
    "configs/demo.py", {"data.sources.alpaca_qa.weight": 2.0, "data.sources.messages_chat.enabled": False}
  )
  assert config.data.sources.alpaca_qa.weight == 2.0
  pipeline = DataPipeline(config.data)
  assert "messages_chat" not in pipeline.source_names and len(pipeline.source_names) == 5


def test_cli_errors_are_one_line_and_leave_no_workdir(tmp_path):
  workdir = tmp_path / "w"
  done = _cli("--config=configs/demo.py", f"--workdir={workdir}", "--config.data.sources.alpaca_qa.path=nope.jsonl")
  assert done.returncode == 1
  message = done.stderr.strip().splitlines()[-2]
  assert message.startswith("error: source 'alpaca_qa': path ") and "nope.jsonl' not found" in message
  assert "Traceback" not in done.stderr and not workdir.exists()
  blocked = tmp_path / "file"
  blocked.write_text("not a directory")
  done = _cli("--config=configs/demo.py", f"--workdir={blocked / 'w'}")
  assert done.returncode == 1 and "error: --workdir: cannot write to" in done.stderr and "Traceback" not in done.stderr


def test_plan_only_needs_no_devices():
  """The 7B recipe's v5p-8 preset (fsdp=4) planned on a host with one CPU device."""
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  done = subprocess.run(
    [sys.executable, "-m", "csft_jax.train", "--config=configs/collectivesft_internlm2_5_7b.py:v5p-8", "--plan_only"],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=600,
    env=env,
  )
  assert done.returncode == 0, done.stderr[-2000:]
  assert "mesh {'data': 1, 'fsdp': 4, 'tensor': 1}" in done.stdout
  params = next(line for line in done.stdout.splitlines() if line.startswith("params"))
  total, per_device = map(float, params.split()[1:3])
  assert per_device < total / 3.9
