r"""Converts a sentencepiece tokenizer directory (InternLM2, Llama-2 style) to a fast tokenizer.

  python tools/convert_tokenizer.py --tokenizer_dir=/models/internlm2_5-7b --out=tokenizers/internlm2_5
  python tools/convert_tokenizer.py --tokenizer_dir=D --out=O --chat_template=hf

`--tokenizer_dir` holds `tokenizer.model` and usually `tokenizer_config.json` (its added tokens,
such as InternLM2's `<|im_start|>`/`<|im_end|>`, special tokens and chat template). The converter
is transformers' own; the directory's code is never run. `--out` gets `tokenizer.json`,
`tokenizer_config.json`, the chat template and a copy of `tokenizer.model`, and loads with
`AutoTokenizer.from_pretrained(out)`. The result is checked to encode probe texts exactly as
sentencepiece does, and to hold the special tokens of `--chat_template`. Training and evaluation
convert such a directory by themselves when they load it; a training run keeps the converted
tokenizer in `W/tokenizer/`.
"""

import os
import sys

from absl import flags

from csft_jax.console import run_cli
from csft_jax.data.errors import DataError
from csft_jax.data.templates import load_chat_template, template_names
from csft_jax.data.tokenizer import SENTENCEPIECE_FILE, save_converted_tokenizer, tokenizer_from_sentencepiece

FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
  del argv
  source = os.path.abspath(FLAGS.tokenizer_dir)
  if not os.path.isfile(os.path.join(source, SENTENCEPIECE_FILE)):
    raise DataError(
      f"--tokenizer_dir={FLAGS.tokenizer_dir}: no {SENTENCEPIECE_FILE} in {source}; pass the "
      "directory of a sentencepiece tokenizer."
    )
  tokenizer = tokenizer_from_sentencepiece(source)
  template = load_chat_template(FLAGS.chat_template, tokenizer)  # names the special tokens it lacks
  save_converted_tokenizer(tokenizer, source, FLAGS.out)
  specials = ", ".join(f"{token}={tokenizer.convert_tokens_to_ids(token)}" for token in tokenizer.all_special_tokens)
  print(
    f"{source} -> {FLAGS.out}: {len(tokenizer)} tokens; special tokens {specials}; chat template "
    f"{template.name!r} stops at {list(template.stop_token_ids)}",
    file=sys.stderr,
  )


def define_flags() -> None:
  """Command-line flags, defined only when run as a program."""
  flags.DEFINE_string(
    "tokenizer_dir", None, "Directory with tokenizer.model (and tokenizer_config.json).", required=True
  )
  flags.DEFINE_string("out", None, "Output directory for the fast tokenizer.", required=True)
  flags.DEFINE_enum(
    "chat_template", "internlm2", template_names(), "Chat template whose special tokens the tokenizer must have."
  )


if __name__ == "__main__":
  define_flags()
  run_cli(main)
