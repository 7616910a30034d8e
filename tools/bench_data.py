"""Benchmarks the data pipeline: tokens/s, packing efficiency packed vs padded-to-longest.

  python tools/bench_data.py --config=configs/collection_shared.py [--batch_size=16] [--num_batches=100] [--json]

tokens_per_s counts token slots (batch x seq_len) delivered per second, i.e.
what a train step consumes; nonpad_tokens_per_s counts real tokens.
padded_efficiency is loss tokens / slots when the same example stream is cut
into batches of `batch_size` examples padded to their longest (LLaMA-Factory
without packing). step_s is one training step of the demo model (configs/demo.py's model)
on a batch of the same shape, and feed_ratio = step_s / seconds_per_batch: how many times
faster the pipeline produces batches than that step consumes them (goal: >= 10).
With --json the last line is one JSON object.
"""

import json
import time

import numpy as np
from absl import flags

from csft_jax import configuration
from csft_jax.console import run_cli
from csft_jax.data.packing import packing_efficiency, padded_to_longest_efficiency
from csft_jax.data.pipeline import DataPipeline

FLAGS = flags.FLAGS


def demo_step_seconds(batch: dict[str, np.ndarray], vocab_size: int, num_sources: int, repeats: int = 3) -> float:
  """Seconds per jitted training step of the demo model (configs/demo.py) on `batch`, after compiling."""
  import jax  # pylint: disable=import-outside-toplevel
  from csft_jax import train  # pylint: disable=import-outside-toplevel
  from csft_jax.models import model_config_from  # pylint: disable=import-outside-toplevel
  from csft_jax.sharding import make_mesh  # pylint: disable=import-outside-toplevel
  from csft_jax.training.optimizer import make_optimizer  # pylint: disable=import-outside-toplevel

  config = configuration.load("configs/demo.py")
  model_config = model_config_from(config.model, vocab_size).replace(
      max_position_embeddings=max(config.model.max_position_embeddings, batch["input_ids"].shape[1]))
  optimizer, schedule = make_optimizer(config.optim, 100)
  mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
  start = train.random_init(model_config, optimizer, 0, mesh)
  step, _, _ = train.jit_steps(config, start, optimizer, schedule, mesh, num_sources)
  state, metrics = step(start.state, batch)
  jax.block_until_ready(metrics)
  begin = time.perf_counter()
  for _ in range(repeats):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  return (time.perf_counter() - begin) / repeats


def main(argv: list[str]) -> None:
  """The benchmark: see the module docstring."""
  del argv
  start = time.perf_counter()
  pipeline = DataPipeline(configuration.from_flags().data)
  load_s = time.perf_counter() - start
  print(pipeline.mixture_table())
  seq_len, batch_size = pipeline.config.seq_len, FLAGS.batch_size
  it = iter(pipeline.train_dataset(batch_size))
  for _ in range(2):
    next(it)
  start = time.perf_counter()
  batches = [next(it) for _ in range(FLAGS.num_batches)]
  elapsed = time.perf_counter() - start
  slots = FLAGS.num_batches * batch_size * seq_len
  nonpad = sum(int((b["segment_ids"] > 0).sum()) for b in batches)
  examples = sum(int(b["segment_ids"].max(axis=1).sum()) for b in batches)
  # The same mixture stream, padded to the longest example of each batch.
  stream = pipeline.examples()
  lengths, loss_tokens = [], []
  for i in range(examples - examples % batch_size):
    e = stream[i]
    lengths.append(len(e["input_ids"]))
    loss_tokens.append(int(e["loss_mask"].sum()))
  result = dict(
      packing=pipeline.config.packing, batch_size=batch_size, seq_len=seq_len,
      num_batches=FLAGS.num_batches, load_s=round(load_s, 3),
      seconds_per_batch=elapsed / FLAGS.num_batches,
      tokens_per_s=slots / elapsed, nonpad_tokens_per_s=nonpad / elapsed,
      examples_per_batch=examples / FLAGS.num_batches,
      packing_efficiency=packing_efficiency(batches),
      padded_efficiency=padded_to_longest_efficiency(loss_tokens, lengths, batch_size),
      padded_fixed_efficiency=float(np.sum(loss_tokens) / (len(lengths) * seq_len)),
  )
  if FLAGS.time_step:
    result["step_s"] = demo_step_seconds(batches[0], len(pipeline.tokenizer), len(pipeline.source_names))
    result["feed_ratio"] = result["step_s"] / result["seconds_per_batch"]
  print(f"load+tokenize {load_s:.1f}s; {result['seconds_per_batch'] * 1e3:.1f} ms/batch of"
        f" {batch_size}x{seq_len}: {result['tokens_per_s']:,.0f} token slots/s,"
        f" {result['nonpad_tokens_per_s']:,.0f} real tokens/s")
  print(f"efficiency (loss tokens / slots): packed {result['packing_efficiency']:.3f},"
        f" padded-to-longest {result['padded_efficiency']:.3f},"
        f" padded-to-seq_len {result['padded_fixed_efficiency']:.3f}")
  if FLAGS.time_step:
    print(f"demo model train step on one such batch: {result['step_s']:.3f} s -> the pipeline feeds it "
          f"{result['feed_ratio']:.0f}x faster than it trains")
  if FLAGS.json:
    print(json.dumps(result))


def define_flags() -> None:
  """Command-line flags, defined only when run as a program."""
  configuration.define_config_flag("Config file with a `data` field.")
  flags.DEFINE_integer("batch_size", 16, "Global batch size (rows).")
  flags.DEFINE_integer("num_batches", 100, "Batches to time (after 2 warm-up batches).")
  flags.DEFINE_bool("json", False, "Print a JSON summary as the last line.")
  flags.DEFINE_bool("time_step", True, "Also time the demo model's training step on one batch.")


if __name__ == "__main__":
  define_flags()
  run_cli(main)
