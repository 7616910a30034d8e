"""CMB-Clin evaluation: multi-turn case questions with gold history, on the shipped sample.

  python -m csft_jax.evaluate --config=configs/eval/cmb_clin.py --config.checkpoint=W

Generation as the official CMB workers run CMB-Clin: greedy, 1 to 512 new tokens (min_new_tokens and
max_new_tokens of `configs/model_config.yaml`), repetition_penalty 1.1 (`workers/base.py`, Hugging Face
semantics).
Writes <workdir>/eval/cmb_clin/results.json: per question the answer, the ready-to-send judge
prompt (the CMB README's) and local ROUGE-L / BLEU-1 proxies (CMB-Clin is scored by an LLM judge).
"""

import ml_collections

from csft_jax.eval.runner import default_eval_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the CMB-Clin eval config."""
  del arg
  config = default_eval_config("cmb_clin")
  config.clin = "pkg://csft_jax/assets/eval/cmb_sample/clin.json"
  config.max_new_tokens = 512
  config.repetition_penalty = 1.1  # 1.0 turns it off.
  config.min_new_tokens = 1  # The first new token is never a stop token.
  return config
