r"""Supervised fine-tuning: `python -m csft_jax.train --config=configs/X.py --workdir=W`.

This file is the story of one run, top to bottom: devices and mesh, data, model and optimizer
state (created directly sharded), resume, the loop (log, eval, checkpoint, stop on signal or
divergence), and the end (final checkpoint, summary, optional HF export).

Any config field can be overridden: `--config.optim.lr=1e-5 --config.mesh.fsdp=8`. Rerunning
the same command in the same workdir resumes from its latest checkpoint. Multi-host: pass
`--coordinator_address/--num_processes/--process_id`, or `--distributed` on TPU VMs, where
`jax.distributed.initialize()` reads the topology from the environment.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from ml_collections import config_flags

from csft_jax import checkpointing, distributed
from csft_jax.console import quiet_library_info_logs
from csft_jax.convert import load_hf, read_hf_config, save_hf
from csft_jax.data.config import REPO_ROOT
from csft_jax.data.pipeline import DataPipeline
from csft_jax.models import Decoder, ModelConfig, model_config_from
from csft_jax.sharding import (activation_sharding, describe_plan, logical_to_spec, make_mesh,
                               state_shardings)
from csft_jax.training.loss import LossSums
from csft_jax.training.metrics import MetricsWriter, peak_flops, training_flops_per_token
from csft_jax.training.optimizer import make_optimizer
from csft_jax.training.step import TrainState, make_eval_step, make_train_step

# ModelConfig fields that may change between a checkpoint and the run that loads it.
RUNTIME_MODEL_FIELDS = ("dtype", "param_dtype", "remat_policy", "scan_layers", "attention_impl")


class TrainingDiverged(RuntimeError):
  """The loss became NaN/inf; the last good checkpoint is kept."""


def resolve_num_steps(train: ml_collections.ConfigDict, pipeline: DataPipeline) -> int:
  if train.num_steps > 0:
    return train.num_steps
  if train.num_epochs <= 0:
    raise ValueError("Set config.train.num_steps or config.train.num_epochs (> 0).")
  return max(1, int(round(train.num_epochs * pipeline.estimate_steps_per_epoch(train.global_batch_size))))


def new_train_state(model_config: ModelConfig, optimizer, seed: int) -> TrainState:
  """A freshly initialised state (call under `jax.eval_shape` or `jit` with out_shardings)."""
  params = nnx.state(Decoder(model_config, rngs=nnx.Rngs(seed)), nnx.Param)
  return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))


def initial_state(config: ml_collections.ConfigDict, model_config: ModelConfig, optimizer, mesh
                  ) -> tuple[nnx.GraphDef, TrainState, Any, ModelConfig]:
  """(graphdef, state, state shardings, model config), created or loaded directly sharded.

  Random init runs inside `jit` with `out_shardings`, so no device ever holds the whole model.
  """
  init = config.init
  runtime = {k: getattr(model_config, k) for k in RUNTIME_MODEL_FIELDS}
  if init.from_hf and init.from_checkpoint:
    raise ValueError("Set at most one of config.init.from_hf and config.init.from_checkpoint.")
  if init.from_hf:
    model_config = read_hf_config(init.from_hf, **runtime)
  elif init.from_checkpoint:
    model_config = checkpointing.read_model_config(checkpointing.resolve_step_dir(init.from_checkpoint), **runtime)

  create = functools.partial(new_train_state, model_config, optimizer, config.train.seed)
  abstract = jax.eval_shape(create)
  shardings = state_shardings(abstract, mesh)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: Decoder(model_config, rngs=nnx.Rngs(0))))
  if init.from_hf:
    params = nnx.state(load_hf(init.from_hf, model_config.param_dtype, shardings=shardings.params, **runtime),
                       nnx.Param)
  elif init.from_checkpoint:
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract.params, shardings.params)
    params = checkpointing.restore_params(checkpointing.resolve_step_dir(init.from_checkpoint), target)
  else:
    state = jax.jit(create, out_shardings=shardings)()
    return graphdef, state, shardings, model_config
  opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
  return graphdef, TrainState(jnp.zeros((), jnp.int32), params, opt_state), shardings, model_config


class StopRequest:
  """Turns SIGTERM/SIGINT into a flag the loop checks after each step (finish, save, exit 0)."""

  def __init__(self):
    self.signal_name = None
    self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

  def close(self) -> None:
    """Puts the previous handlers back (the run is over)."""
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, _frame):
    self.signal_name = signal.Signals(signum).name

  def requested(self) -> bool:
    flag = np.asarray(self.signal_name is not None)
    if jax.process_count() > 1:
      # Every process must leave the loop at the same step, or the collectives would hang.
      from jax.experimental import multihost_utils
      flag = multihost_utils.process_allgather(flag).any()
    return bool(flag)


def run(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh | None = None) -> dict[str, Any]:
  """Trains as `config` says in `workdir` (resuming if it holds checkpoints); returns the summary.

  Args:
    config: the run's config (see configs/demo.py for the fields).
    workdir: run directory.
    mesh: overrides the mesh built from `config.mesh` over all devices (tests use device subsets).
  """
  workdir = os.path.abspath(workdir)
  primary = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  config_json = json.loads(config.to_json_best_effort())
  if primary:
    _write_json(os.path.join(workdir, "config.json"), config_json)

  mesh = mesh or make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  pipeline = DataPipeline(config.data)
  num_steps = resolve_num_steps(config.train, pipeline)
  _print(primary, f"mesh {dict(mesh.shape)} over {mesh.size} devices ({jax.process_count()} processes)")
  _print(primary, pipeline.mixture_table(num_steps * config.train.global_batch_size / max(pipeline.num_examples, 1)))

  model_config = model_config_from(config.model, len(pipeline.tokenizer))
  optimizer, schedule = make_optimizer(config.optim, num_steps)
  graphdef, state, shardings, model_config = initial_state(config, model_config, optimizer, mesh)
  if len(pipeline.tokenizer) > model_config.vocab_size:
    raise ValueError(f"tokenizer {config.data.tokenizer} has {len(pipeline.tokenizer)} tokens but the model's "
                     f"vocab_size is {model_config.vocab_size}; set config.model.vocab_size (or -1 for auto).")
  _print(primary, f"model {model_config.arch}: {model_config.num_params() / 1e6:.2f}M parameters\n"
         + describe_plan(state, shardings))

  batch_sharding = NamedSharding(mesh, logical_to_spec(("batch", "length")))
  num_sources = len(pipeline.source_names)
  train_step = jax.jit(
      make_train_step(graphdef, optimizer, num_sources=num_sources, grad_accum_steps=config.train.grad_accum_steps,
                      z_loss_weight=config.optim.z_loss, schedule=schedule),
      in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None), donate_argnums=0)
  eval_step = jax.jit(make_eval_step(graphdef, num_sources=num_sources),
                      in_shardings=(shardings.params, batch_sharding))

  per_process = dict(process_index=jax.process_index(), process_count=jax.process_count())
  train_iter = iter(pipeline.train_dataset(config.train.global_batch_size, **per_process))
  val_batches = pipeline.val_batches(config.train.global_batch_size, **per_process)
  checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), every_steps=config.checkpoint.every_steps,
                                            keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
  start = checkpointer.latest_step() or 0
  if start:
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)
    params, opt_state, _ = checkpointer.restore(start, abstract_params=abstract.params,
                                                abstract_opt_state=abstract.opt_state, data_iter=train_iter)
    state = TrainState(jnp.asarray(start, jnp.int32), params, opt_state)
    _print(primary, f"resumed from step {start} in {checkpointer.directory}")

  def to_global(local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in local.items()}

  def save(step: int) -> None:
    checkpointer.save(step, params=state.params, opt_state=state.opt_state, data_iter=train_iter,
                      meta={"step": step, "seed": config.train.seed}, model_config=model_config,
                      config=config_json)

  def evaluate(step: int) -> None:
    total = LossSums.zeros(num_sources)
    with activation_sharding(mesh):
      for batch in val_batches:
        total = total + eval_step(state.params, to_global(batch))
    total = jax.device_get(total)
    scalars = {"eval_loss": total.loss / max(total.tokens, 1)}
    for name, loss, tokens in zip(pipeline.source_names, total.source_loss, total.source_tokens):
      if tokens > 0:
        scalars[f"eval_loss/{name}"] = loss / tokens
    writer.write(step, scalars)
    writer.console(step, f"eval_loss {scalars['eval_loss']:.4f}")

  flops_per_token = training_flops_per_token(model_config, config.data.seq_len)
  device_peak = peak_flops(jax.devices()[0], config.train.peak_tflops)
  writer = MetricsWriter(workdir, total_steps=num_steps, start_step=start, primary=primary)
  stop = StopRequest()
  status, last_loss, window = "finished", float("nan"), _Window()
  step = start
  try:
    while step < num_steps:
      local = next(train_iter)
      window.add(local)
      with activation_sharding(mesh):
        state, metrics = train_step(state, to_global(local))
      step += 1
      saved = False
      if step % config.train.log_every == 0 or step == num_steps:
        last_loss = _check_finite(_log(writer, step, jax.device_get(metrics), window, pipeline.source_names,
                                       flops_per_token, device_peak, mesh.size, config), step, checkpointer)
      if checkpointer.should_save(step) or step == num_steps:
        last_loss = _check_finite(float(jax.device_get(metrics["loss"])), step, checkpointer)
        save(step)
        saved = True
      if config.train.eval_every > 0 and val_batches and (step % config.train.eval_every == 0 or step == num_steps):
        evaluate(step)
      if step == config.train.self_signal_at_step:
        os.kill(os.getpid(), signal.SIGTERM)  # test hook: exercises the real preemption path
      if step < num_steps and stop.requested():
        last_loss = _check_finite(float(jax.device_get(metrics["loss"])), step, checkpointer)
        if not saved:
          save(step)
        status = "interrupted"
        _print(primary, f"{stop.signal_name or 'stop'} received: saved step {step} in {checkpointer.directory}; "
               f"rerun the same command to resume.")
        break
  except TrainingDiverged as e:
    status = "diverged"
    _print(primary, f"ERROR: {e}")
  finally:
    stop.close()
    checkpointer.close()
    writer.close()

  if step == start and start > 0:
    last_loss = _previous_final_loss(workdir)  # nothing left to train: keep the finished run's loss
  summary = {"status": status, "step": step, "num_steps": num_steps, "final_loss": last_loss,
             "workdir": workdir, "checkpoint": os.path.join(checkpointer.directory, str(checkpointer.latest_step()))}
  if status == "finished" and config.train.export_hf:
    export_dir = os.path.join(workdir, config.train.export_hf)
    save_hf(nnx.merge(graphdef, state.params), export_dir,
            tokenizer_dir=os.path.join(REPO_ROOT, config.data.tokenizer))
    summary["hf_export"] = export_dir
  if primary:
    _write_json(os.path.join(workdir, "run_summary.json"), summary)
  return summary


class _Window:
  """Host-side token counts and wall time since the last log line."""

  def __init__(self):
    self.reset()

  def reset(self):
    self.start, self.steps, self.real, self.loss_tokens, self.slots = time.time(), 0, 0, 0, 0

  def add(self, local: dict[str, np.ndarray]) -> None:
    self.steps += 1
    self.real += int((local["segment_ids"] > 0).sum()) * jax.process_count()
    self.loss_tokens += int(local["loss_mask"].sum()) * jax.process_count()
    self.slots += local["segment_ids"].size * jax.process_count()


def _log(writer: MetricsWriter, step: int, metrics: dict, window: _Window, source_names: list[str],
         flops_per_token: float, device_peak: float | None, num_devices: int,
         config: ml_collections.ConfigDict) -> float:
  loss = float(metrics["loss"])
  seconds = max(time.time() - window.start, 1e-9)
  scalars = {"loss": loss, "grad_norm": float(metrics["grad_norm"]), "lr": float(metrics["lr"]),
             "tokens_per_s": window.real / seconds, "loss_tokens_per_s": window.loss_tokens / seconds,
             "step_time_s": seconds / max(window.steps, 1)}
  if config.optim.z_loss > 0:
    scalars["z_loss"] = float(metrics["z_loss"])
  if device_peak:
    # Model FLOPs over every token slot the step computes (padding included), per device.
    scalars["mfu"] = flops_per_token * window.slots / seconds / (device_peak * num_devices)
  for name, total, tokens in zip(source_names, metrics["source_loss"], metrics["source_tokens"]):
    if tokens > 0:
      scalars[f"loss/{name}"] = float(total / tokens)
  writer.write(step, scalars)
  mfu = f" | MFU {scalars['mfu']:.1%}" if "mfu" in scalars else ""
  writer.console(step, f"loss {loss:.4f} | grad_norm {scalars['grad_norm']:.3f} | lr {scalars['lr']:.2e} | "
                       f"{scalars['tokens_per_s']:,.0f} tok/s | {scalars['step_time_s']:.3f} s/step{mfu}")
  window.reset()
  return loss


def _previous_final_loss(workdir: str) -> float:
  try:
    with open(os.path.join(workdir, "run_summary.json")) as f:
      return float(json.load(f).get("final_loss", float("nan")))
  except (OSError, ValueError):
    return float("nan")


def _check_finite(loss: float, step: int, checkpointer: checkpointing.Checkpointer) -> float:
  if not np.isfinite(loss):
    raise TrainingDiverged(
        f"loss is {loss} at step {step}; stopped without saving it. The last good checkpoint is step "
        f"{checkpointer.latest_step()} in {checkpointer.directory}. Lower config.optim.lr or check the data.")
  return loss


def _print(primary: bool, text: str) -> None:
  if primary:
    print(text, file=sys.stderr, flush=True)


def _write_json(path: str, obj: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, default=str)
  os.replace(tmp, path)


def define_flags() -> None:
  """Command-line flags, defined only when run as a program (so modules can import each other)."""
  config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).", lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, summary.")
  distributed.define_flags()
  flags.DEFINE_bool("plan_only", False, "Print the model's sharding plan (bytes per device) and exit; allocates nothing.")


def print_plan(config: ml_collections.ConfigDict, vocab_size: int = 0) -> str:
  """The sharding plan of params + optimizer state for `config`, computed abstractly."""
  mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  model_config = model_config_from(config.model, vocab_size)
  optimizer, _ = make_optimizer(config.optim, max(config.train.num_steps, 1))

  abstract = jax.eval_shape(functools.partial(new_train_state, model_config, optimizer, 0))
  text = (f"model {model_config.arch}: {model_config.num_params() / 1e9:.3f}B parameters; mesh {dict(mesh.shape)}\n"
          + describe_plan(abstract, state_shardings(abstract, mesh)))
  return text


def main(argv: list[str]) -> None:
  del argv
  if not flags.FLAGS["verbosity"].present:
    quiet_library_info_logs()
  config = flags.FLAGS.config
  if flags.FLAGS.plan_only:
    print(print_plan(config))
    return
  if not flags.FLAGS.workdir:
    raise app.UsageError("--workdir is required.")
  distributed.initialize_from_flags()
  summary = run(config, flags.FLAGS.workdir)
  _print(jax.process_index() == 0, f"{summary['status']}: step {summary['step']}/{summary['num_steps']}, "
         f"final loss {summary['final_loss']:.4f}. Results in {summary['workdir']} "
         f"(metrics.jsonl, tensorboard/, checkpoints/, run_summary.json).")
  if summary["status"] == "diverged":
    sys.exit(1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
