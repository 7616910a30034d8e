r"""Imports an HF checkpoint into an Orbax checkpoint the trainer can start from.

  python tools/convert_from_hf.py --hf_dir=/models/internlm2_5-7b --out=checkpoints/internlm2_5-7b

Writes `<out>/0/` (params + model_config) and copies the tokenizer files to `<out>/tokenizer/`.
Start training from it with `--config.init.from_checkpoint=<out>`.
"""

import os
import shutil
import sys
import time

from absl import app, flags

from csft_jax import checkpointing
from csft_jax.convert import load_hf
from csft_jax.convert.hf import TOKENIZER_FILES

flags.DEFINE_string("hf_dir", None, "HF model directory (config.json + safetensors).", required=True)
flags.DEFINE_string("out", None, "Output checkpoint directory.", required=True)
flags.DEFINE_string("dtype", "float32", "Parameter dtype to store (float32 for training master weights).")


def main(argv: list[str]) -> None:
  del argv
  start = time.time()
  model = load_hf(flags.FLAGS.hf_dir, flags.FLAGS.dtype)
  step_dir = checkpointing.save_model(flags.FLAGS.out, model)
  tokenizer_dir = os.path.join(flags.FLAGS.out, "tokenizer")
  copied = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(flags.FLAGS.hf_dir, n))]
  if copied:
    os.makedirs(tokenizer_dir, exist_ok=True)
    for name in copied:
      shutil.copy2(os.path.join(flags.FLAGS.hf_dir, name), os.path.join(tokenizer_dir, name))
  config = model.config
  print(f"{config.arch}: {config.num_params() / 1e6:.1f}M parameters -> {step_dir} "
        f"({time.time() - start:.1f}s); tokenizer files: {copied or 'none'}", file=sys.stderr)


if __name__ == "__main__":
  app.run(main)
