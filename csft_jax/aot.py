"""Will it fit? Ahead-of-time compilation of a run's train step for a named TPU slice, from any host.

XLA compiles for a TPU topology without the TPU (libtpu, the `tpu` extra: `pip install -e '.[tpu]'`),
and the compiled program reports its exact per-device memory. `check_fit(config, "v5p-8")` builds
the slice's mesh from `config.mesh`, the run's abstract sharded state and batch, lowers and
compiles the real jitted train step (the same `train.jit_steps` a run uses), and returns a
`FitReport`. Nothing is allocated.

Per device: `params` and `opt_state` are the state's shards (from the sharding plan); `temp` is
XLA's temporaries (activations, gradients, logits chunks); `total` is arguments + outputs +
temporaries - donated (aliased) buffers. A run fits when total <= FIT_MARGIN x the chip's HBM,
leaving room for the runtime and fragmentation.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

GIB = 2**30
FIT_MARGIN = 0.9
# XLA's refusal, e.g. "HLO temporaries (58.13G) exceeds available HBM (30.75G)" (G = GiB).
_TOO_LARGE = re.compile(r"HLO temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)")


@dataclasses.dataclass(frozen=True)
class Slice:
  """A TPU slice as XLA's topology API names it."""

  topology: str  # e.g. "v5p:2x2x1"
  chip_config: str  # "megacore" for v4 (one device per chip), else "default"
  chips_per_host: tuple[int, int, int]
  hbm_gib: float  # HBM per device


# Accelerator-type names (as `gcloud` spells them) -> topology. v4/v5p count TensorCores (2 per
# chip, one megacore device); v5e/v6e count chips.
SLICES = {
    "v4-8": Slice("v4:2x2x1", "megacore", (2, 2, 1), 32.0),
    "v4-16": Slice("v4:2x2x2", "megacore", (2, 2, 1), 32.0),
    "v4-32": Slice("v4:2x2x4", "megacore", (2, 2, 1), 32.0),
    "v5p-8": Slice("v5p:2x2x1", "default", (2, 2, 1), 95.0),
    "v5p-16": Slice("v5p:2x2x2", "default", (2, 2, 1), 95.0),
    "v5p-32": Slice("v5p:2x2x4", "default", (2, 2, 1), 95.0),
    "v5e-8": Slice("v5e:2x4", "default", (2, 4, 1), 16.0),
    "v5e-16": Slice("v5e:4x4", "default", (2, 2, 1), 16.0),
    "v5e-32": Slice("v5e:4x8", "default", (2, 2, 1), 16.0),
    "v6e-8": Slice("v6e:2x4", "default", (2, 4, 1), 32.0),
    "v6e-16": Slice("v6e:4x4", "default", (2, 2, 1), 32.0),
    "v6e-32": Slice("v6e:4x8", "default", (2, 2, 1), 32.0),
}


class FitError(ValueError):
  """A slice name, missing libtpu, or a config that cannot be laid out on the slice."""


@dataclasses.dataclass(frozen=True)
class FitReport:
  """Per-device memory of one compiled train step on one slice (GiB)."""

  slice: str
  devices: int
  mesh: dict[str, int]
  params_gib: float
  opt_state_gib: float
  temp_gib: float
  total_gib: float
  hbm_per_device_gib: float
  compiler_message: str = ""  # XLA's own words when it refused the program as too large

  @property
  def fits(self) -> bool:
    return self.total_gib <= FIT_MARGIN * self.hbm_per_device_gib

  def as_json(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), "fits": self.fits, "fit_margin": FIT_MARGIN}

  def table(self) -> str:
    rows = [("params", self.params_gib), ("opt_state", self.opt_state_gib), ("temporaries", self.temp_gib),
            ("total", self.total_gib), ("HBM of the chip", self.hbm_per_device_gib)]
    lines = [f"{self.slice}: {self.devices} devices, mesh {self.mesh}", f"{'per device':<18} {'GiB':>8}"]
    lines += [f"{name:<18} {value:>8.2f}" for name, value in rows]
    verdict = "fits" if self.fits else "does NOT fit"
    if self.compiler_message:
      lines.append(f"XLA: {self.compiler_message}")
    lines.append(f"{verdict} (total {self.total_gib:.2f} GiB vs {FIT_MARGIN:.0%} of {self.hbm_per_device_gib:.0f} GiB)")
    return "\n".join(lines)


def slice_devices(name: str) -> tuple[list[Any], Slice]:
  """The devices of slice `name` (abstract: nothing runs on them) and its description."""
  if name not in SLICES:
    raise FitError(f"unknown slice {name!r}; known slices: {', '.join(SLICES)}.")
  spec = SLICES[name]
  try:
    import libtpu  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    raise FitError("compiling for a TPU slice needs libtpu: install the `tpu` extra "
                   "(pip install -e '.[tpu]'; `make test` installs it).") from None
  # libtpu takes a machine-wide lockfile meant for processes that drive real TPUs; compiling drives
  # none, so two compiles (or a compile beside a test run) must not lock each other out.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  topology = topologies.get_topology_desc(platform="tpu", topology_name=spec.topology,
                                          chip_config_name=spec.chip_config,
                                          chips_per_host_bounds=spec.chips_per_host, num_slices=1)
  return list(topology.devices), spec


