"""Run metrics: FLOPs/MFU accounting and the writers (console with ETA, metrics.jsonl, TensorBoard)."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import jax

from csft_jax.models.config import ModelConfig

# Dense bf16 peak FLOP/s per device (vendor figures). Unknown devices (e.g. CPU) get no MFU unless
# `config.train.peak_tflops` is set.
PEAK_BF16_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12, "NVIDIA B200": 2250e12,
}


def training_flops_per_token(config: ModelConfig, seq_len: int) -> float:
  """Model FLOPs to train on one token (forward + backward = 3x forward), PaLM-style.

  6 * N counts the matmul parameters N (all layers' projections plus the LM head; the embedding
  lookup is free), and 12 * L * H * hd * T counts the attention score and value matmuls
  (QK^T and AV, 2 FLOPs per MAC, x3 for backward) over the full sequence length T, as computed
  by a dense masked kernel. Rematerialisation is not counted (it is overhead, not model FLOPs).
  """
  d, h, k, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
  per_layer = d * (h + 2 * k) * hd + h * hd * d + 3 * d * config.intermediate_size
  matmul_params = config.num_layers * per_layer + d * config.vocab_size
  attention = 12 * config.num_layers * h * hd * seq_len
  return 6 * matmul_params + attention


def peak_flops(device: jax.Device, override_tflops: float = 0.0) -> float | None:
  """Peak FLOP/s of one device, or None when unknown."""
  if override_tflops > 0:
    return override_tflops * 1e12
  kind = getattr(device, "device_kind", "")
  for name, flops in PEAK_BF16_FLOPS.items():
    if kind.startswith(name):
      return flops
  return None


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class MetricsWriter:
  """Writes one JSON object per logged step to `metrics.jsonl`, TensorBoard events, and a console line.

  Only the primary process (process 0) writes; others accept calls and do nothing.
  """

  def __init__(self, workdir: str, *, total_steps: int, start_step: int, primary: bool):
    self.primary = primary
    self.total_steps = total_steps
    self.start_step = start_step
    self.start_time = time.time()
    self._jsonl = None
    self._tb = None
    if primary:
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      from tensorboardX import SummaryWriter  # imported here: only process 0 writes events
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: dict[str, Any]) -> None:
    if not self.primary:
      return
    record = {"step": int(step), **{k: _plain(v) for k, v in scalars.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    for key, value in record.items():
      if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
        self._tb.add_scalar(key, value, step)
    self._tb.flush()

  def eta_seconds(self, step: int) -> float:
    done = step - self.start_step
    if done <= 0:
      return float("inf")
    return (time.time() - self.start_time) / done * (self.total_steps - step)

  def console(self, step: int, text: str) -> None:
    if self.primary:
      width = len(str(self.total_steps))
      print(f"step {step:>{width}}/{self.total_steps} | {text} | ETA {format_duration(self.eta_seconds(step))}",
            file=sys.stderr, flush=True)

  def close(self) -> None:
    if self.primary:
      self._jsonl.close()
      self._tb.close()


def _plain(value: Any) -> Any:
  try:
    return float(value)
  except (TypeError, ValueError):
    return value
