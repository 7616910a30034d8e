"""LoRA: the adapters equal PEFT's on the transformers models, and a LoRA run walks the README's path.

The reference is `peft` itself: adapters with random, non-zero B loaded by `peft.PeftModel` on the
transformers model give the logits ours give, in both directions (PEFT -> us, us -> PEFT).
"""

import copy
import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx

from csft_jax import checkpointing, train
from csft_jax.convert import load_hf
from csft_jax.data import packing
from csft_jax.loading import with_adapter
from csft_jax.models import Decoder, lora, model_config_from
from csft_jax.sharding import make_mesh
from csft_jax.training import programs
from csft_jax.training.optimizer import make_optimizer
from tests import REPO_ROOT
from tests.hf_models import TINY, make_hf_model, padded_batch, save_as_internlm2
from tests.test_faults import SMALL
from tests.train_fixtures import losses, small_config

LLAMA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _randomize_b(model: torch.nn.Module, seed: int = 1) -> None:
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_B" in name:
        p.copy_(0.1 * torch.randn_like(p))


def _logits(model, ids, mask) -> np.ndarray:
  if isinstance(model, torch.nn.Module):
    with torch.no_grad():
      return model(input_ids=ids, attention_mask=mask).logits.numpy()
  return np.asarray(model(jnp.asarray(ids.numpy()), segment_ids=jnp.asarray(mask.numpy())))


@pytest.mark.parametrize(
  "arch,scan_layers", [("llama", True), ("llama", False), ("qwen2", False), ("qwen3", True), ("mistral", False)]
)
def test_adapters_equal_peft_both_ways(arch, scan_layers, tmp_path):
  base_dir, peft_dir, ours_dir = (str(tmp_path / n) for n in ("base", "peft", "ours"))
  make_hf_model(arch).save_pretrained(base_dir)
  reference = peft.get_peft_model(
    make_hf_model(arch), peft.LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_MODULES, use_rslora=arch == "qwen3")
  )
  _randomize_b(reference)
  reference.eval().save_pretrained(peft_dir)
  ids, mask = padded_batch(101, [7, 5])
  real = mask.numpy().astype(bool)
  expected = _logits(reference, ids, mask)

  base = load_hf(base_dir, dtype="float32", scan_layers=scan_layers)
  np.testing.assert_raises(
    AssertionError, np.testing.assert_allclose, _logits(base, ids, mask)[real], expected[real], atol=1e-4
  )  # the adapters change the output
  ours = with_adapter(base, peft_dir)
  assert ours.config.lora_rank == 4 and ours.config.lora_rslora == (arch == "qwen3")
  np.testing.assert_allclose(_logits(ours, ids, mask)[real], expected[real], atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(_logits(lora.merged(ours), ids, mask)[real], expected[real], atol=1e-4, rtol=1e-4)

  lora.save_peft(ours, ours_dir)
  again = peft.PeftModel.from_pretrained(make_hf_model(arch), ours_dir).eval()
  np.testing.assert_array_equal(_logits(again, ids, mask), expected)


def test_internlm2_adapters_by_its_own_module_names(tmp_path):
  """InternLM2 (remote code, not in transformers): a PEFT Llama whose q/k/v adapters share one A is
  the reference; the same adapters under InternLM2's names (`wqkv` with wqkv's interleaved rows, `wo`,
  `w1`, `w3`, `w2`) on the repacked checkpoint give its logits, and export back to the same tensors."""
  torch.manual_seed(3)
  config = transformers.LlamaConfig(**TINY, rope_theta=1_000_000.0, rms_norm_eps=1e-5)
  llama = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
  reference = peft.get_peft_model(
    copy.deepcopy(llama), peft.LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_MODULES)
  )
  _randomize_b(reference)
  with torch.no_grad():
    for layer in reference.base_model.model.model.layers:
      a = layer.self_attn.q_proj.lora_A["default"].weight
      layer.self_attn.k_proj.lora_A["default"].weight.copy_(a)
      layer.self_attn.v_proj.lora_A["default"].weight.copy_(a)
  ids, mask = padded_batch(101, [7, 5])
  expected = _logits(reference.eval(), ids, mask)

  base_dir, adapter_dir = tmp_path / "internlm2", tmp_path / "adapter"
  base_dir.mkdir()
  adapter_dir.mkdir()
  save_as_internlm2(llama, base_dir)
  # The adapters under InternLM2's names: q/k/v's B rows interleaved per KV group like wqkv's.
  heads, kv = config.num_attention_heads, config.num_key_value_heads
  head_dim = config.hidden_size // heads
  group = heads // kv
  names = {
    "o_proj": "attention.wo",
    "gate_proj": "feed_forward.w1",
    "up_proj": "feed_forward.w3",
    "down_proj": "feed_forward.w2",
  }
  adapters = {}
  state = {k.replace(".default", ""): v.detach().numpy() for k, v in reference.state_dict().items() if "lora_" in k}
  for i in range(config.num_hidden_layers):
    p = f"base_model.model.model.layers.{i}."
    b = [state[f"{p}self_attn.{n}.lora_B.weight"].reshape(-1, head_dim, 4) for n in ("q_proj", "k_proj", "v_proj")]
    wqkv_b = np.concatenate([b[0].reshape(kv, group, head_dim, 4), b[1][:, None], b[2][:, None]], axis=1)
    adapters[f"{p}attention.wqkv.lora_A.weight"] = state[f"{p}self_attn.q_proj.lora_A.weight"]
    adapters[f"{p}attention.wqkv.lora_B.weight"] = wqkv_b.reshape(-1, 4)
    for ours, theirs in names.items():
      part = "self_attn" if ours == "o_proj" else "mlp"
      for ab in ("A", "B"):
        adapters[f"{p}{theirs}.lora_{ab}.weight"] = state[f"{p}{part}.{ours}.lora_{ab}.weight"]
  safetensors.numpy.save_file(adapters, str(adapter_dir / lora.ADAPTER_WEIGHTS))
  (adapter_dir / lora.ADAPTER_CONFIG).write_text(
    json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["wqkv", "wo", "w1", "w2", "w3"]})
  )

  for scan_layers in (True, False):
    ours = with_adapter(load_hf(str(base_dir), dtype="float32", scan_layers=scan_layers), str(adapter_dir))
    assert ours.config.arch == "internlm2"
    real = mask.numpy().astype(bool)
    np.testing.assert_allclose(_logits(ours, ids, mask)[real], expected[real], atol=1e-4, rtol=1e-4)
    exported = lora.peft_tensors(ours)
    assert sorted(exported) == sorted(adapters)
    for name, value in adapters.items():
      np.testing.assert_array_equal(exported[name], value)


