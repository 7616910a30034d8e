"""The train program, assembled in one place: the state (created, abstract or restored), its
shardings, and the jitted train and eval steps over the pipeline's batch.

`csft_jax.train` runs it and `csft_jax.aot` compiles it for a TPU slice: both build it here, so the
program a `--compile_for` report describes is the program a run executes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from csft_jax.convert import read_hf_config
from csft_jax.loading import is_hf_dir
from csft_jax.models import Decoder, ModelConfig, model_config_from
from csft_jax.models.config import RUNTIME_FIELDS
from csft_jax.sharding import in_memory, logical_to_spec, state_shardings
from csft_jax.training.optimizer import opt_state_memory
from csft_jax.training.step import TrainState, make_eval_step, make_train_step


def new_train_state(model_config: ModelConfig, optimizer, seed: int) -> TrainState:
  """A freshly initialised state (call under `jax.eval_shape` or `jit` with out_shardings)."""
  params = nnx.state(Decoder(model_config, rngs=nnx.Rngs(seed)), nnx.Param)
  return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))


@dataclasses.dataclass
class StartingState:
  """What `restore_or_init` decided and built."""

  graphdef: nnx.GraphDef
  state: TrainState
  shardings: Any
  model_config: ModelConfig
  origin: str  # A sentence for the console: where the weights came from.


def abstract_state(model_config: ModelConfig, optimizer, seed: int, mesh: Mesh,
                   opt_state_kind: str | None = None) -> tuple[TrainState, Any]:
  """The state's shapes with their shardings attached, and the shardings (the optimizer state's in
  memory kind `opt_state_kind`, e.g. `pinned_host`, when given: see `optim.offload`)."""
  abstract = jax.eval_shape(functools.partial(new_train_state, model_config, optimizer, seed))
  shardings = state_shardings(abstract, mesh)
  if opt_state_kind:
    shardings = shardings.replace(opt_state=in_memory(shardings.opt_state, opt_state_kind))
  with_shardings = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return with_shardings, shardings


def graphdef_of(model_config: ModelConfig) -> nnx.GraphDef:
  return nnx.graphdef(nnx.eval_shape(lambda: Decoder(model_config, rngs=nnx.Rngs(0))))


def random_init(model_config: ModelConfig, optimizer, seed: int, mesh: Mesh,
                opt_state_kind: str | None = None) -> StartingState:
  """A new state, created inside `jit` with `out_shardings`: no device ever holds the whole model."""
  _, shardings = abstract_state(model_config, optimizer, seed, mesh, opt_state_kind)
  state = jax.jit(functools.partial(new_train_state, model_config, optimizer, seed), out_shardings=shardings)()
  return StartingState(graphdef_of(model_config), state, shardings, model_config, "random init")


def jit_steps(config: ml_collections.ConfigDict, start: StartingState, optimizer, schedule, mesh: Mesh,
              num_sources: int) -> tuple[Callable, Callable, NamedSharding]:
  """(train step, eval step, batch sharding): the jitted programs of a run, state donated."""
  batch_sharding = NamedSharding(mesh, logical_to_spec(("batch", "length")))
  offloaded = None
  if opt_state_memory(config.optim):
    offloaded = (in_memory(start.shardings.opt_state, "device"), start.shardings.opt_state)
  train_step = jax.jit(
      make_train_step(start.graphdef, optimizer, num_sources=num_sources,
                      grad_accum_steps=config.train.grad_accum_steps, z_loss_weight=config.optim.z_loss,
                      schedule=schedule, loss_chunk_size=config.train.loss_chunk_size,
                      opt_state_shardings=offloaded),
      in_shardings=(start.shardings, batch_sharding), out_shardings=(start.shardings, None), donate_argnums=0)
  eval_step = jax.jit(make_eval_step(start.graphdef, num_sources=num_sources,
                                     loss_chunk_size=config.train.loss_chunk_size),
                      in_shardings=(start.shardings.params, batch_sharding))
  return train_step, eval_step, batch_sharding


def model_config_for_plan(config: ml_collections.ConfigDict, vocab_size: int = 0) -> ModelConfig:
  """The model a run of `config` would train, without devices: `init.from_hf`'s config.json when
  that directory is here, else the config's preset and fields."""
  if config.init.from_hf and is_hf_dir(config.init.from_hf):
    return read_hf_config(config.init.from_hf, **{k: config.model[k] for k in RUNTIME_FIELDS})
  return model_config_from(config.model, vocab_size)
