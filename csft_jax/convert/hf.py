"""HF checkpoint import (`load_hf`) and export (`save_hf`), streaming tensor by tensor."""

from __future__ import annotations

import gc
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from csft_jax import files
from csft_jax.convert import layouts
from csft_jax.convert.safetensors_io import SafetensorsReader, write_sharded
from csft_jax.data.tokenizer import TOKENIZER_FILES
from csft_jax.models.config import ModelConfig
from csft_jax.models.decoder import Decoder


def is_hf_dir(path: str) -> bool:
  """Whether `path` is a Hugging Face model directory: config.json and safetensors weights."""
  return (
    os.path.isdir(path)
    and os.path.isfile(os.path.join(path, "config.json"))
    and any(name.endswith(".safetensors") for name in os.listdir(path))
  )


# Files copied next to exported weights when they exist in the source directory.
COPIED_FILES = (*TOKENIZER_FILES, "generation_config.json")


def read_hf_config(hf_dir: str, **overrides: Any) -> ModelConfig:
  """`ModelConfig` from `hf_dir/config.json` with `overrides` (e.g. `dtype`, `scan_layers`)."""
  path = os.path.join(hf_dir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: `hf_dir` must be an HF model directory with config.json.")
  with open(path) as f:
    hf = json.load(f)
  return layouts.model_config_from_hf(hf, source=path, **overrides)


def param_paths(config: ModelConfig, layout: str) -> Iterator[tuple[layouts.TensorRule, int | None]]:
  """Every (rule, layer index or None) of a checkpoint, in HF file order."""
  rules = layouts.global_rules(config, layout)
  yield rules[0], None
  for i in range(config.num_layers):
    for rule in layouts.layer_rules(config, layout):
      yield rule, i
  for rule in rules[1:]:
    yield rule, None


def _hf_name(rule: layouts.TensorRule, layer: int | None) -> str:
  return rule.hf if layer is None else rule.hf.format(i=layer)


def _state_key(config: ModelConfig, path: str, layer: int | None) -> tuple:
  parts = tuple(path.split("."))
  if layer is None:
    return parts
  # Scanned layers are stacked on a leading axis; unrolled ones are an indexed list.
  return ("layers",) + parts if config.scan_layers else ("layers", layer) + parts


def load_hf(
  path: str, dtype: str = "float32", *, shardings: Any = None, param_dtype: str | None = None, **config_overrides: Any
) -> Decoder:
  """Imports an HF checkpoint directory (safetensors, sharded or not) into a `Decoder`.

  Tensors are read one at a time from memory-mapped files; parameters of scanned layers fill a
  stacked buffer that is handed to JAX (and freed) as soon as its last layer is read, so peak
  host memory stays near the model's size in `dtype`.

  Args:
    path: HF model directory (config.json + *.safetensors).
    dtype: compute dtype, and parameter dtype unless `param_dtype` is given.
    shardings: optional pytree of `jax.sharding.Sharding` matching the model state (see
      `csft_jax.sharding.state_shardings`); each parameter is placed directly with it.
    param_dtype: parameter dtype (e.g. float32 master weights under bfloat16 compute).
    **config_overrides: other `ModelConfig` fields to override (e.g. `scan_layers=False`).

  Returns:
    The model; `model.hf_source_dir` remembers `path` so `save_hf` can copy the tokenizer.

  Raises:
    ValueError: unsupported architecture, missing/unexpected tensors, or a shape mismatch.
  """
  param_dtype = param_dtype or dtype
  config = read_hf_config(path, dtype=dtype, param_dtype=param_dtype, **config_overrides)
  layout = layouts.default_layout(config)
  reader = SafetensorsReader(path)
  _check_tensor_names(reader, config, layout, path)

  abstract = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  targets = {tuple(p): v for p, v in nnx.to_flat_state(abstract_state)}
  flat_shardings = {tuple(p): s for p, s in nnx.to_flat_state(shardings)} if shardings is not None else {}
  np_dtype = np.dtype(jnp.dtype(param_dtype))
  values: dict[tuple, jax.Array] = {}
  stacked: dict[tuple, list] = {}  # key -> [buffer, layers filled]

  def place(key: tuple, array: np.ndarray) -> jax.Array:
    sharding = flat_shardings.get(key)
    if sharding is None:
      placed = jax.device_put(array)  # one copy; jnp.asarray would stage a second, transient one
    else:
      placed = jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])
    # The transfer is asynchronous and keeps `array` alive until it is done: waiting here bounds
    # the host peak to one buffer in flight, however slow the device or the host is.
    return placed.block_until_ready()

  for rule, layer in param_paths(config, layout):
    name = _hf_name(rule, layer)
    hf_array = reader.get(name)
    if tuple(hf_array.shape) != rule.hf_shape:
      raise ValueError(
        f"{path}: tensor {name} has shape {tuple(hf_array.shape)}, expected {rule.hf_shape} "
        f"from config.json ({config.arch})."
      )
    for our_path, array in zip(rule.ours, rule.to_ours(hf_array)):
      key = _state_key(config, our_path, layer)
      target_shape = targets[key].shape
      if layer is not None and config.scan_layers:
        if key not in stacked:
          stacked[key] = [np.empty(target_shape, np_dtype), 0]
        stacked[key][0][layer] = array  # the one copy: memory-mapped file -> stacked buffer
        stacked[key][1] += 1
        if stacked[key][1] == config.num_layers:
          values[key] = place(key, stacked.pop(key)[0])
          # The host buffer can stay reachable from a reference cycle after the transfer;
          # collecting here keeps the peak near one model instead of growing with each stack.
          gc.collect()
      else:
        values[key] = place(key, np.asarray(array, np_dtype))
      del array
    del hf_array

  for key, variable in targets.items():
    variable.set_value(values[key])
  model = nnx.merge(graphdef, abstract_state)
  model.hf_source_dir = path
  return model


