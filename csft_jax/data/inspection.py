"""Inspect a data config: mixture table, rendered examples, lengths, packing efficiency.

  python -m csft_jax.data.inspect --config=configs/collection_shared.py --num_batches=20 [--json]
      [--config.data.cache=require --config.data.cache_dir=DIR]   # read the tokenize-once cache

The module is `inspection`; `csft_jax.data.inspect` is its -m alias (`csft_jax/data/__init__.py`),
so no file here shadows the standard library's `inspect`.

Trained (loss) tokens of the rendered examples are shown between [[ ]]. With
--json the last line is one JSON object:
  {"sources": {name: {"target_weight", "realized_fraction_examples",
   "realized_fraction_tokens", "examples", "tokens", "skipped", "dropped",
   "truncated"}}, "packing_efficiency": x, "num_batches": n, ...}
"""

import json

import numpy as np
from absl import flags

from csft_jax import configuration
from csft_jax.console import run_cli
from csft_jax.data.packing import packing_efficiency
from csft_jax.data.pipeline import DataPipeline, source_fractions

FLAGS = flags.FLAGS


def render_example(tokenizer, token_ids: np.ndarray, loss_mask: np.ndarray) -> str:
  """Decodes an example, wrapping each run of trained tokens in [[ ]]."""
  out, start = [], 0
  for i in range(1, len(token_ids) + 1):
    if i == len(token_ids) or loss_mask[i] != loss_mask[start]:
      text = tokenizer.decode(token_ids[start:i].tolist())
      out.append(f"[[{text}]]" if loss_mask[start] else text)
      start = i
  return "".join(out)


def length_histogram(lengths: np.ndarray, seq_len: int, num_bins: int = 8, width: int = 40) -> str:
  """A text histogram of example lengths in tokens, bins up to seq_len + 1."""
  edges = np.linspace(0, seq_len + 1, num_bins + 1).round().astype(int)
  counts, _ = np.histogram(lengths, bins=edges)
  top = max(counts.max(), 1)
  return "\n".join(
    f"{lo:>6}-{hi:<6} {c:>7} {'#' * round(width * c / top)}" for lo, hi, c in zip(edges[:-1], edges[1:], counts)
  )


def main(argv: list[str]) -> None:
  """The command: see the module docstring."""
  del argv
  pipeline = DataPipeline(configuration.training_data_config(configuration.from_flags()))
  print(pipeline.mixture_table())
  for s, stats in zip(pipeline.source_names, pipeline.stats):
    if stats.first_skip:
      print(f"first skipped record of {s}: {stats.first_skip}")
  for i, source in enumerate(pipeline.train_sources):
    for j in range(min(FLAGS.num_examples, len(source)) if i < 3 else 0):
      token_ids, loss_mask = pipeline.train_example(i, j)
      print(f"\n--- {source.name} example {j} ({len(token_ids)} tokens) ---")
      print(render_example(pipeline.tokenizer, token_ids, loss_mask))
  lengths = np.concatenate([pipeline.train_lengths(i) for i in range(len(pipeline.train_sources))])
  print(f"\nexample lengths (tokens), seq_len={pipeline.config.seq_len}:")
  print(length_histogram(lengths, pipeline.config.seq_len))
  it = iter(pipeline.train_dataset(FLAGS.batch_size))
  batches = [next(it) for _ in range(FLAGS.num_batches)]
  efficiency = packing_efficiency(batches)
  examples, tokens = source_fractions(batches, len(pipeline.source_names))
  print(
    f"\npacking ({pipeline.config.packing}) efficiency over {len(batches)} batches"
    f" of {FLAGS.batch_size}x{pipeline.config.seq_len}: {efficiency:.3f} (loss tokens / token slots)"
  )
  if FLAGS.json:
    sources = {}
    for row, fe, ft in zip(pipeline.mixture_rows(), examples, tokens):
      sources[row["source"]] = dict(
        target_weight=row["target_weight"],
        realized_fraction_examples=float(fe),
        realized_fraction_tokens=float(ft),
        examples=row["examples"],
        tokens=row["tokens"],
        skipped=row["skipped"],
        dropped=row["dropped"],
        truncated=row["truncated"],
      )
    print(
      json.dumps(
        dict(
          sources=sources,
          packing_efficiency=efficiency,
          num_batches=len(batches),
          batch_size=FLAGS.batch_size,
          seq_len=pipeline.config.seq_len,
          packing=pipeline.config.packing,
        ),
        ensure_ascii=False,
      )
    )


def define_flags() -> None:
  """Command-line flags, defined only when run as a program."""
  configuration.define_config_flag("Config file with a `data` field.")
  flags.DEFINE_integer("num_batches", 20, "Batches to draw for realized fractions and efficiency.")
  flags.DEFINE_integer("batch_size", 16, "Global batch size (rows).")
  flags.DEFINE_integer("num_examples", 2, "Rendered examples to show.")
  flags.DEFINE_bool("json", False, "Print a JSON summary as the last line.")


if __name__ == "__main__":
  define_flags()
  run_cli(main)