def test_targets_name_the_family_modules_or_a_regex():
  assert lora.resolve_targets("llama", "") == tuple(f"attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj")) + (
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
  )
  assert lora.resolve_targets("qwen2", "q_proj, v_proj") == ("attn.q_proj", "attn.v_proj")
  assert lora.resolve_targets("llama", ".*_proj") == lora.resolve_targets("llama", "")
  assert lora.resolve_targets("internlm2", "wqkv,w2") == ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.down_proj")
  assert lora.resolve_targets("internlm2", r"model\.layers\.\d+\.attention\..*") == (
    "attn.q_proj",
    "attn.k_proj",
    "attn.v_proj",
    "attn.o_proj",
  )
  with pytest.raises(ValueError, match=r"unknown module\(s\) \['q_proj'\]; internlm2 layers have \['wqkv', 'wo'"):
    lora.resolve_targets("internlm2", "q_proj")
  with pytest.raises(ValueError, match="matches no module"):
    lora.resolve_targets("llama", "lm_.*")


def _random_batch(seed: int, rows: int = 8, length: int = 32) -> dict[str, np.ndarray]:
  """A packed-row batch of random tokens (one segment a row, every target a loss token)."""
  rng = np.random.default_rng(seed)
  batch = {k: np.ones((rows, length), np.int32) for k in packing.ROW_KEYS}
  batch.update(
    input_ids=rng.integers(0, 3000, (rows, length), dtype=np.int32),
    target_ids=rng.integers(0, 3000, (rows, length), dtype=np.int32),
    positions=np.tile(np.arange(length, dtype=np.int32), (rows, 1)),
    source_ids=np.zeros((rows, length), np.int32),
  )
  return batch


def _train_steps(config, model_config, *, steps: int, seed: int):
  """`steps` train steps from a random init on one device: (adapters before {path: array}, frozen base
  before (host copies), the state after, the last metrics)."""
  mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
  optimizer, schedule = make_optimizer(config.optim, steps)
  start = programs.random_init(model_config, optimizer, 0, mesh)
  adapters = {tuple(str(k) for k in p): np.asarray(v[...]) for p, v in nnx.to_flat_state(start.state.params)}
  frozen = jax.tree.map(np.asarray, start.state.frozen)
  train_step, _, _ = programs.jit_steps(config, start, optimizer, schedule, mesh, num_sources=1)
  state, batch = start.state, _random_batch(seed)
  for _ in range(steps):
    state, metrics = train_step(state, batch)
  return adapters, frozen, state, metrics


