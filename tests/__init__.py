"""csft_jax tests; run from the repository root (`make test`)."""

import importlib.util
import os

# The checkout's root: tests run subprocesses from it and read files the repository ships.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_tool(name: str):
  """The module of `tools/<name>.py` (tools are scripts, not a package)."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO_ROOT, "tools", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
