"""Builds csft_jax/assets/demo_tokenizer from the project's sample collection.

  python tools/build_demo_tokenizer.py [--out=csft_jax/assets/demo_tokenizer] [--vocab_size=3000]

The result is deterministic for a given sample collection.
"""

import os

from absl import app, flags

from csft_jax.data.config import DEMO_TOKENIZER, REPO_ROOT, sample_collection_config
from csft_jax.data.sources import load_conversations, parse_sources
from csft_jax.data.tokenizer import build_demo_tokenizer

_OUT = flags.DEFINE_string("out", DEMO_TOKENIZER, "Output directory (relative to the repo root).")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 3000, "Vocabulary size.")


def main(argv: list[str]) -> None:
  del argv
  texts = []
  for spec in parse_sources(sample_collection_config().sources, REPO_ROOT):
    records, _ = load_conversations(spec, "raise")
    texts += [r.conversation.text() for r in records]
  out = os.path.join(REPO_ROOT, _OUT.value)
  build_demo_tokenizer(texts, out, _VOCAB_SIZE.value)
  print(f"wrote {out} from {len(texts)} conversations")


if __name__ == "__main__":
  app.run(main)
