r"""Imports an HF checkpoint into an Orbax checkpoint the trainer can start from.

  python tools/convert_from_hf.py --hf_dir=/models/internlm2_5-7b --out=checkpoints/internlm2_5-7b-orbax

Writes `<out>/0/` (params + model_config) and copies the tokenizer files to `<out>/tokenizer/`.
Start training from it with `--config.init.from_checkpoint=<out> --config.data.tokenizer=<out>/tokenizer`.
Training can also start from the HF directory itself (`--config.init.from_hf=/models/internlm2_5-7b`),
which is what the recipes do; this conversion only saves re-reading safetensors at every new run.
"""

import os
import sys
import time

from absl import flags

from csft_jax import checkpointing
from csft_jax.console import run_cli
from csft_jax.convert import load_hf
from csft_jax.convert.hf import copy_tokenizer_files

FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
  del argv
  start = time.time()
  model = load_hf(FLAGS.hf_dir, FLAGS.dtype)
  step_dir = checkpointing.save_model(FLAGS.out, model)
  copied = copy_tokenizer_files(FLAGS.hf_dir, os.path.join(FLAGS.out, "tokenizer"))
  config = model.config
  print(
    f"{config.arch}: {config.num_params() / 1e6:.1f}M parameters -> {step_dir} "
    f"({time.time() - start:.1f}s); tokenizer files: {copied or 'none'}",
    file=sys.stderr,
  )


def define_flags() -> None:
  """Command-line flags, defined only when run as a program."""
  flags.DEFINE_string("hf_dir", None, "HF model directory (config.json + safetensors).", required=True)
  flags.DEFINE_string("out", None, "Output checkpoint directory.", required=True)
  flags.DEFINE_string("dtype", "float32", "Parameter dtype to store (float32 for training master weights).")


if __name__ == "__main__":
  define_flags()
  run_cli(main)
