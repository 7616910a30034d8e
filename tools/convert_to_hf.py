r"""Exports an Orbax checkpoint (or a training workdir's latest step) to an HF directory.

  python tools/convert_to_hf.py --checkpoint=workdirs/demo/sft --out=exports/demo
  python tools/convert_to_hf.py --checkpoint=W/checkpoints/300 --out=D --layout=llama

The result loads with `transformers.AutoModelForCausalLM.from_pretrained(D)` (InternLM2 in its
own layout needs its remote code; `--layout=llama` writes plain Llama instead). For a training
run, the run's tokenizer and chat template go with it: `config.json` and `generation_config.json`
name the template's stop tokens, and `chat_template.jinja` is the template the model trained with.
"""

import os
import sys
import time

from absl import flags

from csft_jax import checkpointing
from csft_jax.console import run_cli
from csft_jax.convert import save_hf
from csft_jax.data.templates import load_chat_template
from csft_jax.data.tokenizer import load_tokenizer
from csft_jax.workdir import RunDir

FLAGS = flags.FLAGS


def tokenizer_and_template(checkpoint: str) -> tuple[str | None, str | None]:
  """The tokenizer directory and chat template name that go with a checkpoint, where known."""
  run_dir = RunDir.containing(checkpoint)
  if run_dir is not None:  # a training run: its tokenizer copy and its chat template
    return run_dir.data_settings()
  converted = os.path.join(checkpoint, "tokenizer")  # tools/convert_from_hf.py output
  return (converted if os.path.isdir(converted) else None), None


def main(argv: list[str]) -> None:
  del argv
  start = time.time()
  step_dir = checkpointing.resolve_step_dir(FLAGS.checkpoint, FLAGS.step)
  model = checkpointing.restore_model(step_dir)
  tokenizer_dir, template_name = tokenizer_and_template(FLAGS.checkpoint)
  tokenizer_dir = FLAGS.tokenizer_dir or tokenizer_dir
  stops, jinja = None, None
  if tokenizer_dir and template_name:
    template = load_chat_template(template_name, load_tokenizer(tokenizer_dir))
    stops, jinja = template.stop_token_ids, getattr(template, "jinja", lambda: None)()
  save_hf(
    model,
    FLAGS.out,
    layout=FLAGS.layout,
    dtype=FLAGS.dtype,
    max_shard_bytes=FLAGS.max_shard_mb * 2**20,
    tokenizer_dir=tokenizer_dir,
    stop_token_ids=stops,
    chat_template=jinja,
  )
  print(f"{step_dir} -> {FLAGS.out} ({time.time() - start:.1f}s)", file=sys.stderr)


def define_flags() -> None:
  """Command-line flags, defined only when run as a program."""
  flags.DEFINE_string("checkpoint", None, "Workdir, checkpoints dir, or step dir.", required=True)
  flags.DEFINE_string("out", None, "Output HF directory.", required=True)
  flags.DEFINE_integer("step", None, "Step to export (default: latest).")
  flags.DEFINE_enum("layout", None, ["llama", "internlm2"], "Tensor layout (default: the model's own).")
  flags.DEFINE_string("dtype", None, "Tensor dtype in the files (default: the parameter dtype).")
  flags.DEFINE_integer("max_shard_mb", 5000, "Shard size limit in MiB.")
  flags.DEFINE_string("tokenizer_dir", None, "Tokenizer files to copy (default: found from the checkpoint).")


if __name__ == "__main__":
  define_flags()
  run_cli(main)
