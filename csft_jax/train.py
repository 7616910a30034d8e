r"""Supervised fine-tuning: `python -m csft_jax.train --config=configs/X.py --workdir=W`.

This file is the story of one run, top to bottom: the run directory, data, devices and mesh,
model and optimizer state (`restore_or_init`: resumed, imported or created directly sharded), the
loop (log, eval, checkpoint, stop on signal or divergence), and the end (final checkpoint,
summary, optional HF export).

Any config field can be overridden: `--config.optim.lr=1e-5 --config.mesh.fsdp=8`. Rerunning
the same command in the same workdir resumes from its latest readable checkpoint, without
touching `init.from_hf` / `init.from_checkpoint` again. Multi-host: pass
`--coordinator_address/--num_processes/--process_id`, or `--distributed` on TPU VMs, where
`jax.distributed.initialize()` reads the topology from the environment.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import os
import shutil
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from flax import nnx
from jax.sharding import Mesh

from csft_jax import checkpointing, configuration, distributed, files, model_source
from csft_jax import workdir as workdir_lib
from csft_jax.console import run_cli
from csft_jax.convert import save_hf
from csft_jax.convert.hf import copy_tokenizer_files, is_hf_dir, load_hf
from csft_jax.data.pipeline import DataPipeline
from csft_jax.data.tokenizer import is_sentencepiece_only, save_converted_tokenizer
from csft_jax.model_source import check_vocab
from csft_jax.models import ModelConfig, lora, model_config_from
from csft_jax.models.attention import check_backend
from csft_jax.models.config import ARCHITECTURE_FIELDS, RUNTIME_FIELDS
from csft_jax.sharding import abstract_mesh, activation_sharding, describe_plan, make_mesh, state_shardings
from csft_jax.stopping import StopRequest
from csft_jax.training.loss import LossSums
from csft_jax.training.metrics import MetricsWriter, StepMeter, itstime, peak_flops, training_flops_per_token
from csft_jax.training.optimizer import check_host_memory, make_optimizer, opt_state_memory
from csft_jax.training.programs import (
  StartingState,
  abstract_state,
  base_config,
  graphdef_of,
  jit_steps,
  model_config_for_plan,
  new_adapters,
  new_train_state,
  random_init,
  runtime_fields,
  with_lora,
)
from csft_jax.training.step import TrainState, merge_model
from csft_jax.workdir import RunDir


def default_train_config() -> ml_collections.ConfigDict:
  """`config.train`: run length, batch, logging/eval cadence, seed, export."""
  return ml_collections.ConfigDict(
    dict(
      num_steps=0,  # > 0 wins over num_epochs.
      num_epochs=0.0,
      global_batch_size=8,  # Rows per optimizer step, over all devices and accumulation steps.
      grad_accum_steps=1,
      # Tokens per chunk of the LM head + cross-entropy (0: dense logits). Chunks keep the
      # [batch, seq_len, vocab] float32 logits from ever existing whole (training/loss.py).
      loss_chunk_size=0,
      log_every=10,
      eval_every=0,  # Held-out loss every N steps (needs data.val_fraction > 0); 0: never.
      seed=0,
      peak_tflops=0.0,  # Per-device peak for MFU where the device kind is unknown.
      export_hf="",  # A directory name under the workdir (e.g. "hf_export"): the finished model in HF format.
      export_peft="",  # LoRA runs: a directory name under the workdir: the adapters as a PEFT directory.
    )
  )


configuration.declare_path_fields("init.from_hf", "init.from_checkpoint", "init.from_peft")


def default_init_config() -> ml_collections.ConfigDict:
  """`config.init`: where a new run's weights come from (at most one; neither: random)."""
  return ml_collections.ConfigDict(
    dict(
      from_hf="",  # An HF model directory (config.json + *.safetensors).
      from_checkpoint="",  # A csft_jax checkpoint: workdir, checkpoints dir, step dir or convert_from_hf output.
      # A PEFT LoRA directory to continue training (with from_hf / from_checkpoint as its base); its
      # adapter_config.json sets config.lora.
      from_peft="",
    )
  )