def _abstract_batch(config: ml_collections.ConfigDict, sharding) -> dict[str, jax.ShapeDtypeStruct]:
  shape = (config.train.global_batch_size, config.data.seq_len)
  dtypes = {"input_ids": jnp.int32, "target_ids": jnp.int32, "loss_mask": jnp.int8, "segment_ids": jnp.int32,
            "positions": jnp.int32, "source_ids": jnp.int32}
  return {k: jax.ShapeDtypeStruct(shape, d, sharding=sharding) for k, d in dtypes.items()}


def _check_batch(config: ml_collections.ConfigDict, mesh) -> None:
  batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
  micro = config.train.global_batch_size // max(config.train.grad_accum_steps, 1)
  if config.train.global_batch_size % config.train.grad_accum_steps or micro % batch_devices:
    raise FitError(
        f"config.train.global_batch_size={config.train.global_batch_size} / config.train.grad_accum_steps="
        f"{config.train.grad_accum_steps} = {micro} rows per microbatch must divide over config.mesh "
        f"data x fsdp = {batch_devices} devices.")


def check_fit(config: ml_collections.ConfigDict, slice_name: str) -> FitReport:
  """Compiles `config`'s train step for `slice_name`; see the module docstring."""
  from csft_jax import train  # pylint: disable=import-outside-toplevel
  from csft_jax.sharding import activation_sharding, make_mesh  # pylint: disable=import-outside-toplevel
  from csft_jax.training.optimizer import make_optimizer  # pylint: disable=import-outside-toplevel

  devices, spec = slice_devices(slice_name)
  try:
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices=devices)
  except ValueError as e:
    raise FitError(f"config.mesh does not fit {slice_name} ({len(devices)} devices): {e}") from None
  _check_batch(config, mesh)
  model_config = train.model_config_for_plan(config, _tokenizer_size(config))
  optimizer, schedule = make_optimizer(config.optim, max(config.train.num_steps, 1))
  abstract, shardings = train.abstract_state(model_config, optimizer, config.train.seed, mesh)
  start = train.StartingState(train.graphdef_of(model_config), abstract, shardings, model_config, "abstract")
  num_sources = max(sum(1 for s in config.data.sources.values() if s.get("enabled", True)), 1)
  train_step, _, batch_sharding = train.jit_steps(config, start, optimizer, schedule, mesh, num_sources)
  batch = _abstract_batch(config, batch_sharding)
  params_bytes = _per_device_bytes(abstract.params, shardings.params)
  opt_state_bytes = _per_device_bytes(abstract.opt_state, shardings.opt_state)
  report = functools.partial(FitReport, slice=slice_name, devices=len(devices), mesh=dict(mesh.shape),
                             params_gib=params_bytes / GIB, opt_state_gib=opt_state_bytes / GIB,
                             hbm_per_device_gib=spec.hbm_gib)
  try:
    with activation_sharding(mesh):
      compiled = train_step.lower(abstract, batch).compile()
  except jax.errors.JaxRuntimeError as e:
    # XLA refuses a program whose temporaries exceed the chip's HBM; its message has the size.
    match = _TOO_LARGE.search(str(e))
    if match is None:
      raise
    temp = float(match.group(1))
    arguments = (params_bytes + opt_state_bytes + _per_device_bytes(batch, {k: batch_sharding for k in batch})) / GIB
    return report(temp_gib=temp, total_gib=arguments + temp, compiler_message=match.group(0))
  memory = compiled.memory_analysis()
  total = (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
           - memory.alias_size_in_bytes)
  return report(temp_gib=memory.temp_size_in_bytes / GIB, total_gib=total / GIB)


def _tokenizer_size(config: ml_collections.ConfigDict) -> int:
  """The tokenizer's size when the model takes its vocab from it (`model.vocab_size <= 0`), else 0."""
  if config.model.vocab_size > 0:
    return 0
  from csft_jax.data.tokenizer import load_tokenizer  # pylint: disable=import-outside-toplevel
  return len(load_tokenizer(config.data.tokenizer or config.init.from_hf))


def _per_device_bytes(tree: Any, shardings: Any) -> int:
  def one(leaf, sharding) -> int:
    return int(np.prod(sharding.shard_shape(leaf.shape))) * np.dtype(leaf.dtype).itemsize
  return sum(jax.tree.leaves(jax.tree.map(one, tree, shardings)))


def advice(config: ml_collections.ConfigDict) -> str:
  """What to change when a run does not fit."""
  return (f"To fit: lower the per-device batch by raising config.train.grad_accum_steps (now "
          f"{config.train.grad_accum_steps}; the global batch stays {config.train.global_batch_size}), use "
          f"config.model.remat_policy=full (now {config.model.remat_policy}), set config.train.loss_chunk_size "
          f"> 0 to chunk the logits (now {config.train.loss_chunk_size}), or shard over more devices "
          f"(config.mesh.fsdp, now {config.mesh.fsdp}, on a larger slice).")