def _check_tensor_names(reader: SafetensorsReader, config: ModelConfig, layout: str, path: str) -> None:
  expected = {_hf_name(rule, layer) for rule, layer in param_paths(config, layout)}
  present = {n for n in reader.names() if not n.endswith(layouts.IGNORED_SUFFIXES)}
  if config.tie_embeddings:
    # Some tied checkpoints also store the (identical) head; it carries no information.
    present.discard("lm_head.weight" if layout == "llama" else "output.weight")
  missing = sorted(expected - present)
  unexpected = sorted(present - expected)
  if missing or unexpected:
    raise ValueError(
      f"{path}: checkpoint tensors do not match config.json ({config.arch}, {config.num_layers} layers). "
      f"Missing ({len(missing)}): {missing[:10]}{' ...' if len(missing) > 10 else ''}. "
      f"Unexpected ({len(unexpected)}): {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}."
    )


def _host_array(value: jax.Array, index: int | None) -> np.ndarray:
  if index is not None:
    value = value[index]
  if not value.is_fully_addressable:
    value = jax.experimental.multihost_utils.process_allgather(value, tiled=True)
  return np.asarray(jax.device_get(value))


def save_hf(
  model: Decoder,
  path: str,
  *,
  layout: str | None = None,
  dtype: str | None = None,
  max_shard_bytes: int = 5 * 2**30,
  tokenizer_dir: str | None = None,
  stop_token_ids: Sequence[int] | None = None,
  chat_template: str | None = None,
) -> None:
  """Writes `model` as an HF directory: config.json, (sharded) safetensors, tokenizer files.

  Args:
    model: a `Decoder`.
    path: output directory.
    layout: 'llama' (loadable by `transformers.AutoModelForCausalLM`) or 'internlm2' (InternLM2's
      own layout, loaded with its remote code); default: the model's own.
    dtype: tensor dtype in the files (default: the parameter dtype).
    max_shard_bytes: shard size; more than one shard writes `model-0000k-of-0000n` + index.
    tokenizer_dir: where to copy tokenizer files from; default the directory the model was
      loaded from (`load_hf`), if any.
    stop_token_ids: the chat template's end-of-turn and end-of-sequence ids, written as
      `eos_token_id` of config.json and generation_config.json so that `generate` stops at the end
      of the turn (default: the model config's `eos_token_id`).
    chat_template: a Jinja chat template written as chat_template.jinja (the template the model
      was trained with), replacing the copied tokenizer's.
  """
  config: ModelConfig = model.config
  layout = layout or layouts.default_layout(config)
  if layout not in ("llama", "internlm2"):
    raise ValueError(f"layout={layout!r}; choose 'llama' or 'internlm2'.")
  if layout == "internlm2" and config.arch != "internlm2":
    raise ValueError(f"Only InternLM2 models export to the internlm2 layout (this one is {config.arch}).")
  out_dtype = np.dtype(jnp.dtype(dtype or config.param_dtype))
  state = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}

  def our_arrays(rule: layouts.TensorRule, layer: int | None) -> tuple[np.ndarray, ...]:
    index = layer if (layer is not None and config.scan_layers) else None
    return tuple(_host_array(state[_state_key(config, p, layer)][...], index) for p in rule.ours)

  entries = list(param_paths(config, layout))
  by_name = {_hf_name(rule, layer): (rule, layer) for rule, layer in entries}
  tensors = [(_hf_name(rule, layer), rule.hf_shape, out_dtype) for rule, layer in entries]

  def produce(name: str) -> np.ndarray:
    rule, layer = by_name[name]
    return rule.to_hf(our_arrays(rule, layer)).astype(out_dtype)

  torch_dtype = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[out_dtype.name]
  if stop_token_ids:
    stops = [int(i) for i in stop_token_ids]
    config = config.replace(eos_token_id=stops[0] if len(stops) == 1 else tuple(stops))
  if jax.process_index() == 0:
    os.makedirs(path, exist_ok=True)
    write_sharded(path, tensors, produce, max_shard_bytes)
    hf_config = layouts.hf_config_from_model(config, layout, torch_dtype)
    files.write_json_atomic(os.path.join(path, "config.json"), hf_config)
    copy_tokenizer_files(tokenizer_dir or getattr(model, "hf_source_dir", None), path, copy_code=layout == "internlm2")
    generation = {"bos_token_id": hf_config.get("bos_token_id"), "eos_token_id": hf_config.get("eos_token_id")}
    files.write_json_atomic(
      os.path.join(path, "generation_config.json"), {k: v for k, v in generation.items() if v is not None}
    )
    if chat_template is not None:
      files.write_text_atomic(os.path.join(path, "chat_template.jinja"), chat_template)
      _drop_inline_chat_template(path)
  else:
    # Other processes still take part in gathering sharded parameters.
    for name, _, _ in tensors:
      produce(name)


def copy_tokenizer_files(source: str | None, destination: str, copy_code: bool = False) -> list[str]:
  """Copies the tokenizer files of `source` (COPIED_FILES) into `destination`; returns their names."""
  if not source or os.path.abspath(source) == os.path.abspath(destination):
    return []
  os.makedirs(destination, exist_ok=True)
  copied = []
  for name in sorted(os.listdir(source)):
    wanted = name in COPIED_FILES or (copy_code and name.endswith(".py"))
    if wanted and os.path.isfile(os.path.join(source, name)):
      shutil.copy2(os.path.join(source, name), os.path.join(destination, name))
      copied.append(name)
  return copied


def _drop_inline_chat_template(path: str) -> None:
  """Removes `chat_template` from tokenizer_config.json, so that chat_template.jinja is the one used."""
  config_path = os.path.join(path, "tokenizer_config.json")
  if os.path.isfile(config_path):
    tokenizer_config = files.read_json(config_path)
    if tokenizer_config.pop("chat_template", None) is not None:
      files.write_json_atomic(config_path, tokenizer_config)
