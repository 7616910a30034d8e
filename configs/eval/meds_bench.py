"""MedS-Bench evaluation (official 3-shot prompt, greedy, 200 new tokens) on the shipped sample.

  python -m csft_jax.evaluate --config=configs/eval/meds_bench.py --config.checkpoint=W \\
      [--config.task_dir=/data/MedS-Bench/tasks]

Writes <workdir>/eval/meds_bench/results.csv (task_id,input,GT,output), then results.json with
metrics per task (`tasks`), per official metric script (`official`) and per family (`categories`).
"""

import ml_collections

from csft_jax.eval import meds_bench
from csft_jax.eval.runner import default_eval_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the MedS-Bench eval config."""
  del arg
  config = default_eval_config("meds_bench")
  config.task_dir = "pkg://csft_jax/assets/eval/meds_sample"  # Folder of task*.json files.
  config.shots = meds_bench.NUM_SHOTS
  config.max_new_tokens = meds_bench.MAX_NEW_TOKENS
  # eval.py: prompts of more than 2048 tokens lose their end (the tokenizer's default side);
  # 'left' keeps the end instead. The engine still cuts the start of what exceeds the model's
  # context minus max_new_tokens.
  config.model_max_length = meds_bench.MODEL_MAX_LENGTH
  config.truncation_side = "right"
  # eval.py tokenizes with add_special_tokens=True: Llama-3 prompts, whose text begins with
  # <|begin_of_text|>, get a second BOS. False: one BOS, as the chat template renders it.
  config.llama3_double_bos = True
  return config
