"""Builds csft_jax/assets/demo_tokenizer from the project's sample collection.

  python tools/build_demo_tokenizer.py [--out=csft_jax/assets/demo_tokenizer] [--vocab_size=3000]

The result is deterministic for a given sample collection.
"""

from absl import flags

from csft_jax.configuration import resolve_path
from csft_jax.console import run_cli
from csft_jax.data.config import DEMO_TOKENIZER, sample_collection_config
from csft_jax.data.sources import load_conversations, parse_sources
from csft_jax.data.tokenizer import build_demo_tokenizer

FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
  del argv
  texts = []
  for spec in parse_sources(sample_collection_config().sources):
    records, _ = load_conversations(spec, "raise")
    texts += [r.conversation.text() for r in records]
  out = resolve_path(FLAGS.out)
  build_demo_tokenizer(texts, out, FLAGS.vocab_size)
  print(f"wrote {out} from {len(texts)} conversations")


def define_flags() -> None:
  """Command-line flags, defined only when run as a program."""
  flags.DEFINE_string("out", DEMO_TOKENIZER, "Output directory.")
  flags.DEFINE_integer("vocab_size", 3000, "Vocabulary size.")


if __name__ == "__main__":
  define_flags()
  run_cli(main)
