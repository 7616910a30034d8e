r"""Exports an Orbax checkpoint (or a training workdir's latest step) to an HF directory.

  python tools/convert_to_hf.py --checkpoint=workdirs/demo --out=exports/demo
  python tools/convert_to_hf.py --checkpoint=W/checkpoints/300 --out=D --layout=llama

The result loads with `transformers.AutoModelForCausalLM.from_pretrained(D)` (InternLM2 in its
own layout needs its remote code; `--layout=llama` writes plain Llama instead).
"""

import os
import sys
import time

from absl import app, flags

from csft_jax import checkpointing
from csft_jax.convert import save_hf

flags.DEFINE_string("checkpoint", None, "Workdir, checkpoints dir, or step dir.", required=True)
flags.DEFINE_string("out", None, "Output HF directory.", required=True)
flags.DEFINE_integer("step", None, "Step to export (default: latest).")
flags.DEFINE_enum("layout", None, ["llama", "internlm2"], "Tensor layout (default: the model's own).")
flags.DEFINE_string("dtype", None, "Tensor dtype in the files (default: the parameter dtype).")
flags.DEFINE_integer("max_shard_mb", 5000, "Shard size limit in MiB.")
flags.DEFINE_string("tokenizer_dir", None, "Tokenizer files to copy (default: found from the checkpoint).")


def tokenizer_for(checkpoint: str) -> str | None:
  """The tokenizer that goes with a checkpoint: `<dir>/tokenizer` (convert_from_hf), or the run's."""
  converted = os.path.join(checkpoint, "tokenizer")
  if os.path.isdir(converted):
    return converted
  workdir = checkpointing.training_workdir(checkpoint)
  tokenizer = checkpointing.training_data_config(workdir)[0] if workdir else None
  return tokenizer if tokenizer and os.path.isdir(tokenizer) else None


def main(argv: list[str]) -> None:
  del argv
  start = time.time()
  f = flags.FLAGS
  step_dir = checkpointing.resolve_step_dir(f.checkpoint, f.step)
  model = checkpointing.restore_model(step_dir)
  save_hf(model, f.out, layout=f.layout, dtype=f.dtype, max_shard_bytes=f.max_shard_mb * 2**20,
          tokenizer_dir=f.tokenizer_dir or tokenizer_for(f.checkpoint))
  print(f"{step_dir} -> {f.out} ({time.time() - start:.1f}s)", file=sys.stderr)


if __name__ == "__main__":
  app.run(main)
