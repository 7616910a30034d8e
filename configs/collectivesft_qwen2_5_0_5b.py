"""The CollectiveSFT recipe on Qwen2.5-0.5B: the small end of the model-size axis.

Same data, schedule and arguments as `configs/collectivesft_internlm2_5_7b.py` (see it), with
Qwen2.5-0.5B's checkpoint, tokenizer and chat template.

  python -m csft_jax.train --config=configs/collectivesft_qwen2_5_0_5b.py:mesh=v5p-8 --workdir=W \
      --config.init.from_hf=/models/Qwen2.5-0.5B --config.data.tokenizer=/models/Qwen2.5-0.5B
"""

import importlib.util
import os

import ml_collections


def _recipe_module():
  """configs/ is not a package: load the 7B recipe file by path and reuse its `recipe`."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "collectivesft_internlm2_5_7b.py")
  spec = importlib.util.spec_from_file_location("_collectivesft_recipe", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the recipe for Qwen2.5-0.5B (tied embeddings, q/k/v bias)."""
  return _recipe_module().recipe(arg, model_preset="qwen2_5_0_5b", model_dir="checkpoints/Qwen2.5-0.5B",
                                 chat_template="chatml", vocab_size=151936)