def test_step_zero_is_the_base_model_and_training_changes_only_the_adapters(tmp_path):
  config = small_config(num_steps=3)
  config.model.dtype = "float32"
  config.lora.update(rank=4, alpha=8.0)
  config.optim.lr = 1e-2
  model_config = programs.with_lora(model_config_from(config.model, 3000), config)
  adapted = Decoder(model_config, rngs=nnx.Rngs(0))
  assert {tuple(p)[-1] for p, _ in nnx.to_flat_state(nnx.state(adapted, nnx.LoRAParam))} == {"lora_a", "lora_b"}
  # The same weights without adapters (B = 0 adds exactly nothing), as a model of the base config.
  base = lora.merged(adapted)
  assert not base.config.lora_rank
  base_params = {tuple(p): v[...] for p, v in nnx.to_flat_state(nnx.state(base, nnx.Param))}
  for path, value in nnx.to_flat_state(lora.split(nnx.state(adapted, nnx.Param))[1]):
    np.testing.assert_array_equal(np.asarray(value[...]), np.asarray(base_params[tuple(path)]))
  ids = jnp.arange(24, dtype=jnp.int32).reshape(2, 12)
  np.testing.assert_array_equal(np.asarray(adapted(ids)), np.asarray(base(ids)))  # B = 0 at init

  # The train step: gradients and updates reach the adapters only; the frozen base passes through.
  adapters_before, frozen_before, state, _ = _train_steps(config, model_config, steps=3, seed=0)
  for before, after in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(state.frozen)):
    np.testing.assert_array_equal(before, np.asarray(after))
  changed = [
    not np.array_equal(adapters_before[tuple(str(k) for k in p)], np.asarray(a[...]))
    for p, a in nnx.to_flat_state(state.params)
  ]
  assert all(changed) and len(changed) == 2 * 7 * (1 if model_config.scan_layers else model_config.num_layers)


def test_internlm2_trains_its_shared_wqkv_adapter():
  """InternLM2's fused wqkv adapter (one A for q, k and v) takes gradients through all three B's."""
  config = small_config(num_steps=2)
  config.model.update(preset="tiny_internlm2", scan_layers=True)
  config.lora.update(rank=4, targets="wqkv,w2")
  config.optim.lr = 1e-2
  model_config = programs.with_lora(model_config_from(config.model, 3000), config)
  before, frozen, state, metrics = _train_steps(config, model_config, steps=2, seed=1)
  assert {p[-2:] for p in before} == {
    ("attn", "shared_qkv_a"),
    ("q_proj", "lora_b"),
    ("k_proj", "lora_b"),
    ("v_proj", "lora_b"),
    ("down_proj", "lora_a"),
    ("down_proj", "lora_b"),
  }
  assert np.isfinite(float(metrics["loss"]))
  for path, value in nnx.to_flat_state(state.params):
    assert not np.array_equal(before[tuple(str(k) for k in path)], np.asarray(value[...])), path
  for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(state.frozen)):
    np.testing.assert_array_equal(a, np.asarray(b))


def test_a_lora_run_keeps_its_base_once_and_steps_hold_the_adapters(pretrained, tmp_path):
  config = small_config(num_steps=2)
  config.model.dtype = "float32"
  config.lora.update(rank=4, alpha=8.0)
  config.init.from_hf = pretrained
  config.checkpoint.every_steps = 1
  workdir = str(tmp_path / "run")
  assert train.run(config, workdir, mesh=make_mesh(1, 1, 1, devices=jax.devices()[:1]))["status"] == "finished"
  stored_base = checkpointing.restore_model(os.path.join(workdir, "base"))
  hf = load_hf(pretrained, scan_layers=config.model.scan_layers)
  hf_params = {tuple(p): v[...] for p, v in nnx.to_flat_state(nnx.state(hf, nnx.Param))}
  base_params = {tuple(p): v[...] for p, v in nnx.to_flat_state(nnx.state(stored_base, nnx.Param))}
  assert hf_params.keys() == base_params.keys()
  for path, value in hf_params.items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(base_params[path]), err_msg=str(path))
  for step in (1, 2):
    stored = checkpointing._stored_param_paths(os.path.join(workdir, "checkpoints", str(step)))
    assert {p[-1] for p in stored} == {"lora_a", "lora_b"}  # a step holds the adapters only


