"""A model from disk with what it chats with: model, tokenizer and chat template.

`path` is one of
  * an HF directory (config.json + *.safetensors): its own tokenizer files and chat template
    ('hf'); exports of csft_jax runs carry the template they were trained with;
  * a training run W, W/checkpoints or W/checkpoints/<step> (latest step unless a step
    directory is named): the run's tokenizer copy and chat template (`RunDir.data_settings`);
  * a params-only checkpoint (tools/convert_from_hf.py): the tokenizer must be named.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from csft_jax import checkpointing, sharding
from csft_jax.convert.hf import is_hf_dir, load_hf, read_hf_config
from csft_jax.data.templates import ChatTemplate, load_chat_template, template_names
from csft_jax.data.tokenizer import has_tokenizer, load_tokenizer
from csft_jax.model_source import adapter_fields, check_vocab, resolve
from csft_jax.models import Decoder, lora
from csft_jax.models.decoder import rebuilt_from
from csft_jax.workdir import RunDir


class LoadError(ValueError):
  """A model path, tokenizer or template that cannot be used together."""


@dataclasses.dataclass
class ChatModelFiles:
  """A loaded model and what goes with it.

  Attributes:
    model: the decoder, parameters placed (sharded when a mesh was given).
    tokenizer: a transformers fast tokenizer.
    template: the chat template.
    kind: 'hf' or 'orbax'.
    path: the path that was loaded.
    run_dir: the training run the path belongs to, if any.
  """

  model: Decoder
  tokenizer: Any
  template: ChatTemplate
  kind: str
  path: str
  run_dir: RunDir | None


def load_model(
  path: str, *, dtype: str = "float32", mesh: Mesh | None = None, adapter: str = "", **overrides: Any
) -> tuple[Decoder, str]:
  """`(model, kind)` from an HF directory or an Orbax checkpoint (see the module docstring).

  `overrides` (`ModelConfig` fields such as `scan_layers`) apply to HF directories; an Orbax
  checkpoint keeps the layout it was saved with. A LoRA model (a LoRA run's step, or `path` as the
  base of `adapter`: a PEFT directory or a LoRA run) comes back with its adapters merged in memory.
  """
  model, kind = _load_weights(path, dtype=dtype, mesh=mesh, **overrides)
  if adapter:
    model = with_adapter(model, adapter, mesh)
  return (lora.merged(model) if model.config.lora_rank else model), kind


def with_adapter(base: Decoder, adapter: str, mesh: Mesh | None = None) -> Decoder:
  """`base` carrying the LoRA adapters of `adapter`: a PEFT directory, or a LoRA run's workdir or step.

  Raises:
    LoadError when `adapter` is neither, or its adapters do not fit `base`.
  """
  if base.config.lora_rank:
    raise LoadError(f"the model already has LoRA adapters; drop config.adapter={adapter!r}.")
  try:
    fields = adapter_fields(adapter, base.config.arch)
    arrays = lora.load_peft(adapter, base.config.replace(**fields)) if lora.is_peft_dir(adapter) else None
  except ValueError as e:
    raise LoadError(f"config.adapter={adapter!r}: {e}") from None
  config = base.config.replace(**fields)
  graphdef, abstract, _ = nnx.split(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))), nnx.LoRAParam, nnx.Param)
  if mesh is not None:
    shardings = sharding.state_shardings(abstract, mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  if arrays is None:
    adapters = checkpointing.restore_params(checkpointing.resolve_step_dir(adapter), abstract)
  else:
    try:
      adapters = lora.fill(abstract, arrays, adapter)
    except ValueError as e:
      raise LoadError(str(e)) from None
  return rebuilt_from(base, nnx.merge(graphdef, adapters, nnx.state(base, nnx.Param)))


def _load_weights(path: str, *, dtype: str, mesh: Mesh | None, **overrides: Any) -> tuple[Decoder, str]:
  if not os.path.exists(path):
    raise LoadError(
      f"checkpoint {path!r} does not exist: pass an HF model directory, a training workdir, "
      "or a checkpoint step directory."
    )
  if is_hf_dir(path):
    shardings = None
    if mesh is not None:
      # Each tensor goes straight to its shards: a model larger than one device still loads.
      config = read_hf_config(path, param_dtype=dtype, **{"dtype": dtype, **overrides})
      abstract = nnx.state(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))))
      shardings = nnx.as_pure(sharding.state_shardings(abstract, mesh))
    return load_hf(path, dtype=dtype, shardings=shardings, **overrides), "hf"
  if overrides:
    logging.info("Orbax checkpoint %s keeps its saved layout; ignoring %s.", path, sorted(overrides))
  return checkpointing.restore_model(path, dtype=dtype, mesh=mesh), "orbax"


def load_chat_model(
  path: str,
  *,
  dtype: str = "float32",
  mesh: Mesh | None = None,
  tokenizer: str = "",
  chat_template: str = "",
  adapter: str = "",
  **overrides: Any,
) -> ChatModelFiles:
  """Model, tokenizer and template for `path`; `tokenizer`/`chat_template` override the defaults.

  Raises:
    LoadError when no tokenizer or template is known, or the tokenizer does not fit the model.
  """
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise LoadError(
      f"checkpoint {path!r} does not exist: pass an HF model directory, a training workdir, "
      "or a checkpoint step directory."
    )
  run_dir = RunDir.containing(path)
  hf = is_hf_dir(path)
  if hf:
    own = path if has_tokenizer(path) else None
    default_tokenizer, default_template = own, ("hf" if own else None)
  elif run_dir is not None:
    default_tokenizer, default_template = run_dir.data_settings()
  else:
    default_tokenizer = default_template = None
  tokenizer_dir = tokenizer or default_tokenizer
  if not tokenizer_dir:
    raise LoadError(
      f"No tokenizer for checkpoint {path}: it has no tokenizer files and belongs to no training "
      "run; pass --config.tokenizer=DIR."
    )
  template_name = chat_template or default_template
  if not template_name:
    raise LoadError(
      f"No chat template known for checkpoint {path}; pass --config.chat_template={'|'.join(template_names())}."
    )
  loaded_tokenizer = load_tokenizer(tokenizer_dir)
  template = load_chat_template(template_name, loaded_tokenizer)
  try:
    model_config = resolve(path, adapter=adapter).model_config
  except (ValueError, checkpointing.CheckpointError) as e:
    raise LoadError(str(e)) from None
  # Checked before any parameter is read.
  check_vocab(len(loaded_tokenizer), model_config, tokenizer_dir, path, error=LoadError, fix="--config.tokenizer=DIR")
  model, kind = load_model(path, dtype=dtype, mesh=mesh, adapter=adapter, **overrides)
  # An HF directory is self-contained (also an export inside a run): it is its own home.
  return ChatModelFiles(model, loaded_tokenizer, template, kind, path, None if hf else run_dir)


def weight_files(checkpoint: str) -> list[str]:
  """The files that hold the weights of `checkpoint` (an HF directory's safetensors, a PEFT adapter's, a
  step's state)."""
  if is_hf_dir(checkpoint) or lora.is_peft_dir(checkpoint):
    return [os.path.join(checkpoint, name) for name in os.listdir(checkpoint) if name.endswith(".safetensors")]
  directory = os.path.join(checkpointing.resolve_step_dir(checkpoint), "state")
  return [os.path.join(root, name) for root, _, names in os.walk(directory) for name in names]
