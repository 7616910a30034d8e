"""AdamW with warmup + decay, global-norm clipping, and no weight decay on norms and biases."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

SCHEDULES = ("cosine", "linear", "constant")


def default_config() -> ml_collections.ConfigDict:
  """`config.optim`: AdamW with warmup then decay, clipping, decay off on norms and biases."""
  return ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
      schedule="cosine",  # one of SCHEDULES
      warmup_steps=0,  # > 0 wins over warmup_fraction
      warmup_fraction=0.05, min_lr_ratio=0.0, grad_clip_norm=1.0,
      z_loss=0.0))  # weight of z-loss (log Z)^2 on loss tokens


def learning_rate_schedule(optim: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  """Linear warmup to `optim.lr`, then cosine/linear decay to `lr * min_lr_ratio` at `num_steps`.

  Warmup is `optim.warmup_steps` if > 0, else `round(optim.warmup_fraction * num_steps)`.
  """
  if optim.schedule not in SCHEDULES:
    raise ValueError(f"config.optim.schedule={optim.schedule!r}; choose one of {SCHEDULES}.")
  warmup = optim.warmup_steps if optim.warmup_steps > 0 else int(round(optim.warmup_fraction * num_steps))
  warmup = min(warmup, max(num_steps - 1, 0))
  peak, end = optim.lr, optim.lr * optim.min_lr_ratio
  if optim.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(num_steps, warmup + 1), end)
  if optim.schedule == "linear":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup), optax.linear_schedule(peak, end, max(num_steps - warmup, 1))],
        [warmup])
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup])


def decay_mask(params: Any) -> Any:
  """True for matrices (kernels, embeddings), False for norm scales and biases."""
  def decays(path, _):
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    return any(n in ("kernel", "embedding") for n in names)
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim: ml_collections.ConfigDict, num_steps: int) -> tuple[optax.GradientTransformation,
                                                                               optax.Schedule]:
  """Returns (optimizer, schedule) from `config.optim`."""
  if optim.name != "adamw":
    raise ValueError(f"config.optim.name={optim.name!r}; only 'adamw' is implemented.")
  schedule = learning_rate_schedule(optim, num_steps)
  parts = []
  if optim.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(optim.grad_clip_norm))
  parts.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay,
                           mask=decay_mask))
  return optax.chain(*parts), schedule
