"""Will it fit? Ahead-of-time compilation of a run's programs for a named TPU slice, from any host.

XLA compiles for a TPU topology without the TPU (libtpu, the `tpu` extra: `pip install -e '.[tpu]'`),
and the compiled program reports its exact per-device memory. `check_fit(config, "v5p-8")` builds
the slice's mesh from `config.mesh`, the run's abstract sharded state and batch, lowers and
compiles the real jitted train step (the same `programs.jit_steps` a run uses), and returns a
`FitReport`. `check_generate_fit(eval_config, "v5p-8", model_config)` does the same for the
evaluation engine's generate program (prefill + decode loop on its KV cache) at the largest batch
the evaluation can compile. Nothing is allocated.

Per device: `params` and `opt_state` are the state's shards (from the sharding plan); `temp` is
XLA's temporaries (activations, gradients, logits chunks; the KV cache when generating); `total`
is arguments + outputs + temporaries - donated (aliased) buffers. A run fits when total <=
FIT_MARGIN x the chip's HBM, leaving room for the runtime and fragmentation.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import re
from typing import Any

import jax
import ml_collections
import numpy as np

from csft_jax.data import packing

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


# Accelerator-type names (as `gcloud` spells them: `<generation>-<size>`) -> topology. v4/v5p sizes
# count TensorCores (2 per chip, one megacore device); v5e/v6e sizes count chips. Hosts hold 4 chips
# (2x2), except the single-host 8-chip v5e/v6e machines (2x4).
_GENERATIONS = {
  # generation: (chip_config, HBM GiB per device, {size: topology})
  "v4": ("megacore", 32.0, {8: "2x2x1", 16: "2x2x2", 32: "2x2x4"}),
  "v5p": ("default", 95.0, {8: "2x2x1", 16: "2x2x2", 32: "2x2x4"}),
  "v5e": ("default", 16.0, {8: "2x4", 16: "4x4", 32: "4x8"}),
  "v6e": ("default", 32.0, {8: "2x4", 16: "4x4", 32: "4x8"}),
}
SLICES = {
  f"{generation}-{size}": Slice(
    f"{generation}:{topology}", chip_config, (2, 4, 1) if topology == "2x4" else (2, 2, 1), hbm_gib
  )
  for generation, (chip_config, hbm_gib, sizes) in _GENERATIONS.items()
  for size, topology in sizes.items()
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
  opt_state_gib: float | None  # None for a program without optimizer state (generation)
  temp_gib: float
  total_gib: float
  hbm_per_device_gib: float
  compiler_message: str = ""  # XLA's own words when it refused the program as too large
  program: str = "train step"
  kv_cache_gib: float | None = None  # generation: the KV cache, one of the temporaries
  # optim.offload='host': the optimizer state lives in host memory, outside `total_gib`
  host_gib: float | None = None
  # LoRA: the frozen base (compute dtype); `params_gib` and `opt_state_gib` are the adapters'
  frozen_gib: float | None = None

  @property
  def fits(self) -> bool:
    return self.total_gib <= FIT_MARGIN * self.hbm_per_device_gib

  def as_json(self) -> dict[str, Any]:
    fields = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
    return {**fields, "fits": self.fits, "fit_margin": FIT_MARGIN}

  def table(self) -> str:
    opt_state = "opt_state (host)" if self.host_gib is not None else "opt_state"
    params = "params (trained)" if self.frozen_gib is not None else "params"
    rows = [
      ("frozen base", self.frozen_gib),
      (params, self.params_gib),
      (opt_state, self.opt_state_gib),
      ("temporaries", self.temp_gib),
      ("  of which KV cache", self.kv_cache_gib),
      ("total on device", self.total_gib),
      ("host memory", self.host_gib),
      ("HBM of the chip", self.hbm_per_device_gib),
    ]
    lines = [
      f"{self.slice}: {self.devices} devices, mesh {self.mesh}, {self.program}",
      f"{'per device':<18} {'GiB':>8}",
    ]
    lines += [f"{name:<18} {value:>8.2f}" for name, value in rows if value is not None]
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
  if importlib.util.find_spec("libtpu") is None:
    raise FitError(
      "compiling for a TPU slice needs libtpu: install the `tpu` extra "
      "(pip install -e '.[tpu]'; `make test` installs it)."
    )
  # libtpu takes a machine-wide lockfile meant for processes that drive real TPUs; compiling drives
  # none, so two compiles (or a compile beside a test run) must not lock each other out.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies

  topology = topologies.get_topology_desc(
    platform="tpu",
    topology_name=spec.topology,
    chip_config_name=spec.chip_config,
    chips_per_host_bounds=spec.chips_per_host,
    num_slices=1,
  )
  return list(topology.devices), spec


def abstract_batch(config: ml_collections.ConfigDict, sharding) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch the pipeline feeds the train step: its keys and dtype (`data.packing`)."""
  shape = (config.train.global_batch_size, config.data.seq_len)
  return {k: jax.ShapeDtypeStruct(shape, packing.ROW_DTYPE, sharding=sharding) for k in packing.ROW_KEYS}


