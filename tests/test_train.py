"""Training: sharding and accumulation leave the loss unchanged; resume is exact; bad runs stop cleanly."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from csft_jax import checkpointing, train
from csft_jax.models import model_config_from
from csft_jax.sharding import make_mesh
from csft_jax.training import programs
from tests.train_fixtures import losses, sigterm_at, small_config


def _run(tmp_path, name, config, mesh_shape=(1, 1, 1), after_step=None):
  devices = jax.devices()[: int(np.prod(mesh_shape))]
  workdir = str(tmp_path / name)
  summary = train.run(config, workdir, mesh=make_mesh(*mesh_shape, devices=devices), after_step=after_step)
  return workdir, summary


@pytest.fixture(scope="module")
def single_device_losses(tmp_path_factory):
  workdir, summary = _run(tmp_path_factory.mktemp("single"), "run", small_config())
  assert summary["status"] == "finished"
  return losses(workdir)


@pytest.mark.parametrize(
  "mesh_shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)], ids=["data8", "data2_fsdp4", "data2_fsdp2_tp2"]
)
def test_first_losses_match_single_device_on_meshes(tmp_path, single_device_losses, mesh_shape):
  workdir, _ = _run(tmp_path, "run", small_config(), mesh_shape)
  sharded = losses(workdir)
  assert sorted(sharded) == [1, 2, 3]
  for step in (1, 2, 3):
    assert abs(sharded[step] - single_device_losses[step]) < 1e-5, (step, sharded[step], single_device_losses[step])


def test_grad_accumulation_equals_full_batch(tmp_path, single_device_losses):
  workdir, _ = _run(tmp_path, "accum", small_config(grad_accum_steps=4))
  accumulated = losses(workdir)
  for step in (1, 2, 3):
    assert abs(accumulated[step] - single_device_losses[step]) < 1e-5


def _params(workdir):
  model = checkpointing.restore_model(workdir)
  return {
    "/".join(map(str, p)): np.asarray(v[...])
    for p, v in __import__("flax").nnx.to_flat_state(__import__("flax").nnx.state(model))
  }


def test_sigterm_then_resume_is_bitwise_identical_to_straight_run(tmp_path):
  straight, summary = _run(tmp_path, "straight", small_config(num_steps=30))
  assert summary["status"] == "finished"
  resumed, summary = _run(tmp_path, "resumed", small_config(num_steps=30), after_step=sigterm_at(15))
  assert summary["status"] == "interrupted" and summary["step"] == 15
  assert checkpointing.resolve_step_dir(resumed).endswith("/15")
  _, summary = _run(tmp_path, "resumed", small_config(num_steps=30))
  assert summary["status"] == "finished" and summary["step"] == 30
  a, b = losses(straight), losses(resumed)
  assert [a[s] for s in range(16, 31)] == [b[s] for s in range(16, 31)]  # exact, not approximately
  pa, pb = _params(straight), _params(resumed)
  assert sorted(pa) == sorted(pb)
  for key in pa:
    assert pa[key].tobytes() == pb[key].tobytes(), key


def test_resume_onto_a_different_mesh(tmp_path):
  straight, _ = _run(tmp_path, "straight", small_config(num_steps=6), (8, 1, 1))
  moved, summary = _run(tmp_path, "moved", small_config(num_steps=6), (8, 1, 1), after_step=sigterm_at(3))
  assert summary["step"] == 3
  _, summary = _run(tmp_path, "moved", small_config(num_steps=6), (2, 2, 2))
  assert summary["status"] == "finished"
  a, b = losses(straight), losses(moved)
  for step in (4, 5, 6):
    assert abs(a[step] - b[step]) < 1e-5


def test_divergence_stops_and_keeps_last_good_checkpoint(tmp_path):
  config = small_config(num_steps=6)
  config.optim.update(lr=1e12, grad_clip_norm=0.0, warmup_fraction=0.0)
  config.checkpoint.every_steps = 1
  config.train.log_every = 1
  workdir, summary = _run(tmp_path, "nan", config)
  assert summary["status"] == "diverged"
  saved = checkpointing.resolve_step_dir(workdir)
  assert int(os.path.basename(saved)) < summary["step"]
  recorded = losses(workdir)
  assert all(np.isfinite(recorded[s]) for s in recorded if s <= int(os.path.basename(saved)))
  with open(os.path.join(workdir, "run_summary.json")) as f:
    assert json.load(f)["status"] == "diverged"


def test_7b_plan_is_computed_without_allocating():
  from configs import collectivesft_internlm2_5_7b as recipe

  config = recipe.get_config("v6e-8")
  text = train.plan(config)
  params_line = next(line for line in text.splitlines() if line.startswith("params"))
  total_gib, per_device_gib = map(float, params_line.split()[1:3])
  expected = config_params_bytes(config) / 2**30
  assert abs(total_gib - expected) < 0.01
  assert per_device_gib < total_gib / 7  # FSDP over 8 devices (a few small tensors stay replicated)


def config_params_bytes(config) -> int:
  return model_config_from(config.model, 0).num_params() * 4


def test_num_epochs_sets_the_run_length_from_the_mixture():
  from csft_jax.data.pipeline import DataPipeline

  config = small_config(num_steps=0, num_epochs=2.0)
  pipeline = DataPipeline(config.data)
  per_epoch = pipeline.estimate_steps_per_epoch(config.train.global_batch_size)
  assert per_epoch > 1
  assert train.resolve_num_steps(config.train, pipeline) == 2 * per_epoch


def test_signal_on_a_checkpoint_step_saves_once_and_rerunning_a_finished_run_keeps_its_loss(tmp_path):
  config = small_config(num_steps=4)
  config.checkpoint.every_steps = 2
  workdir, summary = _run(tmp_path, "run", config, after_step=sigterm_at(2))
  assert summary["status"] == "interrupted" and summary["step"] == 2
  _, summary = _run(tmp_path, "run", small_config(num_steps=4))
  assert summary["status"] == "finished" and np.isfinite(summary["final_loss"])
  _, again = _run(tmp_path, "run", small_config(num_steps=4))
  assert again["step"] == 4 and again["final_loss"] == summary["final_loss"]


def test_optimizer_state_offloaded_to_host_memory_trains_identically(tmp_path):
  """optim.offload=host: the AdamW moments live in pinned_host memory between steps; the losses are
  bitwise those of the on-device run, on one device and on a 2x2x2 mesh, also across SIGTERM and resume."""
  from csft_jax.training.optimizer import make_optimizer

  for mesh_shape in ((1, 1, 1), (2, 2, 2)):
    config = small_config(num_steps=5)
    on_device, _ = _run(tmp_path, f"device{mesh_shape}", config, mesh_shape)
    config.optim.offload = "host"
    host, interrupted = _run(tmp_path, f"host{mesh_shape}", config, mesh_shape, after_step=sigterm_at(3))
    assert interrupted["status"] == "interrupted"
    _, finished = _run(tmp_path, f"host{mesh_shape}", config, mesh_shape)
    assert finished["status"] == "finished"
    assert losses(host) == losses(on_device) and len(losses(host)) == 5

  optimizer, _ = make_optimizer(config.optim, 5)
  start = programs.random_init(
    model_config_from(config.model, 3000), optimizer, 0, make_mesh(1, 1, 1, devices=jax.devices()[:1]), "pinned_host"
  )
  assert {leaf.sharding.memory_kind for leaf in jax.tree.leaves(start.state.opt_state)} == {"pinned_host"}
  assert {leaf.sharding.memory_kind for leaf in jax.tree.leaves(start.state.params)} == {"device"}


def test_moments_in_bfloat16_halve_the_optimizer_state_and_train_alike(tmp_path):
  from csft_jax.training.optimizer import make_optimizer

  config = small_config(num_steps=4)
  full, _ = _run(tmp_path, "f32", config)
  config.optim.moments_dtype = "bfloat16"
  half, summary = _run(tmp_path, "bf16", config)
  assert summary["status"] == "finished"
  assert losses(half)[1] == losses(full)[1]  # the first update's forward is the same
  for step, loss in losses(full).items():
    assert losses(half)[step] == pytest.approx(loss, rel=1e-3)
  optimizer, _ = make_optimizer(config.optim, 4)
  start = programs.random_init(
    model_config_from(config.model, 3000), optimizer, 0, make_mesh(1, 1, 1, devices=jax.devices()[:1])
  )
  floats = {
    leaf.dtype.name
    for leaf in jax.tree.leaves(start.state.opt_state)
    if jax.numpy.issubdtype(leaf.dtype, jax.numpy.floating)
  }
  assert floats == {"bfloat16"}
  with pytest.raises(ValueError, match="config.optim.moments_dtype='float16'; choose one of"):
    make_optimizer(ml_collections.ConfigDict({**config.optim.to_dict(), "moments_dtype": "float16"}), 4)


def test_offload_on_a_backend_without_host_memory_is_one_clear_error():
  from csft_jax.training import optimizer

  class DeviceMemory:
    kind = "device"

  class DeviceWithoutHostMemory:
    platform, id = "gpu", 0

    def addressable_memories(self):
      return [DeviceMemory()]

  with pytest.raises(
    ValueError,
    match=r"config.optim.offload='host' needs 'pinned_host' memory, which gpu device 0 "
    r"lacks \(it has \['device'\]\); set config.optim.offload=none",
  ):
    optimizer.check_host_memory(DeviceWithoutHostMemory())
  optimizer.check_host_memory(jax.devices()[0])  # the CPU backend has it
  with pytest.raises(ValueError, match="config.optim.offload='disk'; choose one of"):
    optimizer.opt_state_memory(ml_collections.ConfigDict({"offload": "disk"}))
