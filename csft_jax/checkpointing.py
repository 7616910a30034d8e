"""Orbax checkpoints of a run, and restoring a model from one.

Layout: `<dir>/<step>/` holds the items `state` (the `TrainState` as one pytree: `step`, `params`,
`opt_state`), `model_config` (JSON of `ModelConfig`), and for training runs also `config` (the
run's config as JSON) and `data_iter` (Grain iterator state, one file per process). A training
run keeps them in `W/checkpoints` (`csft_jax.workdir.RunDir`); `tools/convert_from_hf.py` writes
the same layout with a `state` of params only, which `init.from_checkpoint` and the evaluator
accept.

Resume guarantee: restoring step s gives bitwise the parameters, optimizer state and data
position after s completed steps, onto whatever mesh the target shardings describe (Orbax
reshards on load). A step that cannot be read is moved aside (`W/checkpoints_unreadable/`) and
the next older one is tried; a run never starts over silently.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from csft_jax.convert.hf import is_hf_dir
from csft_jax.models.config import ModelConfig
from csft_jax.models.decoder import Decoder
from csft_jax.sharding import state_shardings
from csft_jax.workdir import RunDir


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used: missing, of the wrong kind, or unreadable."""


class UnreadableCheckpointError(CheckpointError):
  """A step whose files cannot be read (cut short, corrupt): the run may fall back to an older one."""


# How TensorStore and Orbax report files that are cut short or damaged (as opposed to a target
# that does not match a sound checkpoint, which must not cost the run its checkpoints).
_UNREADABLE = (
  "OUT_OF_RANGE",
  "DATA_LOSS",
  "Requested byte range",
  "Error reading",
  "Unexpected end",
  "corrupt",
  "truncated",
  "No such file",
  "not found",
  "Failed to decode",
)


def default_config() -> ml_collections.ConfigDict:
  """`config.checkpoint`: how often to save, how many to keep, async saving."""
  return ml_collections.ConfigDict(dict(every_steps=500, keep=3, async_save=True))


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


def _as_dict(state: Any) -> dict[str, Any]:
  """A `TrainState` (or any object with those fields) as the dict the `state` item stores."""
  return {"step": state.step, "params": state.params, "opt_state": state.opt_state}


class Checkpointer:
  """An async `CheckpointManager` that saves every `every_steps` and keeps the last `keep`."""

  def __init__(self, directory: str, *, every_steps: int, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.every_steps = every_steps
    self._options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=self._options)

  def steps(self) -> list[int]:
    """Saved steps, oldest first."""
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self.every_steps > 0 and step % self.every_steps == 0

  def save(self, state: Any, *, data_iter: Any, model_config: ModelConfig, config: dict[str, Any]) -> None:
    """Starts an async save of `state` at its step (returns once the arrays are copied off device)."""
    step = int(jax.device_get(state.step))
    self.manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(_as_dict(state)),
        model_config=ocp.args.JsonSave(model_config_to_json(model_config)),
        config=ocp.args.JsonSave(config),
        data_iter=grain.checkpoint.CheckpointSave(data_iter),
      ),
      force=True,
    )

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def restore(self, step: int, abstract_state: Any, data_iter: Any) -> dict[str, Any]:
    """Restores step `step`'s state dict onto the shardings of `abstract_state`; sets `data_iter`.

    Raises:
      CheckpointError naming the step and, where the error says, the file that could not be read.
    """
    try:
      restored = self.manager.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_as_dict(abstract_state)),
          data_iter=grain.checkpoint.CheckpointRestore(data_iter),
        ),
      )
    except Exception as e:
      if any("tree structures do not match" in str(inner) for inner in _exception_chain(e)):
        raise CheckpointError(
          f"step {step} cannot be restored into this config's state: the saved state has another structure "
          "(a config.optim change such as grad_clip_norm builds a different optimizer state). Resume with the "
          "config the run was started with, or start a new workdir."
        ) from e
      kind = UnreadableCheckpointError if _is_unreadable(e) else CheckpointError
      raise kind(f"step {step} cannot be restored: {_failing_file(e, self.step_dir(step))}") from e
    return restored.state

  def move_aside(self, step: int, destination: str) -> str:
    """Moves step `step` out of the manager's sight, into `destination/<step>`; returns that path."""
    os.makedirs(destination, exist_ok=True)
    target = os.path.join(destination, str(step))
    if os.path.exists(target):
      shutil.rmtree(target)
    shutil.move(self.step_dir(step), target)
    self.manager.reload()
    return target

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _exception_chain(error: BaseException) -> list[BaseException]:
  """`error` and every exception behind it (`__cause__`, `__context__`, an ExceptionGroup's members).

  Orbax and TensorStore wrap the reason a file cannot be read (`OUT_OF_RANGE`, `DATA_LOSS`) in
  outer exceptions whose own text says only "error while reading array index".
  """
  chain, pending, seen = [], [error], set()
  while pending:
    current = pending.pop(0)
    if current is None or id(current) in seen:
      continue
    seen.add(id(current))
    chain.append(current)
    pending += [current.__cause__, current.__context__, *getattr(current, "exceptions", ())]
  return chain


