"""CMB-Exam evaluation (official prompts and answer extraction), on the shipped sample by default.

  python -m csft_jax.evaluate --config=configs/eval/cmb.py --config.checkpoint=W
  python -m csft_jax.evaluate --config=configs/eval/cmb.py --config.checkpoint=W \\
      --config.exam=/data/CMB/CMB-Exam/CMB-test/CMB-test-choice-question-merge.json \\
      --config.val=/data/CMB/CMB-Exam/CMB-val/CMB-val-merge.json \\
      --config.answer_key=../shared/data/cmb/CMB-test-choice-answer.json

Modes: 'answer' (answer-only prompt), 'cot' (chain-of-thought prompt), 'loglik' (fast
non-official proxy: log-likelihood of each option letter). Both generation modes decode greedily
with 1 to 512 new tokens, as every model in the official configs/model_config.yaml; a batch
stops decoding once each of its replies has its stop token, so short answers never run 512 steps. Majority vote:
set num_samples > 1 with a temperature. Results: <workdir>/eval/cmb-<mode>/results.json.
"""

import ml_collections

from csft_jax.eval.runner import default_eval_config

SAMPLE = "pkg://csft_jax/assets/eval/cmb_sample"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the CMB-Exam eval config; `arg` may name the mode (answer | cot | loglik)."""
  config = default_eval_config("cmb")
  config.exam = f"{SAMPLE}/test.json"
  config.val = f"{SAMPLE}/val.json"  # Few-shot demos (same exam_type and exam_class).
  config.answer_key = f"{SAMPLE}/answer_key.json"  # '' to only write the submission.
  config.mode = arg or "answer"
  config.shots = 0
  config.num_samples = 1
  config.temperature = 0.0  # 0 = greedy.
  config.top_p = 1.0
  config.max_new_tokens = 512
  config.min_new_tokens = 1  # As the official configs: the first new token is never a stop token.
  return config
