"""The package installed non-editable (a plain copy, no checkout beside it) finds its bundled assets."""

import subprocess
import sys

from tests import REPO_ROOT

PROBE = """
import os, csft_jax
from csft_jax import configuration
from csft_jax.data.config import DEMO_TOKENIZER, sample_collection_config
from csft_jax.data.sources import parse_sources
from csft_jax.data.tokenizer import load_tokenizer
from csft_jax.eval import meds_bench
assert not csft_jax.__file__.startswith(REPO), csft_jax.__file__
print(len(load_tokenizer(DEMO_TOKENIZER)))
print(sum(len(s.paths) for s in parse_sources(sample_collection_config().sources)))
print(len(meds_bench.load_task_dir(configuration.resolve_path("pkg://csft_jax/assets/eval/meds_sample"))))
"""


def test_installed_copy_reads_its_assets_through_importlib_resources(tmp_path):
  target = tmp_path / "site"
  subprocess.run(
    [
      sys.executable,
      "-m",
      "pip",
      "install",
      "-q",
      "--no-deps",
      "--no-build-isolation",
      "--target",
      str(target),
      REPO_ROOT,
    ],
    check=True,
    capture_output=True,
    timeout=300,
  )
  done = subprocess.run(
    [sys.executable, "-c", f"REPO = {REPO_ROOT!r}\n" + PROBE],
    cwd=tmp_path,
    env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"},
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.split() == ["3000", "5", "3"]  # demo tokenizer, sample sources, MedS sample tasks