@pytest.mark.parametrize(
  "dropout,scan_layers,remat,attention", [(0.1, True, "full", "blockwise")], ids=["scanned-remat-blockwise-dropout"]
)
def test_lora_losses_on_a_2x2x2_mesh_equal_one_device(tmp_path, dropout, scan_layers, remat, attention):
  config = small_config(num_steps=2, grad_accum_steps=2)
  config.model.update(
    scan_layers=scan_layers, remat_policy=remat, attention_impl=attention, attention_block_q=64, attention_block_kv=64
  )
  config.lora.update(rank=4, alpha=8.0, dropout=dropout, targets="q_proj,v_proj,down_proj")
  config.optim.lr = 1e-2
  results = []
  for mesh_shape in ((1, 1, 1), (2, 2, 2)):
    workdir = str(tmp_path / f"mesh{mesh_shape}")
    devices = jax.devices()[: int(np.prod(mesh_shape))]
    assert train.run(config, workdir, mesh=make_mesh(*mesh_shape, devices=devices))["status"] == "finished"
    results.append(losses(workdir))
  assert len(results[0]) == 2
  for step, loss in results[0].items():
    assert results[1][step] == pytest.approx(loss, rel=2e-5)


# ---- The README's path, through the command lines: train (SIGTERM, resume without the HF directory),
# export as PEFT and merged, load in peft and transformers, evaluate base + adapter.

LORA = [
  "--config.model.dtype=float32",
  "--config.lora.rank=4",
  "--config.lora.alpha=8",
  "--config.lora.dropout=0.1",
  "--config.optim.lr=1e-2",
  "--config.checkpoint.every_steps=2",
  "--config.checkpoint.async_save=False",
  "--config.train.num_steps=4",
  "--config.train.export_peft=peft",
  "--config.train.export_hf=merged",
]


def _python(*args: str, **kwargs) -> subprocess.CompletedProcess:
  done = subprocess.run(
    [sys.executable, *args],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=900,
    env={**os.environ, "PYTHONUNBUFFERED": "1"},
    **kwargs,
  )
  assert done.returncode == 0, (args, done.stderr[-4000:])
  return done


def _train_until_sigterm(flags: list[str]) -> str:
  process = subprocess.Popen(
    [sys.executable, "-m", "csft_jax.train", *flags],
    cwd=REPO_ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    env={**os.environ, "PYTHONUNBUFFERED": "1"},
  )
  lines = []
  for line in process.stdout:
    lines.append(line)
    if line.startswith("step 2/4"):
      process.send_signal(signal.SIGTERM)
  assert process.wait(timeout=900) == 0, "".join(lines)[-4000:]
  return "".join(lines)


@pytest.fixture(scope="module")
def lora_run(pretrained, tmp_path_factory):
  root = tmp_path_factory.mktemp("lora_cli")
  hf_dir = str(root / "pretrained")
  shutil.copytree(pretrained, hf_dir)
  whole, interrupted = str(root / "whole"), str(root / "interrupted")
  _python("-m", "csft_jax.train", *SMALL, *LORA, f"--config.init.from_hf={hf_dir}", f"--workdir={whole}")
  first = _train_until_sigterm([*SMALL, *LORA, f"--config.init.from_hf={hf_dir}", f"--workdir={interrupted}"])
  assert "SIGTERM received: saved step" in first and "LoRA rank 4 on q_proj" in first
  shutil.rmtree(hf_dir)  # resuming must not need the init source: the base is in the workdir
  second = _python("-m", "csft_jax.train", *SMALL, *LORA, f"--config.init.from_hf={hf_dir}", f"--workdir={interrupted}")
  assert "resumed from step" in second.stderr
  return whole, interrupted


def test_lora_cli_resume_without_the_hf_directory_is_bitwise(lora_run):
  whole, interrupted = lora_run
  assert losses(interrupted) == losses(whole) and len(losses(whole)) == 4
  ours = {
    tuple(p): np.asarray(v[...])
    for p, v in nnx.to_flat_state(nnx.state(checkpointing.restore_model(interrupted), nnx.LoRAParam))
  }
  reference = {
    tuple(p): np.asarray(v[...])
    for p, v in nnx.to_flat_state(nnx.state(checkpointing.restore_model(whole), nnx.LoRAParam))
  }
  assert ours.keys() == reference.keys() and ours
  for path, value in ours.items():
    np.testing.assert_array_equal(value, reference[path], err_msg=str(path))


