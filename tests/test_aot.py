"""`--compile_for=SLICE`: the real train step compiled for TPU slices from this CPU host (libtpu)."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("libtpu", reason="needs the tpu extra (make test installs it)")

from csft_jax import aot, configuration  # pylint: disable=wrong-import-position
from tests import REPO_ROOT


def _compile_for(slice_name: str, *overrides: str) -> tuple[int, str, dict]:
  """Runs the CLI; returns (exit code, all output, the JSON object of stdout's last line)."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  done = subprocess.run([sys.executable, "-m", "csft_jax.train", "--config=configs/demo.py",
                         f"--compile_for={slice_name}", *overrides], cwd=REPO_ROOT, capture_output=True, text=True,
                        timeout=600, env=env)
  return done.returncode, done.stdout + done.stderr, json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("slice_name,devices,hbm", [("v5p-8", 4, 95.0), ("v5e-8", 8, 16.0)])
def test_demo_config_compiles_and_fits_on_two_slice_kinds(slice_name, devices, hbm):
  code, out, report = _compile_for(slice_name)
  assert code == 0, out[-3000:]
  assert report["slice"] == slice_name and report["devices"] == devices and report["fits"] is True
  assert report["hbm_per_device_gib"] == hbm and report["mesh"]["data"] == devices
  assert 0 < report["params_gib"] < report["total_gib"] < 1
  assert report["opt_state_gib"] == pytest.approx(2 * report["params_gib"], rel=1e-3)  # AdamW: two moments
  assert f"{slice_name}: {devices} devices" in out and "fits (total" in out


def test_a_run_that_does_not_fit_exits_1_and_says_what_to_change():
  # 4,096 rows of 1,024 tokens on 8 chips of 16 GiB: the attention scores alone are far too large.
  code, out, report = _compile_for("v5e-8", "--config.train.global_batch_size=4096", "--config.data.seq_len=1024")
  assert code == 1 and report["fits"] is False and report["total_gib"] > 16
  assert "does NOT fit" in out and "config.train.grad_accum_steps" in out


def test_bad_inputs_name_what_to_fix(monkeypatch):
  config = configuration.load("configs/demo.py")
  with pytest.raises(aot.FitError, match=r"unknown slice 'v9-8'; known slices: v4-8, v4-16"):
    aot.check_fit(config, "v9-8")
  config.train.global_batch_size = 6
  with pytest.raises(aot.FitError, match=r"global_batch_size=6 / config.train.grad_accum_steps=1 = 6 rows .* "
                                         r"data x fsdp = 4 devices"):
    aot.check_fit(config, "v5p-8")
  monkeypatch.setitem(sys.modules, "libtpu", None)  # as if the extra were not installed
  with pytest.raises(aot.FitError, match=r"needs libtpu: install the `tpu` extra"):
    aot.check_fit(config, "v5p-8")
