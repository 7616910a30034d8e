"""Run metrics: FLOPs/MFU accounting and the writers (console with ETA, metrics.jsonl, TensorBoard)."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import jax
import numpy as np

from csft_jax import files
from csft_jax.models.config import ModelConfig
from csft_jax.workdir import RunDir

# Dense bf16 peak FLOP/s per device (vendor figures). Unknown devices (e.g. CPU) get no MFU unless
# `config.train.peak_tflops` is set.
PEAK_BF16_FLOPS = {
  "TPU v4": 275e12,
  "TPU v5 lite": 197e12,
  "TPU v5e": 197e12,
  "TPU v5p": 459e12,
  "TPU v5": 459e12,
  "TPU v6 lite": 918e12,
  "TPU v6e": 918e12,
  "NVIDIA H100": 989e12,
  "NVIDIA H200": 989e12,
  "NVIDIA A100": 312e12,
  "NVIDIA B200": 2250e12,
}


def matmul_parameters(config: ModelConfig) -> tuple[int, int]:
  """(matmul parameters of all layers' projections, of the LM head); the embedding lookup is free."""
  d, h, k, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
  per_layer = d * (h + 2 * k) * hd + h * hd * d + 3 * d * config.intermediate_size
  return config.num_layers * per_layer, d * config.vocab_size


def training_flops_per_token(config: ModelConfig, seq_len: int) -> float:
  """Model FLOPs to train on one token (forward + backward = 3x forward), PaLM-style.

  6 * N counts the matmul parameters N (all layers' projections plus the LM head; the embedding
  lookup is free), and 12 * L * H * hd * T counts the attention score and value matmuls
  (QK^T and AV, 2 FLOPs per MAC, x3 for backward) over the full sequence length T, as computed
  by a dense masked kernel. Rematerialisation is not counted (it is overhead, not model FLOPs).
  """
  matmul_params = sum(matmul_parameters(config))
  attention = 12 * config.num_layers * config.num_heads * config.head_dim * seq_len
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


def itstime(step: int, every: int, total: int) -> bool:
  """The one cadence rule: every `every` steps (`every > 0`) and at the last step."""
  return every > 0 and (step % every == 0 or step == total)


class StepMeter:
  """Host-side token counts and wall time since the last `read()`: throughput and MFU.

  Counts are global (this process's rows times the process count: every process feeds an equal
  share). MFU counts model FLOPs over every token slot the step computes (padding included).
  """

  def __init__(self, *, flops_per_token: float, device_peak: float | None, num_devices: int, process_count: int):
    self.flops_per_token, self.device_peak = flops_per_token, device_peak
    self.num_devices, self.process_count = num_devices, process_count
    self._reset()

  def _reset(self) -> None:
    self.start, self.steps, self.real, self.loss_tokens, self.slots = time.time(), 0, 0, 0, 0

  def add(self, local: dict[str, np.ndarray]) -> None:
    """Counts one step's batch (this process's rows)."""
    self.steps += 1
    self.real += int((local["segment_ids"] > 0).sum()) * self.process_count
    self.loss_tokens += int(local["loss_mask"].sum()) * self.process_count
    self.slots += local["segment_ids"].size * self.process_count

  def read(self) -> dict[str, float]:
    """tokens_per_s, loss_tokens_per_s, step_time_s (and mfu when the peak is known); then restarts."""
    seconds = max(time.time() - self.start, 1e-9)
    scalars = {
      "tokens_per_s": self.real / seconds,
      "loss_tokens_per_s": self.loss_tokens / seconds,
      "step_time_s": seconds / max(self.steps, 1),
    }
    if self.device_peak:
      scalars["mfu"] = self.flops_per_token * self.slots / seconds / (self.device_peak * self.num_devices)
    self._reset()
    return scalars


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def drop_steps_after(path: str, step: int) -> None:
  """Rewrites `metrics.jsonl` without its records of steps after `step` (and a cut-off last line).

  A run killed after its last checkpoint, or a start that failed, logged steps that the resumed run
  logs again.
  """
  if not os.path.isfile(path):
    return
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  kept = []
  for line in lines:
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue  # a line cut off by a kill mid-write
    if isinstance(record, dict) and int(record.get("step", 0)) <= step:
      kept.append(line)
  if len(kept) != len(lines):
    files.write_text_atomic(path, "".join(line + "\n" for line in kept))


class MetricsWriter:
  """Writes one JSON object per logged step to `metrics.jsonl`, TensorBoard events, and a console line.

  Only the primary process (process 0) writes; others accept calls and do nothing. On resume from
  step s the file is first cut back to steps <= s, so every step appears once, as it ran last.
  """

  def __init__(self, run_dir: RunDir, *, total_steps: int, start_step: int, primary: bool):
    self.primary = primary
    self.total_steps = total_steps
    self.start_step = start_step
    self.start_time = time.time()
    self._jsonl = None
    self._tb = None
    if primary:
      drop_steps_after(run_dir.metrics, start_step)
      self._jsonl = open(run_dir.metrics, "a", encoding="utf-8")
      from tensorboardX import SummaryWriter  # imported here: only process 0 writes events

      self._tb = SummaryWriter(run_dir.tensorboard)

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
      print(
        f"step {step:>{width}}/{self.total_steps} | {text} | ETA {format_duration(self.eta_seconds(step))}",
        file=sys.stderr,
        flush=True,
      )

  def close(self) -> None:
    if self.primary:
      self._jsonl.close()
      self._tb.close()


def _plain(value: Any) -> Any:
  try:
    return float(value)
  except (TypeError, ValueError):
    return value
