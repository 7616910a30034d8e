"""Benchmarks the data pipeline: tokens/s, packing efficiency packed vs padded-to-longest; start-up at scale.

  python tools/bench_data.py --config=configs/collection_shared.py [--batch_size=16] [--num_batches=100] [--json]
  python tools/bench_data.py --scale=1000000 [--num_workers=0] [--json]

tokens_per_s counts token slots (batch x seq_len) delivered per second, i.e.
what a train step consumes; nonpad_tokens_per_s counts real tokens.
padded_efficiency is loss tokens / slots when the same example stream is cut
into batches of `batch_size` examples padded to their longest (LLaMA-Factory
without packing). step_s is one training step of the demo model (configs/demo.py's model)
on a batch of the same shape, and feed_ratio = step_s / seconds_per_batch: how many times
faster the pipeline produces batches than that step consumes them (goal: >= 10).
With --json the last line is one JSON object.

--scale=N synthesizes a collection of N examples from the five shared sources of
configs/collection_shared.py (their records repeated, in shares of their real sizes, as JSON
lines in a temporary folder), prepares its tokenize-once cache, and starts the pipeline in fresh
subprocesses from the cache and without it, up to the first batch. startup_s is the whole
process (imports, tokenizer, pipeline, first batch), startup_pipeline_s the pipeline and first
batch alone (after importing transformers, startup_transformers_import_s), and *_peak_rss_gb
the process's peak resident memory. prepare_s is the prepare process's wall time; its CPU
seconds in the reading process and in the tokenizer workers give the extrapolation to 13.5M
examples (MedS-Ins) on a 16-core host, at this collection's example lengths:
max(reading, tokenizing / 16). batches_identical compares the first batch of both starts.
"""

import hashlib
import importlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import ml_collections
import numpy as np
from absl import flags

from csft_jax import configuration
from csft_jax.console import run_cli
from csft_jax.data.packing import packing_efficiency, padded_to_longest_efficiency
from csft_jax.data.pipeline import DataPipeline

FLAGS = flags.FLAGS


def demo_step_seconds(batch: dict[str, np.ndarray], vocab_size: int, num_sources: int, repeats: int = 3) -> float:
  """Seconds per jitted training step of the demo model (configs/demo.py) on `batch`, after compiling."""
  import jax

  from csft_jax.models import model_config_from
  from csft_jax.sharding import make_mesh
  from csft_jax.training import programs
  from csft_jax.training.optimizer import make_optimizer

  config = configuration.load("configs/demo.py")
  model_config = model_config_from(config.model, vocab_size).replace(
    max_position_embeddings=max(config.model.max_position_embeddings, batch["input_ids"].shape[1])
  )
  optimizer, schedule = make_optimizer(config.optim, 100)
  mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
  start = programs.random_init(model_config, optimizer, 0, mesh)
  step, _, _ = programs.jit_steps(config, start, optimizer, schedule, mesh, num_sources)
  state, metrics = step(start.state, batch)
  jax.block_until_ready(metrics)
  begin = time.perf_counter()
  for _ in range(repeats):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  return (time.perf_counter() - begin) / repeats


MEDS_INS_EXAMPLES = 13_500_000
_CHILD_CONFIG = "data_config.json"


def synthesize_collection(num_examples: int, out_dir: str) -> ml_collections.ConfigDict:
  """Writes `num_examples` records of the shared collection as JSONL files; returns their data config."""
  from csft_jax.data.sources import file_records, parse_sources

  data = configuration.load("configs/collection_shared.py").data
  originals = {}
  for spec in parse_sources(data.sources):
    originals[spec.name] = [r[0] for p in spec.paths for r in file_records(spec, p) if not isinstance(r, Exception)]
  total = sum(len(r) for r in originals.values())
  for name, records in originals.items():
    count = max(1, round(num_examples * len(records) / total))
    path = os.path.join(out_dir, f"{name}.jsonl")
    with open(path, "w", encoding="utf-8") as f:
      for i in range(count):
        f.write(json.dumps(records[i % len(records)], ensure_ascii=False) + "\n")
    source = data.sources[name]
    source.path, source.encoding, source.reader = path, "utf-8", "jsonl"
  data.cache_dir = os.path.join(out_dir, "cache")
  return data