def _is_unreadable(error: BaseException) -> bool:
  """Whether anything in `error`'s chain says a file is missing, cut short or corrupt."""
  return any(
    isinstance(e, (OSError, EOFError, json.JSONDecodeError)) or any(m in str(e) for m in _UNREADABLE)
    for e in _exception_chain(error)
  )


def _failing_file(error: Exception, step_dir: str) -> str:
  """The first file of `step_dir` that `error`'s chain names, with the innermost reason's first line."""
  chain = _exception_chain(error)
  text = "\n".join(str(e) for e in chain)
  reason = next((e for e in reversed(chain) if str(e).strip()), error)
  paths = re.findall(re.escape(step_dir) + r"[^\s\"',)]*", text)
  named_files = [p for p in paths if os.path.isfile(p)] or paths
  first_line = str(reason).strip().splitlines()[0][:300] if str(reason).strip() else type(reason).__name__
  where = f"file {named_files[0]}" if named_files else f"a file under {step_dir}"
  tensor = re.search(r'Error reading "([^"]+?)(?:\.value)?(?:/[\d.]+)?"', text)  # TensorStore names the array
  if tensor:
    where += f", tensor {tensor.group(1)}"
  return f"{where} ({type(reason).__name__}: {first_line})"


def resolve_step_dir(path: str, step: int | None = None) -> str:
  """A step directory from a workdir, a checkpoints dir or a step dir (latest step by default)."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "state")) or os.path.isdir(os.path.join(path, "model_config")):
    return path
  checkpoints = os.path.join(path, "checkpoints")
  root = checkpoints if os.path.isdir(checkpoints) else path
  steps = sorted(int(name) for name in (os.listdir(root) if os.path.isdir(root) else []) if name.isdigit())
  if not steps:
    hint = " It is an HF model directory: use it as config.init.from_hf." if is_hf_dir(path) else ""
    raise CheckpointError(
      f"No checkpoint under {path}: expected a training workdir (with checkpoints/<step>/), a checkpoints "
      f"directory, or a step directory containing state/.{hint}"
    )
  if step is None:
    return os.path.join(root, str(steps[-1]))
  if step not in steps:
    raise CheckpointError(f"No step {step} under {root}; available steps: {steps}.")
  return os.path.join(root, str(step))


def read_model_config(step_dir: str, **overrides: Any) -> ModelConfig:
  path = os.path.join(step_dir, "model_config", "metadata")
  if not os.path.exists(path):
    raise CheckpointError(f"{step_dir} has no model_config item; is it a csft_jax checkpoint?")
  try:
    with open(path) as f:
      fields = json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{path}: cannot read the model config ({e}).") from e
  return model_config_from_json(fields, **overrides)


def _stored_param_paths(step_dir: str) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Path (as strings, without Orbax's trailing 'value') -> shape of every parameter a step holds."""
  state_dir = os.path.join(step_dir, "state")
  try:
    with ocp.PyTreeCheckpointer() as checkpointer:
      metadata = checkpointer.metadata(state_dir)
  except Exception as e:
    raise CheckpointError(f"parameters of {step_dir} cannot be read: {_failing_file(e, step_dir)}") from e
  tree = getattr(getattr(metadata, "item_metadata", metadata), "tree", metadata)
  paths = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree.get("params", {}))[0]:
    keys = tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    paths[keys[:-1] if keys[-1] == "value" else keys] = tuple(getattr(leaf, "shape", ()))
  return paths


