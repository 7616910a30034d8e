"""A small training config (the demo config, shrunk) and readers for a run's outputs."""

import json
import os
import signal

import ml_collections

from configs import demo


def small_config(**train_overrides) -> ml_collections.ConfigDict:
  """The demo config at test size: 2 layers, seq 128, batch 8, a loss line every step."""
  config = demo.get_config()
  config.model.update(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)
  config.data.seq_len = 128
  config.data.val_fraction = 0.1
  config.train.update(num_steps=3, global_batch_size=8, log_every=1, eval_every=0, export_hf="")
  config.train.update(train_overrides)
  config.checkpoint.update(every_steps=1000, keep=3)
  return config


def sigterm_at(step: int):
  """An `after_step` hook for `train.run` that sends this process SIGTERM after `step` (the real preemption path)."""

  def after_step(current: int) -> None:
    if current == step:
      os.kill(os.getpid(), signal.SIGTERM)

  return after_step


def losses(workdir: str) -> dict[int, float]:
  """step -> training loss, from metrics.jsonl."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      if "loss" in record:
        out[record["step"]] = record["loss"]
  return out
