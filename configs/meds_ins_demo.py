"""The MedS-Ins demo: the tiny demo model fine-tuned on the project's own MedS-Ins task files (CPU, a minute).

  python -m csft_jax.data.inspect --config=configs/meds_ins_demo.py --num_batches=4
  python -m csft_jax.train --config=configs/meds_ins_demo.py --workdir=workdirs/meds_ins_demo

The three task files in csft_jax/assets/meds_ins (a Chinese triage task, Split Type Train; an
English medication Q&A task, one JSON line, Train/Test; an English abbreviation task, Test) are read
as the recipe configs/meds_ins_llama3_8b.py reads MedS-Ins: the Train and Train/Test tasks, half of
the instances as 3-shot prompts, half with a definition drawn from the task's own `Definition` list
(these tasks are not in a RewriteDefinitions.json). Same model and optimizer as configs/demo.py.
"""

import ml_collections

from configs import base, demo
from csft_jax.data import meds_ins
from csft_jax.data.config import DEMO_TOKENIZER

TASK_FILES = "pkg://csft_jax/assets/meds_ins"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the MedS-Ins demo config (no argument)."""
  del arg
  config = base.get_config()
  config.model.update(**demo.DEMO_MODEL, max_position_embeddings=1024)
  data = config.data
  data.sources = ml_collections.ConfigDict(
    dict(
      meds_ins=meds_ins.source_config(
        TASK_FILES, split_types=("Train", "Train/Test"), rewrite_prob=0.5, few_shot_prob=0.5, seed=data.get_ref("seed")
      )
    )
  )
  data.mixing = "proportional"
  data.tokenizer = DEMO_TOKENIZER
  data.seq_len = 1024  # 3-shot prompts: ~300 demo-tokenizer tokens (Chinese task), ~820 (English).
  data.val_fraction = 0.1
  config.optim.update(lr=1e-3, b2=0.95, weight_decay=0.01, min_lr_ratio=0.1)
  config.train.update(num_steps=60, global_batch_size=8, log_every=10, eval_every=30)
  config.checkpoint.update(every_steps=30, keep=2)
  return config