class TrainingDiverged(RuntimeError):
  """The loss became NaN/inf; the last good checkpoint is kept."""


class InitError(ValueError):
  """An init source, tokenizer or resumed run that does not fit the config."""


# Settings a resumed run may change: when it stops, how it logs and saves, and how the same
# computation is laid out in memory (mesh, accumulation, remat, attention kernel). Anything else
# changes what the run trains and needs --allow_config_change. Model shape is refused regardless.
CHANGEABLE_ON_RESUME = (
  "train.num_steps",
  "train.num_epochs",
  "train.log_every",
  "train.eval_every",
  "train.export_hf",
  "train.export_peft",
  "train.peak_tflops",
  "train.grad_accum_steps",
  "train.loss_chunk_size",
  "checkpoint.*",
  "mesh.*",
  "init.*",
  "data.cache",
  "data.cache_dir",
  "data.tokenizer",
  "model.remat_policy",
  "model.attention_impl",
  "model.attention_block_q",
  "model.attention_block_kv",
)


def config_changes(stored: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
  """`{dotted field: (stored value, current value)}` for every field that differs (absent: `None`)."""
  old, new = _flatten(stored), _flatten(json.loads(json.dumps(current, default=str)))
  return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def check_resume_config(
  stored: dict[str, Any] | None, current: dict[str, Any], *, allow: bool, say: Callable[[str], None]
) -> None:
  """Refuses a resumed run whose config changes what it trains (unless `allow`); notes the rest.

  Raises:
    InitError naming every field that changed, with the stored and the new value.
  """
  if stored is None:
    return
  shape = {f"model.{k}" for k in (*ARCHITECTURE_FIELDS, "vocab_size")}  # refused by _check_fixed_fields
  # A field added to csft_jax after the run started is no change while it holds its default (the
  # behaviour the run had): only a value set away from the default is.
  added_defaults = _flatten(_field_defaults())
  stored_fields = _flatten(stored)
  changes = {
    k: v
    for k, v in config_changes(stored, current).items()
    if k not in shape and not (k not in stored_fields and k in added_defaults and v[1] == added_defaults[k])
  }
  listed = {k: f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items()}
  refused = [k for k in changes if not any(fnmatch.fnmatchcase(k, p) for p in CHANGEABLE_ON_RESUME)]
  if refused and not allow:
    raise InitError(
      f"this run was started with another config; resuming would change {len(refused)} field(s) "
      f"that decide what it trains: {'; '.join(listed[k] for k in refused)}. Rerun without those "
      "overrides, use a new --workdir, or pass --allow_config_change to continue with the new values."
    )
  shown = [listed[k] for k in changes if k != "data.tokenizer"]
  if shown:
    say("note: config changed since this run started (resuming with the new values): " + "; ".join(shown))


def _field_defaults() -> dict[str, Any]:
  """Every config field's default (the base config of configs/base.py), as JSON values."""
  from configs import base  # here: configs import this module

  return json.loads(json.dumps(base.get_config().to_dict(), default=str))


def resolve_num_steps(train: ml_collections.ConfigDict, pipeline: DataPipeline) -> int:
  if train.num_steps > 0:
    return train.num_steps
  if train.num_epochs <= 0:
    raise ValueError("Set config.train.num_steps or config.train.num_epochs (> 0).")
  return max(1, int(round(train.num_epochs * pipeline.estimate_steps_per_epoch(train.global_batch_size))))


# --------------------------------------------------------------- the state ----


def _check_fixed_fields(model_config: ModelConfig, model: ml_collections.ConfigDict, source: str) -> None:
  """Architecture fields the config sets must agree with a loaded model's; they cannot change."""
  wanted = {k: model[k] for k in ARCHITECTURE_FIELDS if model.get(k) is not None}
  if model.get("vocab_size", -1) > 0:
    wanted["vocab_size"] = model.vocab_size
  conflicts = {k: (v, getattr(model_config, k)) for k, v in wanted.items() if v != getattr(model_config, k)}
  if conflicts:
    listed = ", ".join(f"config.model.{k}={v!r} but {source} has {has!r}" for k, (v, has) in conflicts.items())
    raise InitError(
      f"model shape conflicts: {listed}. The shape of a loaded model cannot change; drop those "
      "overrides (or start a new workdir)."
    )


def _check_vocab(tokenizer_size: int, model_config: ModelConfig, tokenizer: str, source: str) -> None:
  check_vocab(tokenizer_size, model_config, tokenizer, source, error=InitError)


def _resume(
  config,
  tokenizer_size: int,
  abstract_for: Callable[[ModelConfig], tuple[TrainState, Any]],
  checkpointer: checkpointing.Checkpointer,
  data_iter,
  run_dir: RunDir,
  say: Callable[[str], None],
) -> StartingState | None:
  """The newest readable checkpoint of the run, restored straight into sharded targets (or None)."""
  # The checkpoint's own layer layout: scanned and unrolled layers are different trees.
  runtime = {k: config.model[k] for k in RUNTIME_FIELDS if k != "scan_layers"}
  unreadable = []
  for step in reversed(checkpointer.steps()):
    try:
      model_config = checkpointing.read_model_config(checkpointer.step_dir(step), **runtime)
      _check_fixed_fields(model_config, config.model, f"the checkpoint of step {step}")
      _check_vocab(tokenizer_size, model_config, config.data.tokenizer, f"the checkpoint of step {step}")
      abstract, shardings = abstract_for(model_config)
      restored = checkpointer.restore(step, abstract, data_iter)
      if model_config.lora_rank:  # a LoRA step holds the adapters; the base was kept once
        restored["frozen"] = checkpointing.restore_base(run_dir.base, abstract.frozen)
    except checkpointing.UnreadableCheckpointError as e:
      moved = checkpointer.move_aside(step, run_dir.unreadable_checkpoints) if _primary() else "(process 0 moves it)"
      say(f"WARNING: checkpoint {e}; moved it to {moved}, trying the one before.")
      unreadable.append(step)
      continue
    origin = f"resumed from step {step} in {checkpointer.directory}"
    if unreadable:
      origin += f" (the newest readable; unreadable steps {unreadable} are in {run_dir.unreadable_checkpoints})"
    return StartingState(graphdef_of(model_config), TrainState(**restored), shardings, model_config, origin)
  if unreadable:
    raise checkpointing.CheckpointError(
      f"no checkpoint of {run_dir.root} can be read (steps {unreadable}, moved to {run_dir.unreadable_checkpoints}); "
      "not starting over. Move one back if it is intact, or use a new workdir."
    )
  return None


def _init_source_config(config, runtime: dict[str, Any]) -> tuple[ModelConfig, str]:
  """The model config of `init.from_hf` / `init.from_checkpoint`, read before anything is allocated."""
  init = config.init
  if init.from_hf:
    if not os.path.isdir(init.from_hf):
      raise InitError(f"config.init.from_hf={init.from_hf!r}: no such directory.")
    if not is_hf_dir(init.from_hf):
      hint = (
        " It is a csft_jax checkpoint: set config.init.from_checkpoint instead."
        if os.path.isdir(os.path.join(init.from_hf, "checkpoints"))
        or os.path.isdir(os.path.join(init.from_hf, "model_config"))
        or any(n.isdigit() for n in os.listdir(init.from_hf))
        else ""
      )
      raise InitError(
        f"config.init.from_hf={init.from_hf!r} is not an HF model directory (config.json + *.safetensors).{hint}"
      )
    return (
      _adapter_settings(config, model_source.resolve(init.from_hf, **runtime).model_config),
      f"config.init.from_hf={init.from_hf}",
    )
  try:
    step_dir = checkpointing.resolve_step_dir(init.from_checkpoint)
  except checkpointing.CheckpointError as e:
    raise InitError(f"config.init.from_checkpoint: {e}") from None
  stored = model_source.resolve(step_dir, **runtime).model_config
  if stored.lora_rank:
    raise InitError(
      f"config.init.from_checkpoint={step_dir} is a step of a LoRA run (adapters only); start from "
      "its merged export (config.train.export_hf), or from its base with config.init.from_peft."
    )
  return _adapter_settings(config, stored), f"config.init.from_checkpoint={step_dir}"


def restore_or_init(
  config: ml_collections.ConfigDict,
  tokenizer_size: int,
  optimizer,
  mesh: Mesh,
  checkpointer: checkpointing.Checkpointer,
  data_iter,
  run_dir: RunDir,
  say: Callable[[str], None] = print,
) -> StartingState:
  """The run's starting state, decided in this order:

  1. the workdir's newest readable checkpoint, restored straight into abstract sharded targets
     (the init source is never touched: it may be gone);
  2. else `init.from_hf` / `init.from_checkpoint`, each parameter placed directly on its shards;
  3. else random init inside `jit` with `out_shardings` (no device ever holds the whole model).

  The `ModelConfig` and the tokenizer/vocab check are settled before anything is allocated.
  """
  init = config.init
  if init.from_hf and init.from_checkpoint:
    raise InitError("Set at most one of config.init.from_hf and config.init.from_checkpoint.")

  def abstract_for(model_config: ModelConfig) -> tuple[TrainState, Any]:
    """The state's abstract arrays and their shardings for `model_config` (nothing allocated)."""
    return abstract_state(model_config, optimizer, config.train.seed, mesh, opt_state_memory(config.optim))

  resumed = _resume(config, tokenizer_size, abstract_for, checkpointer, data_iter, run_dir, say)
  if resumed is not None:
    return resumed
  runtime = runtime_fields(config)
  if not (init.from_hf or init.from_checkpoint):
    if init.from_peft:
      raise InitError("config.init.from_peft needs its base: set config.init.from_hf (or from_checkpoint) too.")
    model_config = with_lora(model_config_from(config.model, tokenizer_size), config)
    _check_vocab(tokenizer_size, model_config, config.data.tokenizer, "config.model")
    return random_init(model_config, optimizer, config.train.seed, mesh, opt_state_memory(config.optim))
  model_config, source = _init_source_config(config, runtime)
  _check_fixed_fields(model_config, config.model, source)
  _check_vocab(tokenizer_size, model_config, config.data.tokenizer, source)
  abstract, shardings = abstract_for(model_config)
  base_runtime = {**runtime, "param_dtype": base_config(model_config).param_dtype}
  base_shardings = shardings.frozen if model_config.lora_rank else shardings.params
  if init.from_hf:
    base = nnx.state(load_hf(init.from_hf, shardings=nnx.as_pure(base_shardings), **base_runtime), nnx.Param)
  else:
    base = checkpointing.restore_params(
      checkpointing.resolve_step_dir(init.from_checkpoint),
      abstract.frozen if model_config.lora_rank else abstract.params,
    )
  frozen = None
  params = base
  if model_config.lora_rank:
    frozen = base
    if init.from_peft:
      params = lora.fill(abstract.params, lora.load_peft(init.from_peft, model_config), init.from_peft)
      source += f" with the adapters of config.init.from_peft={init.from_peft}"
    else:
      params = new_adapters(model_config, config.train.seed, shardings.params)
  opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
  # On the step's own sharding, as the train step returns it: the second step then reuses the
  # first one's compiled program instead of compiling again for a differently typed input.
  step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
  state = TrainState(step, params, opt_state, frozen)
  return StartingState(graphdef_of(model_config), state, shardings, model_config, f"started from {source}")


def _adapter_settings(config, model_config: ModelConfig) -> ModelConfig:
  """`model_config` with its LoRA settings: `init.from_peft`'s adapter_config.json, else `config.lora`.

  Raises:
    InitError when config.lora sets a rank that the PEFT adapter does not have.
  """
  if not config.init.from_peft:
    return with_lora(model_config, config)
  if not os.path.isdir(config.init.from_peft) or not lora.is_peft_dir(config.init.from_peft):
    raise InitError(
      f"config.init.from_peft={config.init.from_peft!r} is not a PEFT adapter directory "
      f"({lora.ADAPTER_CONFIG} + {lora.ADAPTER_WEIGHTS})."
    )
  try:
    fields = model_source.adapter_fields(config.init.from_peft, model_config.arch)
  except ValueError as e:
    raise InitError(f"config.init.from_peft: {e}") from None
  if config.lora.rank and config.lora.rank != fields["lora_rank"]:
    raise InitError(
      f"config.lora.rank={config.lora.rank} but the adapter in config.init.from_peft="
      f"{config.init.from_peft} has rank {fields['lora_rank']}; drop config.lora.rank."
    )
  return model_config.replace(**fields)


# ---------------------------------------------------------------- the run ----


def _count(tree: Any) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _primary() -> bool:
  return jax.process_index() == 0


def run(
  config: ml_collections.ConfigDict,
  workdir: str,
  mesh: Mesh | None = None,
  after_step: Callable[[int], None] | None = None,
  allow_config_change: bool = False,
) -> dict[str, Any]:
  """Trains as `config` says in `workdir` (resuming if it holds checkpoints); returns the summary.

  One trainer at a time holds the workdir (`workdir.RunLock`). A start that fails before the first
  step removes what it created there, so a corrected rerun starts clean.

  Args:
    config: the run's config (see configs/base.py for the fields).
    workdir: run directory (`csft_jax.workdir.RunDir`).
    mesh: overrides the mesh built from `config.mesh` over all devices (tests use device subsets).
    after_step: called with the step number after each step (tests send signals from it).
    allow_config_change: resume even when the config changes fields outside CHANGEABLE_ON_RESUME.
  """
  config = configuration.resolve_paths(config)
  run_dir = RunDir(workdir)
  primary = _primary()
  say = functools.partial(_print, primary)
  files.check_writable(run_dir.root, "--workdir")
  check_backend(config.model.attention_impl)
  if opt_state_memory(config.optim):
    check_host_memory(jax.devices()[0])
  existing = set(os.listdir(run_dir.root)) if os.path.isdir(run_dir.root) else None
  lock = workdir_lib.RunLock(run_dir)
  _take_lock(lock, primary, say)
  looping = []  # set once the first step starts: from then on the workdir holds the run's work
  try:
    return _run_locked(config, run_dir, mesh, after_step, allow_config_change, say, looping)
  except BaseException:
    if primary and not looping:
      _remove_created(run_dir.root, existing, keep=os.path.basename(lock.path))
    raise
  finally:
    lock.release()


def _take_lock(lock: workdir_lib.RunLock, primary: bool, say: Callable[[str], None]) -> None:
  """Process 0 takes the lock; every process stops if it could not."""
  error = None
  if primary:
    try:
      lock.acquire(say)
    except workdir_lib.RunLockedError as e:
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    if not int(multihost_utils.broadcast_one_to_all(np.int32(error is None))) and error is None:
      raise workdir_lib.RunLockedError(f"process 0 could not lock {lock.path}; see its output.")
  if error is not None:
    raise error


def _remove_created(root: str, existing: set[str] | None, keep: str) -> None:
  """Removes what a failed start created under `root` (all of it, if `root` did not exist)."""
  if existing is None:
    shutil.rmtree(root, ignore_errors=True)
    return
  for name in set(os.listdir(root)) - existing - {keep}:
    path = os.path.join(root, name)
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path, ignore_errors=True)
    else:
      os.remove(path)