def _check_batch(config: ml_collections.ConfigDict, mesh) -> None:
  batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
  micro = config.train.global_batch_size // max(config.train.grad_accum_steps, 1)
  if config.train.global_batch_size % config.train.grad_accum_steps or micro % batch_devices:
    raise FitError(
      f"config.train.global_batch_size={config.train.global_batch_size} / config.train.grad_accum_steps="
      f"{config.train.grad_accum_steps} = {micro} rows per microbatch must divide over config.mesh "
      f"data x fsdp = {batch_devices} devices."
    )


def _slice_mesh(mesh_config: ml_collections.ConfigDict, slice_name: str, devices: list[Any]):
  from csft_jax.sharding import make_mesh

  try:
    return make_mesh(mesh_config.data, mesh_config.fsdp, mesh_config.tensor, devices=devices)
  except ValueError as e:
    raise FitError(f"config.mesh does not fit {slice_name} ({len(devices)} devices): {e}") from None


def _compile(jitted, args: tuple[Any, ...], kwargs: dict[str, Any], mesh) -> tuple[float, float, str, float]:
  """(temporaries GiB, device total GiB or -1 when XLA refused, XLA's refusal, host-memory arguments
  GiB) of `jitted` compiled for `args`."""
  from csft_jax.sharding import activation_sharding

  try:
    with activation_sharding(mesh):
      compiled = jitted.lower(*args, **kwargs).compile()
  except jax.errors.JaxRuntimeError as e:
    # XLA refuses a program whose temporaries exceed the chip's HBM; its message has the size.
    match = _TOO_LARGE.search(str(e))
    if match is None:
      raise
    return float(match.group(1)), -1.0, match.group(0), 0.0
  memory = compiled.memory_analysis()
  # Device memory only: arguments kept in host memory (optim.offload) are counted apart.
  total = (
    memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes - memory.alias_size_in_bytes
  )
  host = getattr(memory, "host_argument_size_in_bytes", 0)
  return memory.temp_size_in_bytes / GIB, total / GIB, "", host / GIB


def check_fit(config: ml_collections.ConfigDict, slice_name: str) -> FitReport:
  """Compiles `config`'s train step for `slice_name`; see the module docstring."""
  from csft_jax.training import programs
  from csft_jax.training.optimizer import make_optimizer, opt_state_memory

  devices, spec = slice_devices(slice_name)
  mesh = _slice_mesh(config.mesh, slice_name, devices)
  _check_batch(config, mesh)
  model_config = programs.model_config_for_plan(config, _tokenizer_size(config))
  optimizer, schedule = make_optimizer(config.optim, max(config.train.num_steps, 1))
  offloaded = opt_state_memory(config.optim)
  abstract, shardings = programs.abstract_state(model_config, optimizer, config.train.seed, mesh, offloaded)
  start = programs.StartingState(programs.graphdef_of(model_config), abstract, shardings, model_config, "abstract")
  num_sources = max(sum(1 for s in config.data.sources.values() if s.get("enabled", True)), 1)
  train_step, _, batch_sharding = programs.jit_steps(config, start, optimizer, schedule, mesh, num_sources)
  batch = abstract_batch(config, batch_sharding)
  params_bytes = _per_device_bytes(abstract.params, shardings.params)
  opt_state_bytes = _per_device_bytes(abstract.opt_state, shardings.opt_state)
  frozen_bytes = _per_device_bytes(abstract.frozen, shardings.frozen) if abstract.frozen is not None else None
  report = functools.partial(
    FitReport,
    slice=slice_name,
    devices=len(devices),
    mesh=dict(mesh.shape),
    params_gib=params_bytes / GIB,
    opt_state_gib=opt_state_bytes / GIB,
    hbm_per_device_gib=spec.hbm_gib,
    frozen_gib=None if frozen_bytes is None else frozen_bytes / GIB,
  )
  temp, total, refusal, host = _compile(train_step, (abstract, batch), {}, mesh)
  if offloaded:
    report = functools.partial(report, host_gib=host if not refusal else opt_state_bytes / GIB)
  if refusal:
    total = (
      temp
      + (
        params_bytes
        + (frozen_bytes or 0)
        + (0 if offloaded else opt_state_bytes)
        + _per_device_bytes(batch, {k: batch_sharding for k in batch})
      )
      / GIB
    )
  return report(temp_gib=temp, total_gib=total, compiler_message=refusal)


