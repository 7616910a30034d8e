"""Orbax checkpoints of a run, and restoring a model from one.

Layout: `<dir>/<step>/` holds the items `params` (the model's parameters), `model_config`
(JSON of `ModelConfig`), and for training runs also `opt_state`, `meta` (JSON: step and seed;
training draws no random numbers after initialisation, so the seed is the whole RNG state),
`config` (the run's config as JSON) and `data_iter` (Grain iterator state, one file per process). A training workdir keeps them in
`W/checkpoints`; `tools/convert_from_hf.py` writes the same layout with only `params` and
`model_config`, which `init.from_checkpoint` and the evaluator accept.

Resume guarantee: restoring step s gives bitwise the parameters, optimizer state and data
position after s completed steps, onto whatever mesh the target shardings describe (Orbax
reshards on load).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from csft_jax.data.config import REPO_ROOT
from csft_jax.models.config import ModelConfig
from csft_jax.models.decoder import Decoder
from csft_jax.sharding import state_shardings


def model_config_to_json(config: ModelConfig) -> dict[str, Any]:
  return dataclasses.asdict(config)


def model_config_from_json(fields: dict[str, Any], **overrides: Any) -> ModelConfig:
  fields = dict(fields)
  if fields.get("rope_scaling") is not None:
    fields["rope_scaling"] = tuple(tuple(kv) for kv in fields["rope_scaling"])
  if isinstance(fields.get("eos_token_id"), list):
    fields["eos_token_id"] = tuple(fields["eos_token_id"])
  fields.update(overrides)
  return ModelConfig(**fields)


class Checkpointer:
  """An async `CheckpointManager` that saves every `every_steps` and keeps the last `keep`."""

  def __init__(self, directory: str, *, every_steps: int, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.every_steps = every_steps
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                             create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self.every_steps > 0 and step % self.every_steps == 0

  def save(self, step: int, *, params: Any, opt_state: Any, meta: dict[str, Any], data_iter: Any,
           model_config: ModelConfig, config: dict[str, Any]) -> None:
    """Starts an async save of step `step` (returns once the arrays are copied off device)."""
    self.manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
        meta=ocp.args.JsonSave(meta), model_config=ocp.args.JsonSave(model_config_to_json(model_config)),
        config=ocp.args.JsonSave(config), data_iter=grain.checkpoint.CheckpointSave(data_iter)), force=True)

  def restore(self, step: int, *, abstract_params: Any, abstract_opt_state: Any, data_iter: Any
              ) -> tuple[Any, Any, dict[str, Any]]:
    """Restores (params, opt_state, meta) onto the shardings of the abstract targets; sets `data_iter`."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params), opt_state=ocp.args.StandardRestore(abstract_opt_state),
        meta=ocp.args.JsonRestore(), data_iter=grain.checkpoint.CheckpointRestore(data_iter)))
    return restored.params, restored.opt_state, restored.meta

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def resolve_step_dir(path: str, step: int | None = None) -> str:
  """A step directory from a workdir, a checkpoints dir or a step dir (latest step by default)."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "params")):
    return path
  checkpoints = os.path.join(path, "checkpoints")
  root = checkpoints if os.path.isdir(checkpoints) else path
  steps = sorted(int(name) for name in (os.listdir(root) if os.path.isdir(root) else []) if name.isdigit())
  if not steps:
    raise FileNotFoundError(
        f"No checkpoint under {path}: expected a training workdir (with checkpoints/<step>/), a checkpoints "
        f"directory, or a step directory containing params/.")
  if step is None:
    return os.path.join(root, str(steps[-1]))
  if step not in steps:
    raise FileNotFoundError(f"No step {step} under {root}; available steps: {steps}.")
  return os.path.join(root, str(step))


def training_workdir(path: str) -> str | None:
  """The training workdir of a checkpoint path (`W`, `W/checkpoints` or `W/checkpoints/<step>`), if any."""
  candidate = os.path.abspath(path)
  for _ in range(3):
    if os.path.isfile(os.path.join(candidate, "config.json")):
      return candidate
    candidate = os.path.dirname(candidate)
  return None


def training_data_config(workdir: str) -> tuple[str | None, str | None]:
  """(tokenizer directory, chat template) of the run in `workdir`, from its `config.json`."""
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    data = json.load(f).get("data", {})
  tokenizer = data.get("tokenizer")
  if tokenizer:
    tokenizer = os.path.normpath(os.path.join(REPO_ROOT, os.path.expanduser(tokenizer)))
  return tokenizer, data.get("chat_template")


def read_model_config(step_dir: str, **overrides: Any) -> ModelConfig:
  path = os.path.join(step_dir, "model_config", "metadata")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{step_dir} has no model_config item; is it a csft_jax checkpoint?")
  with open(path) as f:
    return model_config_from_json(json.load(f), **overrides)


def restore_params(step_dir: str, abstract_params: Any) -> Any:
  """Restores only the `params` item onto the shardings/dtypes of `abstract_params`."""
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(os.path.join(step_dir, "params"), abstract_params)


def restore_model(path: str, *, step: int | None = None, dtype: str | None = None, mesh: Mesh | None = None,
                  **config_overrides: Any) -> Decoder:
  """A `Decoder` from a workdir (latest step), a checkpoints dir, or a step dir.

  Args:
    path: where the checkpoint is.
    step: a specific step (default: the latest).
    dtype: compute dtype override (e.g. 'float32' for evaluation parity).
    mesh: restore each parameter straight onto its shards of this mesh (per
      `csft_jax.sharding`); default: the first device.
    **config_overrides: other `ModelConfig` overrides.
  """
  step_dir = resolve_step_dir(path, step)
  if dtype is not None:
    config_overrides["dtype"] = dtype
  config = read_model_config(step_dir, **config_overrides)
  graphdef, abstract_params = nnx.split(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))), nnx.Param)
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract_params)
  else:
    shardings = state_shardings(abstract_params, mesh)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_params, shardings)
  params = restore_params(step_dir, target)
  return nnx.merge(graphdef, params)


def save_model(directory: str, model: Decoder, step: int = 0) -> str:
  """Writes `model` as a params-only checkpoint `<directory>/<step>/` (what the trainer can start from)."""
  manager = ocp.CheckpointManager(os.path.abspath(directory), options=ocp.CheckpointManagerOptions(create=True))
  manager.save(step, args=ocp.args.Composite(
      params=ocp.args.StandardSave(nnx.state(model, nnx.Param)),
      model_config=ocp.args.JsonSave(model_config_to_json(model.config))), force=True)
  manager.wait_until_finished()
  manager.close()
  return os.path.join(os.path.abspath(directory), str(step))
