"""Joining a multi-process JAX run, shared by the entry points (train, evaluate).

Every process runs the same command; with `--coordinator_address` they find each other over the
network, with `--distributed` on TPU VMs the topology comes from the environment.
"""

import os

import jax
from absl import flags


def define_flags() -> None:
  """The flags of `initialize_from_flags`; entry points call this when run as programs."""
  flags.DEFINE_string("coordinator_address", "", "host:port of process 0, for multi-process runs.")
  flags.DEFINE_integer("num_processes", 1, "Number of processes (with --coordinator_address).")
  flags.DEFINE_integer("process_id", 0, "This process's index (with --coordinator_address).")
  flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() from the environment (TPU VMs).")


def initialize(coordinator_address: str, num_processes: int, process_id: int, auto: bool) -> None:
  """Joins a multi-process run (explicit coordinator, or the environment of TPU VMs)."""
  if coordinator_address:
    if os.environ.get("JAX_PLATFORMS") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif auto:
    jax.distributed.initialize()


def initialize_from_flags() -> None:
  f = flags.FLAGS
  initialize(f.coordinator_address, f.num_processes, f.process_id, f.distributed)