def test_lora_cli_exports_load_in_peft_and_equal_merge_and_unload(lora_run, pretrained):
  whole, _ = lora_run
  ids = torch.tensor([[5, 17, 230, 9, 1200, 44, 7]])
  mask = torch.ones_like(ids)
  adapted = peft.PeftModel.from_pretrained(
    transformers.AutoModelForCausalLM.from_pretrained(pretrained), os.path.join(whole, "peft")
  ).eval()
  ours = checkpointing.restore_model(whole)
  np.testing.assert_allclose(_logits(adapted, ids, mask), _logits(ours, ids, mask), atol=1e-4, rtol=1e-4)

  merged_by_peft = adapted.merge_and_unload().state_dict()
  merged_by_us = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(whole, "merged")).state_dict()
  assert merged_by_peft.keys() == merged_by_us.keys()
  for name, value in merged_by_peft.items():
    np.testing.assert_allclose(merged_by_us[name].numpy(), value.numpy(), atol=1e-6, rtol=1e-6, err_msg=name)


def test_evaluate_base_plus_adapter_answers_as_the_merged_export(lora_run, pretrained, tmp_path):
  whole, _ = lora_run
  flags = ["--config=configs/eval/cmb.py", "--config.max_new_tokens=4", "--config.batch_size=8", "--config.limit=8"]
  outputs = {}
  for name, model in {
    "merged": [f"--config.checkpoint={whole}/merged"],
    "peft": [f"--config.checkpoint={pretrained}", f"--config.adapter={whole}/peft"],
    "workdir": [f"--config.checkpoint={whole}"],
  }.items():
    out = str(tmp_path / name)
    _python("-m", "csft_jax.evaluate", *flags, *model, f"--config.out_dir={out}")
    outputs[name] = {}
    for file in ("generations.json", "submission.json"):
      with open(os.path.join(out, file), encoding="utf-8") as f:
        outputs[name][file] = json.load(f)
  assert outputs["peft"] == outputs["merged"] == outputs["workdir"]
  assert len(outputs["merged"]["generations.json"]) == 8


def test_init_from_peft_continues_from_the_exported_adapters(lora_run, pretrained, tmp_path):
  """`init.from_peft`: a new run on the base starts from the PEFT export; with lr 0 its one step changes
  nothing, so its merged export is the first run's."""
  whole, _ = lora_run
  workdir = str(tmp_path / "continued")
  done = _python(
    "-m",
    "csft_jax.train",
    *SMALL,
    "--config.model.dtype=float32",
    f"--config.init.from_hf={pretrained}",
    f"--config.init.from_peft={whole}/peft",
    "--config.optim.lr=0.0",
    "--config.train.num_steps=1",
    "--config.train.export_hf=merged",
    f"--workdir={workdir}",
  )
  assert f"with the adapters of config.init.from_peft={whole}/peft" in done.stderr
  assert "LoRA rank 4 on q_proj" in done.stderr  # the rank came from adapter_config.json
  ours = safetensors.numpy.load_file(os.path.join(workdir, "merged", "model.safetensors"))
  reference = safetensors.numpy.load_file(os.path.join(whole, "merged", "model.safetensors"))
  assert ours.keys() == reference.keys()
  for name, value in reference.items():
    np.testing.assert_array_equal(ours[name], value, err_msg=name)

  refused = subprocess.run(
    [
      sys.executable,
      "-m",
      "csft_jax.train",
      *SMALL,
      f"--config.init.from_hf={pretrained}",
      f"--config.init.from_peft={whole}/peft",
      "--config.lora.rank=8",
      f"--workdir={tmp_path / 'refused'}",
    ],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert refused.returncode != 0
  assert "config.lora.rank=8 but the adapter in config.init.from_peft" in refused.stderr and "rank 4" in refused.stderr


def test_lora_rank_is_a_sweep_axis(tmp_path):
  from csft_jax import sweep as sw

  experiment_file = tmp_path / "lora_ranks.py"
  experiment_file.write_text(
    "import ml_collections\nfrom csft_jax.sweep import sweep\n\n"
    "def get_experiment():\n  exp = ml_collections.ConfigDict()\n  exp.config = 'configs/demo.py'\n"
    "  exp.evals = ('configs/eval/cmb.py',)\n  return exp\n\n"
    "def get_sweep():\n  return sweep('lora.rank', [0, 8, 16])\n"
  )
  runs = sw.plan_runs(sw.load_experiment(str(experiment_file)), str(tmp_path / "w"))
  sw.check_overrides(runs)  # lora.rank is a field of the config
  assert [r.name for r in runs] == ["rank-0", "rank-8", "rank-16"]
  assert runs[1].train[-1] == "--config.lora.rank=8"