def check_generate_fit(config: ml_collections.ConfigDict, slice_name: str, model_config) -> FitReport:
  """Compiles the eval engine's generate program for `slice_name`; see the module docstring.

  Args:
    config: an eval config (`configs/eval/*.py`): `mesh`, `batch_size`, `max_new_tokens`,
      `max_prompt_len` (0: the model's context minus `max_new_tokens`, the longest prompt the
      engine pads to), sampling fields where the benchmark has them.
    slice_name: a key of `SLICES`.
    model_config: the evaluated model's `ModelConfig`, in the dtypes it will run in.

  Returns:
    A `FitReport` whose temporaries include the KV cache (`kv_cache_gib`) and the prefill's
    activations for `batch_size` rows of the longest prompt.
  """
  from csft_jax.eval import engine, runner

  devices, spec = slice_devices(slice_name)
  mesh = _slice_mesh(config.mesh, slice_name, devices)
  prompt_len = config.max_prompt_len or model_config.max_position_embeddings - config.max_new_tokens
  if prompt_len < 1:
    raise FitError(
      f"config.max_new_tokens={config.max_new_tokens} leaves no room for a prompt in the model's "
      f"context of {model_config.max_position_embeddings} tokens; lower it."
    )
  sampling = runner.get_benchmark(config.benchmark).sampling(
    config
  )  # what the runner generates the benchmark's requests with
  # The engine's own jitted program: what an evaluation compiles for its largest batch.
  program = engine.generate_program(
    model_config,
    mesh,
    batch_size=config.batch_size,
    prompt_len=prompt_len,
    max_new_tokens=config.max_new_tokens,
    sampling=sampling,
    batching=config.batching,
  )
  temp, total, refusal, _ = _compile(program.jitted, program.args, program.kwargs, mesh)
  params_gib = _per_device_bytes(program.params, jax.tree.map(lambda a: a.sharding, program.params)) / GIB
  if refusal:
    total = temp + params_gib
  cache_bytes = program.cache_bytes_per_device
  return FitReport(
    slice=slice_name,
    devices=len(devices),
    mesh=dict(mesh.shape),
    params_gib=params_gib,
    opt_state_gib=None,
    temp_gib=temp,
    total_gib=total,
    hbm_per_device_gib=spec.hbm_gib,
    compiler_message=refusal,
    kv_cache_gib=cache_bytes / GIB,
    program=f"{program.description}, {model_config.dtype}",
  )


def _tokenizer_size(config: ml_collections.ConfigDict) -> int:
  """The tokenizer's size when the model takes its vocab from it (`model.vocab_size <= 0`), else 0."""
  if config.model.vocab_size > 0:
    return 0
  from csft_jax.data.tokenizer import load_tokenizer

  return len(load_tokenizer(config.data.tokenizer or config.init.from_hf))


def _per_device_bytes(tree: Any, shardings: Any) -> int:
  def one(leaf, sharding) -> int:
    return int(np.prod(sharding.shard_shape(leaf.shape))) * np.dtype(leaf.dtype).itemsize

  return sum(jax.tree.leaves(jax.tree.map(one, tree, shardings)))


def generate_advice(config: ml_collections.ConfigDict) -> str:
  """What to change when an evaluation's generate program does not fit."""
  return (
    f"To fit: lower config.batch_size (now {config.batch_size}) or config.max_prompt_len (now "
    f"{config.max_prompt_len or 'the model context minus max_new_tokens'}; longer prompts lose their start), "
    f"evaluate in config.dtype=bfloat16 (now {config.dtype}), or shard the weights and KV cache "
    f"(config.mesh.fsdp, now {config.mesh.fsdp}; config.mesh.tensor, now {config.mesh.tensor})."
  )


def advice(config: ml_collections.ConfigDict) -> str:
  """What to change when a run does not fit."""
  return (
    f"To fit: lower the per-device batch by raising config.train.grad_accum_steps (now "
    f"{config.train.grad_accum_steps}; the global batch stays {config.train.global_batch_size}), use "
    f"config.model.remat_policy=full (now {config.model.remat_policy}), set config.train.loss_chunk_size "
    f"> 0 to chunk the logits (now {config.train.loss_chunk_size}), or shard over more devices "
    f"(config.mesh.fsdp, now {config.mesh.fsdp}, on a larger slice)."
  )
