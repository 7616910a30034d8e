"""CMB-Clin evaluation: multi-turn case questions with gold history, on the shipped sample.

  python -m csft_jax.evaluate --config=configs/eval/cmb_clin.py --config.checkpoint=W

Writes <workdir>/eval/cmb_clin/results.json: per question the answer, the ready-to-send official
judge prompt and local ROUGE-L / BLEU-1 proxies (the official score is the LLM judge).
"""

import ml_collections

from csft_jax.eval.runner import default_eval_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the CMB-Clin eval config."""
  del arg
  config = default_eval_config("cmb_clin")
  config.clin = "pkg://csft_jax/assets/eval/cmb_sample/clin.json"
  config.max_new_tokens = 256
  return config