def _run_locked(
  config: ml_collections.ConfigDict,
  run_dir: RunDir,
  mesh: Mesh | None,
  after_step: Callable[[int], None] | None,
  allow_config_change: bool,
  say: Callable[[str], None],
  looping: list[bool],
) -> dict[str, Any]:
  """The run itself, with the workdir locked (see `run`)."""
  primary = _primary()
  if config.train.export_peft and not (config.lora.rank or config.init.from_peft):
    raise InitError(
      "config.train.export_peft needs a LoRA run (config.lora.rank > 0); export a full fine-tune "
      "with config.train.export_hf."
    )
  resuming = os.path.isdir(run_dir.checkpoints) and any(n.isdigit() for n in os.listdir(run_dir.checkpoints))
  if resuming:
    check_resume_config(run_dir.read_config(), config.to_dict(), allow=allow_config_change, say=say)
  if not resuming and (config.init.from_hf or config.init.from_checkpoint):
    # A bad init source fails first, naming its field, before anything reads its tokenizer.
    init_model_config, init_source = _init_source_config(config, runtime_fields(config))
    _check_fixed_fields(init_model_config, config.model, init_source)
  # Data next: a bad source or tokenizer fails here, before the workdir is touched.
  data_config = configuration.training_data_config(config, run_dir.tokenizer)
  pipeline = DataPipeline(data_config)
  num_steps = resolve_num_steps(config.train, pipeline)
  mesh = mesh or make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  say(f"mesh {dict(mesh.shape)} over {mesh.size} devices ({jax.process_count()} processes)")
  say(pipeline.mixture_table(num_steps * config.train.global_batch_size / max(pipeline.num_examples, 1)))

  optimizer, schedule = make_optimizer(config.optim, num_steps)
  per_process = dict(process_index=jax.process_index(), process_count=jax.process_count())
  train_iter = iter(pipeline.train_dataset(config.train.global_batch_size, **per_process))
  val_batches = pipeline.val_batches(config.train.global_batch_size, **per_process)
  if not resuming and (config.init.from_hf or config.init.from_checkpoint):
    _check_vocab(len(pipeline.tokenizer), init_model_config, data_config.tokenizer, init_source)
  checkpointer = checkpointing.Checkpointer(
    run_dir.checkpoints,
    every_steps=config.checkpoint.every_steps,
    keep=config.checkpoint.keep,
    async_save=config.checkpoint.async_save,
  )
  try:
    start = restore_or_init(config, len(pipeline.tokenizer), optimizer, mesh, checkpointer, train_iter, run_dir, say)
  except BaseException:
    checkpointer.close()
    raise
  graphdef, state, shardings, model_config = start.graphdef, start.state, start.shardings, start.model_config
  first_step = int(jax.device_get(state.step))
  say(
    f"model {model_config.arch}: {model_config.num_params() / 1e6:.2f}M parameters, {start.origin}\n"
    + describe_plan(state, shardings)
  )
  config_json = config.to_dict()
  config_json["data"]["tokenizer"] = data_config.tokenizer
  if primary:
    files.write_json_atomic(run_dir.config, config_json)
    copy_tokenizer_files(data_config.tokenizer, run_dir.tokenizer)
    if is_sentencepiece_only(data_config.tokenizer):  # converted once: the run's copy is a fast tokenizer
      save_converted_tokenizer(pipeline.tokenizer, data_config.tokenizer, run_dir.tokenizer)

  if model_config.lora_rank and first_step == 0:
    # The frozen base, kept once: the step checkpoints hold the adapters, and resuming needs no
    # init source (the HF directory may be gone by then).
    if primary and os.path.isdir(run_dir.base):
      shutil.rmtree(run_dir.base)
    checkpointing.save_params(run_dir.base, state.frozen, base_config(model_config))
    say(
      f"LoRA rank {model_config.lora_rank} on {', '.join(lora.hf_target_names(model_config))}: "
      f"{_count(state.params) / 1e6:.3f}M trained parameters; frozen base kept in {run_dir.base}"
    )

  num_sources = len(pipeline.source_names)
  train_step, eval_step, batch_sharding = jit_steps(config, start, optimizer, schedule, mesh, num_sources)

  def to_global(local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in local.items()}

  def evaluate(step: int) -> None:
    total = LossSums.zeros(num_sources)
    with activation_sharding(mesh):
      for batch in val_batches:
        total = total + eval_step(state.params, state.frozen, to_global(batch))
    total = jax.device_get(total)
    scalars = {"eval_loss": total.loss / max(total.tokens, 1)}
    for name, loss, tokens in zip(pipeline.source_names, total.source_loss, total.source_tokens):
      if tokens > 0:
        scalars[f"eval_loss/{name}"] = loss / tokens
    writer.write(step, scalars)
    writer.console(step, f"eval_loss {scalars['eval_loss']:.4f}")

  meter = StepMeter(
    flops_per_token=training_flops_per_token(model_config, config.data.seq_len),
    device_peak=peak_flops(jax.devices()[0], config.train.peak_tflops),
    num_devices=mesh.size,
    process_count=jax.process_count(),
  )
  writer = MetricsWriter(run_dir, total_steps=num_steps, start_step=first_step, primary=primary)
  stop = StopRequest()
  status, last_loss, step = workdir_lib.FINISHED, float("nan"), first_step
  looping.append(True)
  try:
    while step < num_steps:
      local = next(train_iter)
      meter.add(local)
      with activation_sharding(mesh):
        state, metrics = train_step(state, to_global(local))
      step += 1
      if after_step is not None:
        after_step(step)
      stopping = step < num_steps and stop.requested()
      log_now = itstime(step, config.train.log_every, num_steps)
      save_now = checkpointer.should_save(step) or step == num_steps or stopping
      if log_now or save_now:
        metrics = jax.device_get(metrics)
        last_loss = _ensure_finite(float(metrics["loss"]), step, checkpointer)  # never save a NaN
      if log_now:
        _log(writer, step, metrics, meter.read(), pipeline.source_names, config)
      if save_now:
        checkpointer.save(state, data_iter=train_iter, model_config=model_config, config=config_json)
      if val_batches and itstime(step, config.train.eval_every, num_steps):
        evaluate(step)
      if stopping:
        status = workdir_lib.INTERRUPTED
        say(
          f"{stop.signal_name or 'stop'} received: saved step {step} in {checkpointer.directory}; "
          f"rerun the same command to resume."
        )
        break
  except TrainingDiverged as e:
    status = workdir_lib.DIVERGED
    say(f"ERROR: {e}")
  finally:
    stop.close()
    checkpointer.close()
    writer.close()

  if step == first_step and first_step > 0:
    last_loss = (run_dir.read_summary() or {}).get("final_loss", float("nan"))  # finished before: keep its loss
  summary = {
    "status": status,
    "step": step,
    "num_steps": num_steps,
    "final_loss": last_loss,
    "workdir": run_dir.root,
    "checkpoint": checkpointer.step_dir(checkpointer.latest_step() or 0),
  }
  if status == workdir_lib.FINISHED and config.train.export_peft:
    summary["peft_export"] = run_dir.hf_export(config.train.export_peft)
    lora.save_peft(
      merge_model(graphdef, state.params, state.frozen), summary["peft_export"], base_model=config.init.from_hf
    )
  if status == workdir_lib.FINISHED and config.train.export_hf:
    export_dir = run_dir.hf_export(config.train.export_hf)
    template = pipeline.template
    model = merge_model(graphdef, state.params, state.frozen)
    save_hf(
      lora.merged(model) if model_config.lora_rank else model,
      export_dir,
      tokenizer_dir=data_config.tokenizer,
      stop_token_ids=template.stop_token_ids,
      chat_template=template.jinja() if hasattr(template, "jinja") else None,
    )
    summary["hf_export"] = export_dir
  if primary:
    run_dir.write_summary(summary)
  return summary