def _child(mode: str, scale_dir: str) -> dict:
  """One measured process: prepare, or a start-up (cache on/off) up to the first batch."""
  from csft_jax.data import prepare

  with open(os.path.join(scale_dir, _CHILD_CONFIG), encoding="utf-8") as f:
    data = ml_collections.ConfigDict(json.load(f))
  if mode == "prepare":
    manifest = prepare.prepare(data, num_workers=FLAGS.num_workers, force=True)
    usage, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return dict(
      examples=sum(e["examples"] for e in manifest["sources"].values()),
      tokens=sum(e["tokens"] for e in manifest["sources"].values()),
      num_workers=manifest["num_workers"],
      reading_cpu_s=usage.ru_utime + usage.ru_stime,
      tokenizing_cpu_s=workers.ru_utime + workers.ru_stime,
    )
  data.cache = "require" if mode == "cached" else "off"
  start = time.perf_counter()
  importlib.import_module("transformers")  # timed on purpose: what every start pays, cache or not
  imports_s = time.perf_counter() - start  # transformers (and torch, when installed): the same with or without cache
  start = time.perf_counter()
  batch = next(iter(DataPipeline(data).train_dataset(FLAGS.batch_size)))
  digest = hashlib.sha256(b"".join(batch[k].tobytes() for k in sorted(batch))).hexdigest()
  return dict(
    pipeline_s=time.perf_counter() - start,
    imports_s=imports_s,
    batch_sha256=digest,
    peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
  )


def _run_child(mode: str, scale_dir: str) -> tuple[dict, float]:
  start = time.perf_counter()
  done = subprocess.run(
    [
      sys.executable,
      os.path.abspath(__file__),
      f"--scale_child={mode}",
      f"--scale_dir={scale_dir}",
      f"--batch_size={FLAGS.batch_size}",
      f"--num_workers={FLAGS.num_workers}",
    ],
    stdout=subprocess.PIPE,
    text=True,
    check=False,
  )
  if done.returncode:
    raise RuntimeError(f"bench_data: the {mode} subprocess failed (exit {done.returncode}); see its error above")
  return json.loads(done.stdout.strip().splitlines()[-1]), time.perf_counter() - start


def scale_main() -> None:
  """--scale=N: see the module docstring."""
  scale_dir = tempfile.mkdtemp(prefix="bench_data_scale_")
  try:
    start = time.perf_counter()
    data = synthesize_collection(FLAGS.scale, scale_dir)
    with open(os.path.join(scale_dir, _CHILD_CONFIG), "w", encoding="utf-8") as f:
      json.dump(data.to_dict(), f, ensure_ascii=False)
    print(f"synthesized {FLAGS.scale:,} examples in {time.perf_counter() - start:.1f} s under {scale_dir}", flush=True)
    prepared, prepare_s = _run_child("prepare", scale_dir)
    cached, startup_s = _run_child("cached", scale_dir)
    uncached, uncached_startup_s = _run_child("uncached", scale_dir)
  finally:
    shutil.rmtree(scale_dir, ignore_errors=True)
  n = prepared["examples"]
  per_example = dict(reading=prepared["reading_cpu_s"] / n, tokenizing=prepared["tokenizing_cpu_s"] / n)
  if prepared["num_workers"] == 1:  # Tokenized in the reading process itself.
    per_example = dict(reading=per_example["reading"], tokenizing=per_example["reading"])
  extrapolated_s = MEDS_INS_EXAMPLES * max(per_example["reading"], per_example["tokenizing"] / 16)
  result = dict(
    scale=FLAGS.scale,
    examples=n,
    tokens=prepared["tokens"],
    prepare_s=round(prepare_s, 2),
    prepare_examples_per_s=round(n / prepare_s, 1),
    prepare_workers=prepared["num_workers"],
    prepare_reading_cpu_s=round(prepared["reading_cpu_s"], 2),
    prepare_tokenizing_cpu_s=round(prepared["tokenizing_cpu_s"], 2),
    prepare_13_5m_16_cores_s_extrapolated=round(extrapolated_s, 1),
    startup_s=round(startup_s, 2),
    startup_pipeline_s=round(cached["pipeline_s"], 2),
    startup_transformers_import_s=round(cached["imports_s"], 2),
    startup_peak_rss_gb=round(cached["peak_rss_gb"], 3),
    uncached_startup_s=round(uncached_startup_s, 2),
    uncached_pipeline_s=round(uncached["pipeline_s"], 2),
    uncached_peak_rss_gb=round(uncached["peak_rss_gb"], 3),
    batches_identical=cached["batch_sha256"] == uncached["batch_sha256"],
  )
  print(
    f"prepare: {n:,} examples in {prepare_s:.1f} s ({result['prepare_examples_per_s']:,.0f}/s,"
    f" {prepared['num_workers']} workers); 13.5M examples on 16 cores: ~{extrapolated_s / 60:.0f} min"
  )
  print(
    f"start-up from the cache: {startup_s:.1f} s, peak RSS {cached['peak_rss_gb']:.2f} GB;"
    f" without it: {uncached_startup_s:.1f} s, {uncached['peak_rss_gb']:.2f} GB;"
    f" first batches identical: {result['batches_identical']}"
  )
  if FLAGS.json:
    print(json.dumps(result))


