"""csft_jax tests; run from the repository root (`make test`)."""

import importlib.util
import os
import socket
import subprocess
import sys

# The checkout's root: tests run subprocesses from it and read files the repository ships.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_tool(name: str):
  """The module of `tools/<name>.py` (tools are scripts, not a package)."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO_ROOT, "tools", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def run_local_processes(argv: list[str], *, num_processes: int = 2, devices: int = 2, timeout: int = 600) -> list[str]:
  """Runs `python <argv>` as `num_processes` processes of one job on this machine (gloo collectives
  over 127.0.0.1, `devices` CPU devices each) and returns their outputs; each must exit 0."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{s.getsockname()[1]}"
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    PYTHONPATH=os.pathsep.join(filter(None, (REPO_ROOT, os.environ.get("PYTHONPATH")))),
  )
  processes = [
    subprocess.Popen(
      [
        sys.executable,
        *argv,
        f"--coordinator_address={address}",
        f"--num_processes={num_processes}",
        f"--process_id={i}",
      ],
      cwd=REPO_ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(num_processes)
  ]
  try:
    outputs = [p.communicate(timeout=timeout)[0] for p in processes]
  finally:  # one process failing leaves its peers waiting in a collective: end them with the test
    for p in processes:
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, out in zip(processes, outputs):
    assert p.returncode == 0, out[-3000:]
  return outputs
