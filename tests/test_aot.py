"""`--compile_for=SLICE`: the real train step and eval generate program compiled for TPU slices from this
CPU host (libtpu)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("libtpu", reason="needs the tpu extra (make test installs it)")

from csft_jax import aot, configuration
from csft_jax.models import Decoder
from tests import REPO_ROOT


def _compile_for(slice_name: str, *overrides: str) -> tuple[int, str, dict]:
  """Runs the CLI; returns (exit code, all output, the JSON object of stdout's last line)."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  done = subprocess.run(
    [sys.executable, "-m", "csft_jax.train", "--config=configs/demo.py", f"--compile_for={slice_name}", *overrides],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=600,
    env=env,
  )
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
  with pytest.raises(
    aot.FitError,
    match=r"global_batch_size=6 / config.train.grad_accum_steps=1 = 6 rows .* "
    r"data x fsdp = 4 devices",
  ):
    aot.check_fit(config, "v5p-8")
  monkeypatch.setitem(sys.modules, "libtpu", None)  # as if the extra were not installed
  with pytest.raises(aot.FitError, match=r"needs libtpu: install the `tpu` extra"):
    aot.check_fit(config, "v5p-8")


def _eval_config(**fields):
  config = configuration.load("configs/eval/cmb.py")
  config.update(max_new_tokens=16, **fields)
  return config


def test_eval_generate_program_compiles_for_a_slice():
  from csft_jax import evaluate

  config = _eval_config(batch_size=12, batching="static")  # rounded up to 16 rows: two per device of v5e-8
  model_config = evaluate.model_config_for_compile(config, "tiny")
  report = aot.check_generate_fit(config, "v5e-8", model_config)
  prompt_len = model_config.max_position_embeddings - 16  # max_prompt_len=0: the longest prompt it pads to
  assert report.program == f"generate 16 rows x {prompt_len} prompt tokens + 16 new, float32"
  assert report.devices == 8 and report.mesh == {"data": 8, "fsdp": 1, "tensor": 1} and report.fits
  # Weights replicated over data; the cache holds keys and values of 2 rows per device, in float32.
  params = sum(
    np.prod(leaf.shape) * 4
    for leaf in jax.tree.leaves(nnx.state(nnx.eval_shape(lambda: Decoder(model_config, rngs=nnx.Rngs(0)))))
  )
  cache = 2 * model_config.num_layers * 2 * (prompt_len + 16) * model_config.num_kv_heads * model_config.head_dim * 4
  assert report.params_gib == pytest.approx(params / aot.GIB)
  assert report.kv_cache_gib == pytest.approx(cache / aot.GIB)
  assert report.kv_cache_gib < report.temp_gib and report.params_gib + report.temp_gib <= report.total_gib < 0.5
  fields = report.as_json()
  assert {"slice", "devices", "params_gib", "temp_gib", "total_gib", "hbm_per_device_gib", "fits"} <= set(fields)
  assert "opt_state_gib" not in fields


def test_eval_compile_for_continuous_batching_compiles_the_slots_prefill():
  """With continuous batching the largest program is the prefill of every slot into the slots' cache,
  which holds the longest prompt, max_new_tokens and room for the calls between moves."""
  from csft_jax import evaluate

  config = _eval_config(batch_size=16, max_prompt_len=256, batching="continuous")
  model_config = evaluate.model_config_for_compile(config, "tiny")
  report = aot.check_generate_fit(config, "v5e-8", model_config)
  length = 256 + 16 + 64
  assert (
    report.program == f"continuous batching: 16 slots, a {length}-token cache each; prefill of 16 x 256 prompt "
    "tokens, float32"
  )
  cache = 2 * model_config.num_layers * 2 * length * model_config.num_kv_heads * model_config.head_dim * 4
  assert report.kv_cache_gib == pytest.approx(cache / aot.GIB) and report.fits


@pytest.mark.parametrize(
  "eval_config,expected",
  [
    ("configs/eval/cmb.py", dict(min_new_tokens=1, repetition_penalty=1.0)),
    ("configs/eval/cmb_clin.py", dict(min_new_tokens=1, repetition_penalty=1.1)),
  ],
)
def test_eval_compile_for_compiles_the_benchmarks_own_sampling(monkeypatch, eval_config, expected):
  """CMB generates at least one token (min_new_tokens=1) and CMB-Clin with repetition_penalty=1.1, as the
  official configs; the compiled program is the one their runs call, with that sampling."""
  from csft_jax import evaluate

  compiled = {}

  def fake_compile(jitted, args, kwargs, mesh):
    compiled.update(jitted=jitted, kwargs=kwargs)
    return 0.0, 0.0, "", 0.0

  monkeypatch.setattr(aot, "_compile", fake_compile)
  config = configuration.load(eval_config)
  config.update(max_new_tokens=16, batch_size=8)
  aot.check_generate_fit(config, "v5e-8", evaluate.model_config_for_compile(config, "tiny"))
  sampling = compiled["kwargs"]["sampling"]
  assert (sampling.min_new_tokens, sampling.repetition_penalty) == (
    expected["min_new_tokens"],
    expected["repetition_penalty"],
  )


def test_eval_compile_for_exits_1_when_it_does_not_fit(capsys):
  from csft_jax import evaluate

  # 8,192 rows of 496 prompt tokens per 16 GiB chip: the prefill's attention scores alone are 31 GiB.
  with pytest.raises(SystemExit) as exit_status:
    evaluate.compile_for(_eval_config(batch_size=65536), "v5e-8", "tiny")
  out = capsys.readouterr().out
  report = json.loads(out.strip().splitlines()[-1])
  assert exit_status.value.code == 1 and report["fits"] is False and report["total_gib"] > 16, out[-2000:]
  assert report["slice"] == "v5e-8" and report["devices"] == 8
  assert "does NOT fit" in out and "config.batch_size (now 65536)" in out
  with pytest.raises(ValueError, match=r"needs the model's shape: pass --config.checkpoint=DIR or --compile_model"):
    evaluate.compile_for(_eval_config(), "v5e-8", None)


def test_the_compiled_batch_is_the_batch_the_pipeline_feeds():
  """Keys, shape and dtype of every feature: the program compiled for a slice is the program that runs."""
  from csft_jax.data.pipeline import DataPipeline

  config = configuration.load("configs/demo.py", {"train.global_batch_size": 4})
  fed = next(iter(DataPipeline(config.data).train_dataset(config.train.global_batch_size)))
  compiled = aot.abstract_batch(config, None)
  assert {k: (v.shape, np.dtype(v.dtype)) for k, v in compiled.items()} == {
    k: (v.shape, v.dtype) for k, v in fed.items()
  }
