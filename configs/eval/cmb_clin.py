"""CMB-Clin evaluation: multi-turn case questions with gold history, on the shipped sample.

  python -m csft_jax.evaluate --config=configs/eval/cmb_clin.py --config.checkpoint=W

Generation as the official CMB workers run CMB-Clin: greedy, 1 to 512 new tokens (min_new_tokens and
max_new_tokens of `configs/model_config.yaml`), repetition_penalty 1.1 (`workers/base.py`, Hugging Face
semantics).
Writes <workdir>/eval/cmb_clin/results.json: per question the answer, the ready-to-send judge
prompt (the CMB README's) and local ROUGE-L / BLEU-1 proxies; with a judge (config.judge.model: a
local checkpoint, or config.judge.endpoint: an OpenAI-compatible API), its reply and four 1-5
ratings per answer (also in judge.jsonl, kept as they arrive) and their means.
"""

import ml_collections

from csft_jax.eval.judge import default_judge_config
from csft_jax.eval.runner import default_eval_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the CMB-Clin eval config."""
  del arg
  config = default_eval_config("cmb_clin")
  config.clin = "pkg://csft_jax/assets/eval/cmb_sample/clin.json"
  config.max_new_tokens = 512
  config.repetition_penalty = 1.1  # 1.0 turns it off.
  config.min_new_tokens = 1  # The first new token is never a stop token.
  # The judge (off until one is named): --config.judge.model=JUDGE_DIR, or
  # --config.judge.endpoint=https://api.openai.com/v1 with the key in $OPENAI_API_KEY (judge.api_key_env).
  config.judge = default_judge_config()
  return config
