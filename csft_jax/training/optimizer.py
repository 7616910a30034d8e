"""AdamW with warmup + decay, global-norm clipping, and no weight decay on norms and biases."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

SCHEDULES = ("cosine", "linear", "constant")


def default_config() -> ml_collections.ConfigDict:
  """`config.optim`: AdamW with warmup then decay, clipping, decay off on norms and biases."""
  return ml_collections.ConfigDict(
    dict(
      name="adamw",
      lr=1e-5,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=0.0,
      schedule="cosine",  # one of SCHEDULES
      warmup_steps=0,  # > 0 wins over warmup_fraction
      warmup_fraction=0.05,
      min_lr_ratio=0.0,
      grad_clip_norm=1.0,
      z_loss=0.0,  # weight of z-loss (log Z)^2 on loss tokens
      # none | host: the AdamW moments live in host memory (JAX memory kind pinned_host) and are
      # brought onto the device for each update; frees twice the parameters' bytes of HBM.
      offload="none",
      # float32 | bfloat16: the dtype the AdamW moments are stored in between steps (the update
      # itself runs in float32); bfloat16 halves the optimizer state.
      moments_dtype="float32",
    )
  )


MOMENTS_DTYPES = ("float32", "bfloat16")

OFFLOADS = ("none", "host")
HOST_MEMORY = "pinned_host"


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
      [optax.linear_schedule(0.0, peak, warmup), optax.linear_schedule(peak, end, max(num_steps - warmup, 1))], [warmup]
    )
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup])


def decay_mask(params: Any) -> Any:
  """True for matrices (kernels, embeddings, LoRA adapters), False for norm scales and biases."""

  def decays(path, _):
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    return any(n in ("kernel", "embedding", "lora_a", "lora_b", "shared_qkv_a") for n in names)

  return jax.tree_util.tree_map_with_path(decays, params)


def opt_state_memory(optim: ml_collections.ConfigDict) -> str | None:
  """The memory kind the optimizer state lives in: `pinned_host` with `optim.offload='host'`, else None
  (the device's own memory)."""
  offload = optim.get("offload", "none")  # configs stored before the field existed
  if offload not in OFFLOADS:
    raise ValueError(f"config.optim.offload={offload!r}; choose one of {OFFLOADS}.")
  return HOST_MEMORY if offload == "host" else None


def check_host_memory(device: jax.Device) -> None:
  """Fails before any work when `device` cannot address host memory (`optim.offload='host'`).

  Raises:
    ValueError naming the backend's memory kinds and what to set instead.
  """
  kinds = sorted(memory.kind for memory in device.addressable_memories())
  if HOST_MEMORY not in kinds:
    raise ValueError(
      f"config.optim.offload='host' needs {HOST_MEMORY!r} memory, which {device.platform} device "
      f"{device.id} lacks (it has {kinds}); set config.optim.offload=none."
    )


def make_optimizer(
  optim: ml_collections.ConfigDict, num_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (optimizer, schedule) from `config.optim`."""
  if optim.name != "adamw":
    raise ValueError(f"config.optim.name={optim.name!r}; only 'adamw' is implemented.")
  schedule = learning_rate_schedule(optim, num_steps)
  parts = []
  if optim.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(optim.grad_clip_norm))
  adamw = optax.adamw(
    schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay, mask=decay_mask
  )
  moments_dtype = optim.get("moments_dtype", "float32")  # configs stored before the field existed
  if moments_dtype not in MOMENTS_DTYPES:
    raise ValueError(f"config.optim.moments_dtype={moments_dtype!r}; choose one of {MOMENTS_DTYPES}.")
  parts.append(adamw if moments_dtype == "float32" else stored_in(adamw, jnp.dtype(moments_dtype)))
  return optax.chain(*parts), schedule


def stored_in(inner: optax.GradientTransformation, dtype) -> optax.GradientTransformation:
  """`inner` with its floating-point state stored in `dtype` between updates and computed in float32."""

  def cast(tree, to):
    return jax.tree.map(lambda x: x.astype(to) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

  def init(params):
    return cast(inner.init(params), dtype)

  def update(updates, state, params=None):
    updates, state = inner.update(updates, cast(state, jnp.float32), params)
    return updates, cast(state, dtype)

  return optax.GradientTransformation(init, update)