def main(argv: list[str]) -> None:
  """The benchmark: see the module docstring."""
  del argv
  if FLAGS.scale_child:
    print(json.dumps(_child(FLAGS.scale_child, FLAGS.scale_dir)))
    return
  if FLAGS.scale:
    scale_main()
    return
  start = time.perf_counter()
  pipeline = DataPipeline(configuration.training_data_config(configuration.from_flags()))
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
    packing=pipeline.config.packing,
    batch_size=batch_size,
    seq_len=seq_len,
    num_batches=FLAGS.num_batches,
    load_s=round(load_s, 3),
    seconds_per_batch=elapsed / FLAGS.num_batches,
    tokens_per_s=slots / elapsed,
    nonpad_tokens_per_s=nonpad / elapsed,
    examples_per_batch=examples / FLAGS.num_batches,
    packing_efficiency=packing_efficiency(batches),
    padded_efficiency=padded_to_longest_efficiency(loss_tokens, lengths, batch_size),
    padded_fixed_efficiency=float(np.sum(loss_tokens) / (len(lengths) * seq_len)),
  )
  if FLAGS.time_step:
    result["step_s"] = demo_step_seconds(batches[0], len(pipeline.tokenizer), len(pipeline.source_names))
    result["feed_ratio"] = result["step_s"] / result["seconds_per_batch"]
  print(
    f"load+tokenize {load_s:.1f}s; {result['seconds_per_batch'] * 1e3:.1f} ms/batch of"
    f" {batch_size}x{seq_len}: {result['tokens_per_s']:,.0f} token slots/s,"
    f" {result['nonpad_tokens_per_s']:,.0f} real tokens/s"
  )
  print(
    f"efficiency (loss tokens / slots): packed {result['packing_efficiency']:.3f},"
    f" padded-to-longest {result['padded_efficiency']:.3f},"
    f" padded-to-seq_len {result['padded_fixed_efficiency']:.3f}"
  )
  if FLAGS.time_step:
    print(
      f"demo model train step on one such batch: {result['step_s']:.3f} s -> the pipeline feeds it "
      f"{result['feed_ratio']:.0f}x faster than it trains"
    )
  if FLAGS.json:
    print(json.dumps(result))


def define_flags() -> None:
  """Command-line flags, defined only when run as a program."""
  configuration.define_config_flag("Config file with a `data` field.")
  flags.DEFINE_integer("batch_size", 16, "Global batch size (rows).")
  flags.DEFINE_integer("num_batches", 100, "Batches to time (after 2 warm-up batches).")
  flags.DEFINE_bool("json", False, "Print a JSON summary as the last line.")
  flags.DEFINE_bool("time_step", True, "Also time the demo model's training step on one batch.")
  flags.DEFINE_integer("scale", 0, "Synthesize this many examples and measure prepare and start-up (see above).")
  flags.DEFINE_integer("num_workers", 0, "With --scale: tokenizer processes for prepare; 0 = one per core.")
  flags.DEFINE_enum("scale_child", "", ["", "prepare", "cached", "uncached"], "Internal: one measured subprocess.")
  flags.DEFINE_string("scale_dir", "", "Internal: the synthesized collection of --scale_child.")


if __name__ == "__main__":
  define_flags()
  run_cli(main)
