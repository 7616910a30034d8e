"""The jitted train and eval steps (functional: graphdef + params pytree)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from csft_jax.sharding import constrain
from csft_jax.training.loss import LossSums, chunked_loss_sums, loss_sums

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training, as one pytree (checkpointed and donated)."""

  step: jax.Array
  params: Any  # nnx.State of the trained Params (float32 master weights): all, or the LoRA adapters
  opt_state: Any
  # LoRA's frozen base (compute dtype, no gradient, no optimizer state), None otherwise. It is
  # not in step checkpoints: a LoRA run keeps it once, in its workdir (`RunDir.base`).
  frozen: Any = None


def merge_model(graphdef: nnx.GraphDef, params: Any, frozen: Any = None) -> nnx.Module:
  """The model of trained `params` and, for LoRA, its `frozen` base.

  The base's variables are rebuilt here (`tree.map`), so that they belong to the trace this runs
  in (under `grad`, as the trained ones do): NNX's scan over layers refuses a module whose
  variables come from different traces.
  """
  if frozen is None:
    return nnx.merge(graphdef, params)
  return nnx.merge(graphdef, params, jax.tree.map(lambda x: x, frozen))


def _forward_sums(
  graphdef: nnx.GraphDef,
  params: Any,
  frozen: Any,
  batch: Batch,
  num_sources: int,
  loss_chunk_size: int,
  dropout_key: jax.Array | None = None,
) -> LossSums:
  """Loss sums of one (micro)batch; with `loss_chunk_size > 0` the full logits never exist."""
  model = merge_model(graphdef, params, frozen)
  inputs = dict(positions=batch["positions"], segment_ids=batch["segment_ids"], dropout_key=dropout_key)
  targets = (batch["target_ids"], batch["loss_mask"], batch["source_ids"], num_sources)
  if loss_chunk_size > 0:
    head, layout = model.lm_head_weights()
    return chunked_loss_sums(
      model(batch["input_ids"], **inputs, hidden_only=True),
      head,
      *targets,
      chunk_size=loss_chunk_size,
      head_layout=layout,
    )
  return loss_sums(model(batch["input_ids"], **inputs), *targets)


def _split_microbatches(batch: Batch, num_micro: int) -> Batch:
  """`[B, T]` -> `[num_micro, B / num_micro, T]`, microbatch i = rows i, i + A, i + 2A, ...

  Interleaving (rather than contiguous chunks) keeps every microbatch spread over all data
  shards, so no device idles and no resharding is needed.
  """

  def split(x):
    b = x.shape[0]
    if b % num_micro:
      raise ValueError(f"global batch {b} is not divisible by grad_accum_steps={num_micro}.")
    x = x.reshape(b // num_micro, num_micro, *x.shape[1:]).swapaxes(0, 1)
    return constrain(x, (None, "batch", "length"))

  return jax.tree.map(split, batch)


def make_train_step(
  graphdef: nnx.GraphDef,
  optimizer: optax.GradientTransformation,
  *,
  num_sources: int,
  grad_accum_steps: int = 1,
  z_loss_weight: float = 0.0,
  schedule: optax.Schedule | None = None,
  loss_chunk_size: int = 0,
  opt_state_shardings: tuple[Any, Any] | None = None,
  dropout_seed: int | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """Builds `train_step(state, batch) -> (state, metrics)`; jit it with shardings and donation.

  The loss is the token mean over the loss tokens of the whole *global* batch: each microbatch
  contributes sum / global_count, so accumulation over microbatches and sharding over devices
  give the same gradient as one big batch. `loss_chunk_size > 0` computes the LM head and the
  cross-entropy chunk by chunk (`chunked_loss_sums`): same values, no `[B, T, V]` logits.
  `opt_state_shardings=(on device, where it lives)` moves an optimizer state kept in host memory
  onto the device for the update and back (`optim.offload='host'`); the arithmetic is the same.
  Gradients and updates cover `state.params` only: a LoRA state's `frozen` base passes through.
  `dropout_seed` keys LoRA dropout by (seed, step, microbatch), so a resumed run draws the same masks.
  """

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
    global_tokens = jnp.maximum(batch["loss_mask"].astype(jnp.float32).sum(), 1.0)

    def objective(params, frozen, micro, key):
      sums = _forward_sums(graphdef, params, frozen, micro, num_sources, loss_chunk_size, key)
      return (sums.loss + z_loss_weight * sums.z_loss) / global_tokens, sums

    grad_fn = jax.grad(objective, has_aux=True)

    def accumulate(carry, inputs):
      grads, sums = carry
      micro, index = inputs
      key = None
      if dropout_seed is not None:
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(dropout_seed), state.step), index)
      micro_grads, micro_sums = grad_fn(state.params, state.frozen, micro, key)
      return (jax.tree.map(jnp.add, grads, micro_grads), sums + micro_sums), None

    zero_grads = jax.tree.map(jnp.zeros_like, state.params)
    (grads, sums), _ = jax.lax.scan(
      accumulate,
      (zero_grads, LossSums.zeros(num_sources)),
      (_split_microbatches(batch, grad_accum_steps), jnp.arange(grad_accum_steps)),
    )
    opt_state = state.opt_state
    if opt_state_shardings is not None:
      opt_state = jax.device_put(opt_state, opt_state_shardings[0])
    updates, opt_state = optimizer.update(grads, opt_state, state.params)
    if opt_state_shardings is not None:
      opt_state = jax.device_put(opt_state, opt_state_shardings[1])
    params = optax.apply_updates(state.params, updates)
    metrics = {
      "loss": sums.loss / global_tokens,
      "z_loss": sums.z_loss / global_tokens,
      "grad_norm": optax.tree.norm(grads),
      "loss_tokens": sums.tokens,
      "source_loss": sums.source_loss,
      "source_tokens": sums.source_tokens,
      "real_tokens": (batch["segment_ids"] > 0).sum(),
    }
    if schedule is not None:
      metrics["lr"] = schedule(state.step)
    return TrainState(state.step + 1, params, opt_state, state.frozen), metrics

  return train_step


def make_eval_step(
  graphdef: nnx.GraphDef, *, num_sources: int, loss_chunk_size: int = 0
) -> Callable[[Any, Any, Batch], LossSums]:
  """Builds `eval_step(params, frozen, batch) -> LossSums` (sums, so batches add up exactly)."""

  def eval_step(params: Any, frozen: Any, batch: Batch) -> LossSums:
    return _forward_sums(graphdef, params, frozen, batch, num_sources, loss_chunk_size)

  return eval_step
