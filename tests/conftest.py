"""Test-wide settings: CPU only, 8 virtual devices for sharding tests, quiet HF; shared fixtures."""

import os

# Must be set before JAX initialises its backends (i.e. before any test module imports jax).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import glob  # noqa: E402  (after the environment above)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory) -> str:
  """A demo-shaped model (2 layers) as an HF directory with the demo tokenizer, in 4+ shards."""
  from flax import nnx

  from csft_jax import configuration
  from csft_jax.convert import save_hf
  from csft_jax.data.config import DEMO_TOKENIZER
  from csft_jax.models import Decoder, model_config_from

  config = configuration.load(
    "configs/demo.py", {"model.hidden_size": 64, "model.intermediate_size": 128, "model.num_layers": 2}
  )
  tokenizer_dir = configuration.resolve_path(DEMO_TOKENIZER)
  model = Decoder(model_config_from(config.model, 3000), rngs=nnx.Rngs(7))
  path = str(tmp_path_factory.mktemp("pretrained") / "hf")
  save_hf(model, path, max_shard_bytes=200_000, tokenizer_dir=tokenizer_dir)
  assert len(glob.glob(os.path.join(path, "model-*.safetensors"))) >= 4
  return path
