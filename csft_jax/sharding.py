"""Logical axis names -> mesh axes: the one table that says how everything is sharded.

Model parameters and activations are annotated with logical names (`vocab, embed, heads,
kv_heads, head_dim, mlp, batch, length, layers`); `LOGICAL_RULES` maps each name to mesh axes
(`data, fsdp, tensor`). Changing the parallelism plan means editing this table, not the model.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Parameters are FSDP-sharded on `embed` and tensor-parallel on heads/mlp/vocab; activations
# are batch-sharded over data x fsdp (FSDP is data parallelism with sharded weights).
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
  ("batch", ("data", "fsdp")),
  ("length", None),
  ("vocab", "tensor"),
  ("embed", "fsdp"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("head_dim", None),
  ("mlp", "tensor"),
  ("norm", None),
  ("lora_rank", None),
  ("layers", None),
)

_ACTIVE: contextvars.ContextVar[tuple[Mesh, tuple] | None] = contextvars.ContextVar(
  "csft_jax_activation_sharding", default=None
)


def default_config() -> ml_collections.ConfigDict:
  """`config.mesh`: device counts per axis; one may be -1 for "the remaining devices"."""
  return ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a `(data, fsdp, tensor)` mesh; one size may be -1 to take the remaining devices."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh sizes data={data} fsdp={fsdp} tensor={tensor}: at most one may be -1.")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices cannot be split as data={data} fsdp={fsdp} tensor={tensor}.")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(
      f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {int(np.prod(sizes))} devices, "
      f"but {len(devices)} are available; set config.mesh sizes (use -1 for one of them)."
    )
  device_grid = np.asarray(devices).reshape(sizes)
  return Mesh(device_grid, MESH_AXES)


def abstract_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1) -> jax.sharding.AbstractMesh:
  """A `(data, fsdp, tensor)` mesh of named sizes only, for planning without the devices (-1 counts as 1)."""
  sizes = tuple(max(size, 1) for size in (data, fsdp, tensor))
  return jax.sharding.AbstractMesh(sizes, MESH_AXES)


def logical_to_spec(
  logical_axes: Sequence[str | None],
  shape: Sequence[int] | None = None,
  mesh: Mesh | None = None,
  rules: Sequence[tuple[str, Any]] = LOGICAL_RULES,
) -> PartitionSpec:
  """Maps logical axis names to a `PartitionSpec`.

  A mesh axis is used at most once per tensor (the first logical axis that claims it wins), and,
  when `shape` and `mesh` are given, a mesh axis that does not divide the dimension is dropped
  (e.g. 2 KV heads on a tensor axis of 4 stay replicated) instead of failing at placement.
  """
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for dim, name in enumerate(logical_axes):
    mesh_axes = table.get(name) if name is not None else None
    if mesh_axes is None:
      spec.append(None)
      continue
    mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    chosen = []
    for axis in mesh_axes:
      if axis in used:
        continue
      if shape is not None and mesh is not None:
        size = int(np.prod([mesh.shape[a] for a in chosen + [axis]]))
        if shape[dim] % size:
          continue
      chosen.append(axis)
    used.update(chosen)
    spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
  return PartitionSpec(*spec)


def state_shardings(abstract_state: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> Any:
  """`NamedSharding` for every leaf of an nnx state (abstract or concrete), from its logical names."""
  logical = nnx.get_partition_spec(abstract_state)

  def one(spec, leaf):
    names = tuple(spec) if isinstance(spec, PartitionSpec) else ()
    if len(names) != len(leaf.shape):
      names = (None,) * len(leaf.shape)
    return NamedSharding(mesh, logical_to_spec(names, leaf.shape, mesh, rules))

  return jax.tree.map(one, logical, abstract_state, is_leaf=lambda x: isinstance(x, PartitionSpec))


def in_memory(shardings: Any, kind: str) -> Any:
  """`shardings` (a tree of `NamedSharding`) placed in memory `kind` (`device`, `pinned_host`)."""
  return jax.tree.map(lambda s: s.with_memory_kind(kind), shardings)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> Iterator[None]:
  """Within this context (while tracing), `constrain` pins activations to the mesh."""
  token = _ACTIVE.set((mesh, tuple(rules)))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def active_mesh() -> Mesh | None:
  """The mesh of the enclosing `activation_sharding` (None outside it), for kernels run per shard."""
  active = _ACTIVE.get()
  return None if active is None else active[0]


def target_platform() -> str:
  """The platform the program is built for: the active mesh's (AOT for a TPU slice) or the default."""
  mesh = active_mesh()
  return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """`with_sharding_constraint` by logical names; a no-op outside `activation_sharding`."""
  active = _ACTIVE.get()
  if active is None:
    return x
  mesh, rules = active
  spec = logical_to_spec(logical_axes, x.shape, mesh, rules)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def describe_plan(tree: Any, shardings: Any) -> str:
  """A table of bytes in total and per device for each top-level part of `tree` (abstract is fine)."""

  def per_device(leaf, sharding) -> int:
    nbytes = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    shards = 1
    for axes in sharding.spec:
      for axis in (axes,) if isinstance(axes, str) else (axes or ()):
        shards *= sharding.mesh.shape[axis]
    return nbytes // shards

  rows = []
  parts = vars(tree) if hasattr(tree, "__dataclass_fields__") else {"state": tree}
  shard_parts = vars(shardings) if hasattr(shardings, "__dataclass_fields__") else {"state": shardings}
  for name, part in parts.items():
    leaves = jax.tree.leaves(part)
    total = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves)
    device = sum(per_device(x, s) for x, s in zip(leaves, jax.tree.leaves(shard_parts[name])))
    rows.append((name, total, device))
  rows.append(("total", sum(r[1] for r in rows), sum(r[2] for r in rows)))
  gib = 2**30
  lines = [f"{'part':<10} {'total GiB':>12} {'per device GiB':>15}"]
  lines += [f"{name:<10} {total / gib:>12.3f} {device / gib:>15.3f}" for name, total, device in rows]
  return "\n".join(lines)