def _log(
  writer: MetricsWriter,
  step: int,
  metrics: dict,
  meter: dict[str, float],
  source_names: list[str],
  config: ml_collections.ConfigDict,
) -> None:
  scalars = {
    "loss": float(metrics["loss"]),
    "grad_norm": float(metrics["grad_norm"]),
    "lr": float(metrics["lr"]),
    **meter,
  }
  if config.optim.z_loss > 0:
    scalars["z_loss"] = float(metrics["z_loss"])
  for name, total, tokens in zip(source_names, metrics["source_loss"], metrics["source_tokens"]):
    if tokens > 0:
      scalars[f"loss/{name}"] = float(total / tokens)
  writer.write(step, scalars)
  mfu = f" | MFU {scalars['mfu']:.1%}" if "mfu" in scalars else ""
  writer.console(
    step,
    f"loss {scalars['loss']:.4f} | grad_norm {scalars['grad_norm']:.3f} | lr {scalars['lr']:.2e} | "
    f"{scalars['tokens_per_s']:,.0f} tok/s | {scalars['step_time_s']:.3f} s/step{mfu}",
  )


def _ensure_finite(loss: float, step: int, checkpointer: checkpointing.Checkpointer) -> float:
  if not np.isfinite(loss):
    raise TrainingDiverged(
      f"loss is {loss} at step {step}; stopped without saving it. The last good checkpoint is step "
      f"{checkpointer.latest_step()} in {checkpointer.directory}. Lower config.optim.lr or check the data."
    )
  return loss


