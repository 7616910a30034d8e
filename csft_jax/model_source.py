"""One answer to "which model is this?": a model source resolved to its `ModelConfig`, without weights.

A source is an HF directory (config.json + *.safetensors), a training run W, W/checkpoints or a
step directory (the latest step unless one is named), optionally with a LoRA adapter on top (a
PEFT directory, or a LoRA run). Training init, evaluation, `--compile_for` and loading read the
model's shape here, and check a tokenizer against it here (`check_vocab`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from csft_jax import checkpointing
from csft_jax.convert.hf import is_hf_dir, read_hf_config
from csft_jax.models import ModelConfig, lora

LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_rslora", "lora_targets")


@dataclasses.dataclass(frozen=True)
class ModelSource:
  """A resolved model source.

  Attributes:
    path: the source as given (absolute).
    kind: 'hf' or 'orbax'.
    step_dir: the checkpoint step directory ('orbax'), else None.
    adapter: the LoRA adapter's path ('' for none).
    model_config: the model's config with `overrides` applied and, with an adapter, its LoRA fields.
  """

  path: str
  kind: str
  step_dir: str | None
  adapter: str
  model_config: ModelConfig


def resolve(path: str, *, adapter: str = "", **overrides: Any) -> ModelSource:
  """Reads the model config of `path` (+ `adapter`); `overrides` are `ModelConfig` fields.

  Raises:
    FileNotFoundError when `path` does not exist; `checkpointing.CheckpointError` when it is neither an
    HF directory nor a checkpoint; ValueError for an unreadable config or adapter.
  """
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"{path!r} does not exist: pass an HF model directory, a training workdir, or a checkpoint step directory."
    )
  if is_hf_dir(path):
    kind, step_dir, config = "hf", None, read_hf_config(path, **overrides)
  else:
    step_dir = checkpointing.resolve_step_dir(path)
    kind, config = "orbax", checkpointing.read_model_config(step_dir, **overrides)
  if adapter:
    config = config.replace(**adapter_fields(adapter, config.arch))
  return ModelSource(path, kind, step_dir, os.path.abspath(adapter) if adapter else "", config)


def adapter_fields(adapter: str, arch: str) -> dict[str, Any]:
  """The LoRA `ModelConfig` fields of `adapter`: a PEFT directory or a LoRA run (workdir or step).

  Raises:
    ValueError when `adapter` is neither, or its settings cannot be read.
  """
  if lora.is_peft_dir(adapter):
    return lora.read_peft_config(adapter, arch)
  try:
    stored = checkpointing.read_model_config(checkpointing.resolve_step_dir(adapter))
  except checkpointing.CheckpointError as e:
    raise ValueError(
      f"{adapter} is neither a PEFT adapter directory ({lora.ADAPTER_CONFIG}) nor a LoRA run: {e}"
    ) from None
  if not stored.lora_rank:
    raise ValueError(f"{adapter} is a full checkpoint, not a LoRA run or a PEFT adapter directory.")
  return {k: getattr(stored, k) for k in LORA_FIELDS}


def check_vocab(
  tokenizer_size: int,
  model_config: ModelConfig,
  tokenizer: str,
  source: str,
  error: type[Exception] = ValueError,
  fix: str = "config.data.tokenizer",
) -> None:
  """Refuses a tokenizer with more tokens than the model has embeddings (they do not belong together).

  Raises:
    `error` naming both, the sizes, and the setting that picks the model's own tokenizer (`fix`).
  """
  if tokenizer_size > model_config.vocab_size:
    raise error(
      f"tokenizer {tokenizer} has {tokenizer_size} tokens but the model from {source} has "
      f"vocab_size {model_config.vocab_size}: they do not belong together. Use the model's own "
      f"tokenizer ({fix})."
    )