def _param_paths(tree: dict[str, Any]) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Path (as strings) -> shape of every leaf of a pure parameter dict."""
  flat = nnx.traversals.flatten_mapping(tree)
  return {tuple(str(k) for k in path): tuple(leaf.shape) for path, leaf in flat.items()}


def _is_scanned(paths) -> bool:
  """Whether a parameter tree stacks its layers on a leading axis (`layers/attn/...`) rather than
  keeping one subtree per layer (`layers/0/attn/...`)."""
  return not any(len(p) > 1 and p[0] == "layers" and p[1].isdigit() for p in paths)


def _relayout(tree: dict[str, Any], *, to_scanned: bool, num_layers: int, stack: Any, unstack: Any) -> dict:
  """A pure parameter dict with its layers stacked (`to_scanned`) or split into one entry per layer."""
  tree = dict(tree)
  if to_scanned:
    per_layer = [tree["layers"][i] for i in range(num_layers)]
    tree["layers"] = jax.tree.map(lambda *leaves: stack(leaves), *per_layer)
  else:
    tree["layers"] = {i: jax.tree.map(lambda leaf, i=i: unstack(leaf, i), tree["layers"]) for i in range(num_layers)}
  return tree


def _restore_state_item(step_dir: str, target: Any) -> Any:
  try:
    with ocp.PyTreeCheckpointer() as checkpointer:
      restored = checkpointer.restore(
        os.path.join(step_dir, "state"),
        args=ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
        ),
      )
  except Exception as e:
    raise CheckpointError(f"parameters of {step_dir} cannot be restored: {_failing_file(e, step_dir)}") from e
  return restored["params"]


def _with_spec(leaf: jax.ShapeDtypeStruct, shape: tuple[int, ...], spec: tuple) -> jax.ShapeDtypeStruct:
  sharding = leaf.sharding
  if isinstance(sharding, jax.sharding.NamedSharding):
    sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
  return jax.ShapeDtypeStruct(shape, leaf.dtype, sharding=sharding)


def _spec(leaf: jax.ShapeDtypeStruct) -> tuple:
  sharding = leaf.sharding
  spec = tuple(sharding.spec) if isinstance(sharding, jax.sharding.NamedSharding) else ()
  return spec + (None,) * (len(leaf.shape) - len(spec))


def restore_params(step_dir: str, abstract_params: Any) -> Any:
  """Restores only the parameters onto the shardings/dtypes of `abstract_params`.

  A step saved with the other layer layout (scanned vs unrolled, e.g. `tools/convert_from_hf.py`
  output restored by an unrolled model) is converted while it is restored. Every parameter of
  the target must be in the step: a partial fill is never returned.

  Raises:
    CheckpointError naming the step and the parameters it lacks, or the file that cannot be read.
  """
  stored = _stored_param_paths(step_dir)
  target = nnx.to_pure_dict(abstract_params)
  wanted = _param_paths(target)
  if _is_scanned(stored) == _is_scanned(wanted):
    _check_params_present(step_dir, stored, wanted)
    return _restore_state_item(step_dir, {"params": abstract_params})
  # The other layout: restore into that layout's shapes (same dtypes, layer axis unsharded), then
  # stack or split the layers and place each parameter on its target sharding.
  to_scanned = _is_scanned(wanted)
  # The model's layer count: the stack's leading axis, or the number of per-layer subtrees.
  num_layers = (
    next(shape[0] for p, shape in wanted.items() if p[0] == "layers")
    if to_scanned
    else max(int(p[1]) for p in wanted if p[0] == "layers") + 1
  )
  stored_layout = _relayout(
    target,
    to_scanned=not to_scanned,
    num_layers=num_layers,
    stack=lambda leaves: _with_spec(leaves[0], (len(leaves), *leaves[0].shape), (None, *_spec(leaves[0]))),
    unstack=lambda leaf, i: _with_spec(leaf, leaf.shape[1:], _spec(leaf)[1:]),
  )
  _check_params_present(step_dir, stored, _param_paths(stored_layout))
  abstract_stored = nnx.State(jax.tree.map(nnx.Param, stored_layout))
  restored = nnx.to_pure_dict(_restore_state_item(step_dir, {"params": abstract_stored}))
  converted = _relayout(
    restored, to_scanned=to_scanned, num_layers=num_layers, stack=jnp.stack, unstack=lambda leaf, i: leaf[i]
  )
  placed = jax.tree.map(lambda value, leaf: jax.device_put(value.astype(leaf.dtype), leaf.sharding), converted, target)
  params = jax.tree.map(lambda leaf: leaf, abstract_params)
  nnx.replace_by_pure_dict(params, placed)
  return params


def _check_params_present(step_dir: str, stored: dict, wanted: dict) -> None:
  missing = sorted("/".join(p) for p in wanted if p not in stored)
  if missing:
    raise CheckpointError(
      f"{step_dir} lacks {len(missing)} of the model's {len(wanted)} parameters, e.g. {missing[:6]}; it holds "
      f"{len(stored)}. Is it a checkpoint of this model (config.model must match its model_config)?"
    )
  mismatched = [f"{'/'.join(p)} {stored[p]} vs {shape}" for p, shape in wanted.items() if stored[p] != shape]
  if mismatched:
    raise CheckpointError(f"{step_dir}: parameter shapes differ from the model's (stored vs wanted): {mismatched[:6]}.")


def restore_model(
  path: str, *, step: int | None = None, dtype: str | None = None, mesh: Mesh | None = None, **config_overrides: Any
) -> Decoder:
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
  # A LoRA step holds the adapters; the run keeps the frozen base once (`run_base_dir`).
  graphdef, *abstract_parts = nnx.split(
    nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))),
    *((nnx.LoRAParam, nnx.Param) if config.lora_rank else (nnx.Param,)),
  )
  targets = []
  for abstract_params in abstract_parts:
    if mesh is None:
      one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      shardings = jax.tree.map(lambda _, sharding=one_device: sharding, abstract_params)
    else:
      shardings = state_shardings(abstract_params, mesh)
    targets.append(
      jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_params, shardings)
    )
  parts = [restore_params(step_dir, targets[0])]
  if config.lora_rank:
    parts.append(restore_base(run_base_dir(step_dir), targets[1]))
  return nnx.merge(graphdef, *parts)


def save_model(directory: str, model: Decoder, step: int = 0) -> str:
  """Writes `model` as a params-only checkpoint `<directory>/<step>/` (what the trainer can start from)."""
  return save_params(
    directory, nnx.state(model, nnx.Param), model.config, step, extra={"step": jnp.asarray(step, jnp.int32)}
  )


def save_params(
  directory: str, params: Any, model_config: ModelConfig, step: int = 0, extra: dict[str, Any] | None = None
) -> str:
  """Writes `params` (a model's nnx parameter state) as a params-only checkpoint `<directory>/<step>/`.

  Every process calls it (the arrays may be sharded over hosts). Orbax writes into a temporary
  directory and renames it when complete: an interrupted save leaves no `<step>/` behind.
  """
  manager = ocp.CheckpointManager(os.path.abspath(directory), options=ocp.CheckpointManagerOptions(create=True))
  manager.save(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave({**(extra or {}), "params": params}),
      model_config=ocp.args.JsonSave(model_config_to_json(model_config)),
    ),
    force=True,
  )
  manager.wait_until_finished()
  manager.close()
  return os.path.join(os.path.abspath(directory), str(step))


def run_base_dir(step_dir: str) -> str:
  """Where the LoRA run that a step directory `W/checkpoints/<step>` belongs to keeps its frozen base."""
  return RunDir(os.path.dirname(os.path.dirname(os.path.abspath(step_dir)))).base


def restore_base(directory: str, abstract_frozen: Any) -> Any:
  """A LoRA run's frozen base, as `save_params(directory, ...)` kept it (`W/base`), onto
  `abstract_frozen`'s shardings.

  Raises:
    CheckpointError saying the base is missing or unreadable (a LoRA run cannot resume without it).
  """
  step_dir = os.path.join(directory, "0")
  if not os.path.isdir(os.path.join(step_dir, "state")):
    raise CheckpointError(
      f"{step_dir} is missing: a LoRA run's step checkpoints hold only the adapters, and the "
      "frozen base it was started from is kept there. Restore it, or start a new workdir."
    )
  return restore_params(step_dir, abstract_frozen)
