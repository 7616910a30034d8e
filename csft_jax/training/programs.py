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

from csft_jax import model_source
from csft_jax.convert.hf import is_hf_dir
from csft_jax.models import Decoder, ModelConfig, lora, model_config_from
from csft_jax.models.config import RUNTIME_FIELDS
from csft_jax.sharding import in_memory, logical_to_spec, state_shardings
from csft_jax.training.optimizer import opt_state_memory
from csft_jax.training.step import TrainState, make_eval_step, make_train_step


def new_train_state(model_config: ModelConfig, optimizer, seed: int) -> TrainState:
  """A freshly initialised state (call under `jax.eval_shape` or `jit` with out_shardings).

  With LoRA (`lora_rank > 0`) the trained params are the adapters and the rest is the frozen
  base, in the compute dtype: it takes no gradient and no optimizer state.
  """
  params = nnx.state(Decoder(model_config, rngs=nnx.Rngs(seed)), nnx.Param)
  frozen = None
  if model_config.lora_rank:
    params, frozen = trainable_and_frozen(params, model_config)
  return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), frozen)


def trainable_and_frozen(params: Any, model_config: ModelConfig) -> tuple[Any, Any]:
  """LoRA's partition of a model's params: (adapters, the base cast to the compute dtype)."""
  adapters, base = lora.split(params)
  dtype = jnp.dtype(model_config.dtype)
  return adapters, jax.tree.map(lambda x: x.astype(dtype), base)


def new_adapters(model_config: ModelConfig, seed: int, shardings: Any) -> Any:
  """Freshly initialised LoRA adapters placed on `shardings` (the base's random init is dead code)."""

  def make():
    return lora.split(nnx.state(Decoder(model_config, rngs=nnx.Rngs(seed)), nnx.Param))[0]

  return jax.jit(make, out_shardings=shardings)()


def base_config(model_config: ModelConfig) -> ModelConfig:
  """The model without adapters (what an HF directory or a base checkpoint holds), params in the
  compute dtype when it is LoRA's frozen base."""
  if not model_config.lora_rank:
    return model_config
  return model_config.replace(lora_rank=0, lora_targets=(), param_dtype=model_config.dtype)


def with_lora(model_config: ModelConfig, config: ml_collections.ConfigDict) -> ModelConfig:
  """`model_config` with `config.lora`'s adapters (targets named in the model's family)."""
  return model_config.replace(**lora.model_fields(config.get("lora"), model_config.arch))


@dataclasses.dataclass
class StartingState:
  """What `restore_or_init` decided and built."""

  graphdef: nnx.GraphDef
  state: TrainState
  shardings: Any
  model_config: ModelConfig
  origin: str  # A sentence for the console: where the weights came from.


def abstract_state(
  model_config: ModelConfig, optimizer, seed: int, mesh: Mesh, opt_state_kind: str | None = None
) -> tuple[TrainState, Any]:
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


def random_init(
  model_config: ModelConfig, optimizer, seed: int, mesh: Mesh, opt_state_kind: str | None = None
) -> StartingState:
  """A new state, created inside `jit` with `out_shardings`: no device ever holds the whole model."""
  _, shardings = abstract_state(model_config, optimizer, seed, mesh, opt_state_kind)
  state = jax.jit(functools.partial(new_train_state, model_config, optimizer, seed), out_shardings=shardings)()
  return StartingState(graphdef_of(model_config), state, shardings, model_config, "random init")


def jit_steps(
  config: ml_collections.ConfigDict, start: StartingState, optimizer, schedule, mesh: Mesh, num_sources: int
) -> tuple[Callable, Callable, NamedSharding]:
  """(train step, eval step, batch sharding): the jitted programs of a run, state donated."""
  batch_sharding = NamedSharding(mesh, logical_to_spec(("batch", "length")))
  offloaded = None
  if opt_state_memory(config.optim):
    offloaded = (in_memory(start.shardings.opt_state, "device"), start.shardings.opt_state)
  dropout = start.model_config.lora_rank and start.model_config.lora_dropout > 0
  train_step = jax.jit(
    make_train_step(
      start.graphdef,
      optimizer,
      num_sources=num_sources,
      grad_accum_steps=config.train.grad_accum_steps,
      z_loss_weight=config.optim.z_loss,
      schedule=schedule,
      loss_chunk_size=config.train.loss_chunk_size,
      opt_state_shardings=offloaded,
      dropout_seed=config.train.seed if dropout else None,
    ),
    in_shardings=(start.shardings, batch_sharding),
    out_shardings=(start.shardings, None),
    donate_argnums=0,
  )
  eval_step = jax.jit(
    make_eval_step(start.graphdef, num_sources=num_sources, loss_chunk_size=config.train.loss_chunk_size),
    in_shardings=(start.shardings.params, start.shardings.frozen, batch_sharding),
  )
  return train_step, eval_step, batch_sharding


def model_config_for_plan(config: ml_collections.ConfigDict, vocab_size: int = 0) -> ModelConfig:
  """The model a run of `config` would train, without devices: `init.from_hf`'s config.json when
  that directory is here, else the config's preset and fields."""
  if config.init.from_hf and is_hf_dir(config.init.from_hf):
    return with_lora(model_source.resolve(config.init.from_hf, **runtime_fields(config)).model_config, config)
  return with_lora(model_config_from(config.model, vocab_size), config)


def runtime_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The `ModelConfig` fields `config.model` sets on a loaded model (how it runs, not what it is)."""
  return {k: config.model[k] for k in RUNTIME_FIELDS}