def _print(primary: bool, text: str) -> None:
  if primary:
    print(text, file=sys.stderr, flush=True)


def plan(config: ml_collections.ConfigDict, vocab_size: int = 0) -> str:
  """The per-device bytes of params + optimizer state for `config`, computed abstractly.

  Needs no devices: the mesh is abstract (`-1` sizes count as 1). With `init.from_hf` the model
  shape comes from the HF config.json.
  """
  mesh = abstract_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  model_config = model_config_for_plan(config, vocab_size)
  optimizer, _ = make_optimizer(config.optim, max(config.train.num_steps, 1))
  abstract = jax.eval_shape(functools.partial(new_train_state, model_config, optimizer, 0))
  return (
    f"model {model_config.arch}: {model_config.num_params() / 1e9:.3f}B parameters; mesh {dict(mesh.shape)}\n"
    + describe_plan(abstract, state_shardings(abstract, mesh))
  )


def define_flags() -> None:
  """Command-line flags, defined only when run as a program (so modules can import each other)."""
  configuration.define_config_flag("Training config file (configs/*.py).")
  flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, summary (csft_jax.workdir).")
  distributed.define_flags()
  flags.DEFINE_bool(
    "allow_config_change",
    False,
    "Resume even though the config changes fields that decide what "
    "the run trains (learning rate, data, ...); by default such a resume is refused.",
  )
  flags.DEFINE_bool(
    "plan_only",
    False,
    "Quick estimate: the bytes per device of parameters and optimizer state; needs no devices and allocates nothing.",
  )
  flags.DEFINE_string(
    "compile_for",
    None,
    "Will it fit? Compile the train step for a TPU slice (v4-8, v5p-8, "
    "v5e-16, v6e-8, ...) from this host and report per-device memory; "
    "exit 0 if it fits, 1 if not. Needs the `tpu` extra.",
  )


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}; settings go in --config.FIELD=VALUE.")
  config = configuration.from_flags()
  if flags.FLAGS.plan_only:
    print(plan(config))
    return
  if flags.FLAGS.compile_for:
    from csft_jax import aot

    report = aot.check_fit(config, flags.FLAGS.compile_for)
    print(report.table())
    if not report.fits:
      print(aot.advice(config))
    print(json.dumps(report.as_json()))
    sys.exit(0 if report.fits else 1)
  if not flags.FLAGS.workdir:
    raise app.UsageError("--workdir is required.")
  distributed.initialize_from_flags()
  summary = run(config, flags.FLAGS.workdir, allow_config_change=flags.FLAGS.allow_config_change)
  _print(
    _primary(),
    f"{summary['status']}: step {summary['step']}/{summary['num_steps']}, "
    f"final loss {summary['final_loss']:.4f}. Results in {summary['workdir']} "
    f"(metrics.jsonl, tensorboard/, checkpoints/, run_summary.json"
    f"{''.join(', ' + os.path.basename(summary[k]) + '/' for k in ('hf_export', 'peft_export') if k in summary)}).",
  )
  if summary["status"] == workdir_lib.DIVERGED:
    sys.exit(1)


if __name__ == "__main__":
  define_flags()
  run_cli(main)
