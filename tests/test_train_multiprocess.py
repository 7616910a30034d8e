"""Two local processes (gloo collectives) x 2 devices train exactly like one process with 4 devices."""

import os

import jax
import pytest

from csft_jax import train
from csft_jax.sharding import make_mesh
from tests import run_local_processes
from tests.train_fixtures import losses, small_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("lora_rank", [0, 4], ids=["full", "lora"])
def test_two_processes_match_one_process_with_four_devices(tmp_path, lora_rank):
  reference = str(tmp_path / "one_process")
  config = small_config()
  config.lora.rank = lora_rank
  train.run(config, reference, mesh=make_mesh(4, 1, 1, devices=jax.devices()[:4]))

  workdir = str(tmp_path / "two_processes")
  overrides = [
    "--config.model.hidden_size=64",
    "--config.model.intermediate_size=128",
    "--config.model.num_layers=2",
    "--config.data.seq_len=128",
    "--config.train.num_steps=3",
    "--config.train.log_every=1",
    "--config.train.eval_every=0",
    "--config.checkpoint.every_steps=1000",
    "--config.train.export_hf=",
    f"--config.lora.rank={lora_rank}",
  ]
  if lora_rank:  # the base is saved once and the adapters exported, by every process together
    overrides.append("--config.train.export_peft=peft")
  outputs = run_local_processes(
    ["-m", "csft_jax.train", f"--config={REPO}/configs/demo.py", f"--workdir={workdir}", *overrides]
  )
  assert "over 4 devices (2 processes)" in outputs[0]
  single, multi = losses(reference), losses(workdir)
  assert sorted(multi) == [1, 2, 3]
  for step in (1, 2, 3):
    assert abs(single[step] - multi[step]) < 1e-5, (step, single[step], multi[step])
  if lora_rank:
    assert os.path.isdir(os.path.join(workdir, "base", "0", "state"))
    assert sorted(os.listdir(os.path.join(workdir, "peft"))) == ["adapter_config.json", "adapter_model.safetensors"]
