"""Tokenize once: read, adapt and tokenize every source into the cache at `config.data.cache_dir`.

  python -m csft_jax.data.prepare --config=configs/collection_shared.py \
      --config.data.cache_dir=/data/cache [--num_workers=0] [--force] [--json]

Training, `inspect` and `bench_data` then read the cache with `--config.data.cache=require`
(or `auto`, which runs this first when the cache is absent or stale). The main process reads and
adapts the sources in order and hands shards of SHARD_CONVERSATIONS conversations to one worker
process per core (for over 32 MiB of source files), which tokenize them and write their
ArrayRecord files. A progress line with ETA (by bytes of the source files read) shows while it
runs, and a per-source summary at the end; with --json the last line is one JSON object.

Multi-host: run the same command on every host with --coordinator_address/--num_processes/
--process_id (or --distributed) and a cache_dir that all of them see. Process p tokenizes the
shards s with s % num_processes == p; process 0 waits for every shard and writes the manifest
last, so a cache is complete or absent. An interrupted prepare leaves no manifest; rerunning it
keeps the shards already done (same fingerprint) and makes the rest.
"""

import collections
import concurrent.futures
import dataclasses
import glob
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

import ml_collections
import numpy as np
from absl import flags

from csft_jax import configuration, files
from csft_jax.data import cache
from csft_jax.data.errors import DataError
from csft_jax.data.sources import SourceSpec, SourceStats, iter_conversations, parse_sources
from csft_jax.data.templates import ChatTemplate, load_chat_template
from csft_jax.data.tokenizer import load_tokenizer

_WAIT_S = 6 * 3600  # How long a process waits for the shards or manifest of the others.
_POLL_S = 2.0
_SHOW_EVERY_S = 1.0
_POOL_MIN_BYTES = 32 << 20  # Smaller collections are tokenized in the reading process.
_TEMPLATE: ChatTemplate | None = None  # A worker process's template, loaded once.


def _init_worker(tokenizer: str, chat_template: str) -> None:
  # One process per core: the tokenizer's own thread pool would oversubscribe them.
  os.environ["TOKENIZERS_PARALLELISM"] = "false"
  global _TEMPLATE  # noqa: PLW0603  a pool worker's template, set once by the pool's initializer
  _TEMPLATE = load_chat_template(chat_template, load_tokenizer(tokenizer))


def _work(stem: str, name: str, conversations: list, seq_len: int, overlong: str) -> dict[str, int]:
  return cache.write_shard(stem, name, conversations, _TEMPLATE, seq_len, overlong)


def _format_duration(seconds: float) -> str:
  seconds = int(round(seconds))
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class _Progress:
  """The progress line: fraction of the source files' bytes read, examples tokenized, ETA."""

  def __init__(self, specs: Sequence[SourceSpec], out: TextIO | None):
    self.out = out
    self.sizes = {p: os.path.getsize(p) for s in specs for p in s.paths}
    self.total = max(sum(self.sizes.values()), 1)
    self.done_bytes = 0
    self.path, self.path_lines, self.line = None, 1, 0
    self.conversations = 0
    self.start = self.last = time.perf_counter()
    self.tty = out is not None and out.isatty()

  def record(self, path: str, line: int | None) -> None:
    if path != self.path:
      if self.path is not None:
        self.done_bytes += self.sizes.get(self.path, 0)
      self.path, self.line = path, 0
      self.path_lines = max(_count_lines(path), 1)
    self.line = line or self.line

  def fraction(self) -> float:
    within = self.sizes.get(self.path, 0) * min(self.line / self.path_lines, 1.0) if self.path else 0.0
    return min((self.done_bytes + within) / self.total, 1.0)

  def show(self, source: str, force: bool = False) -> None:
    now = time.perf_counter()
    if self.out is None or not (force or now - self.last >= (_SHOW_EVERY_S if self.tty else 30.0)):
      return
    self.last = now
    elapsed, f = now - self.start, self.fraction()
    eta = _format_duration(elapsed * (1 - f) / f) if f > 0 else "?"
    line = (
      f"prepare {100 * f:5.1f}% | reading {source} | {self.conversations:,} examples tokenized"
      f" ({self.conversations / max(elapsed, 1e-9):,.0f}/s) | {_format_duration(elapsed)} | ETA {eta}"
    )
    self.out.write(("\r" + line + "  ") if self.tty else line + "\n")
    self.out.flush()

  def close(self) -> None:
    if self.out is not None and self.tty:
      self.out.write("\n")


def _count_lines(path: str) -> int:
  count = 0
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 24), b""):
      count += block.count(b"\n")
  return count


@dataclasses.dataclass
class _SourcePlan:
  """What the reading pass learned about a source: its shards and record counts."""

  spec: SourceSpec
  stats: SourceStats
  num_shards: int = 0


def prepare(
  data_config: ml_collections.ConfigDict,
  *,
  num_workers: int = 0,
  process_index: int = 0,
  process_count: int = 1,
  force: bool = False,
  wait: bool = False,
  out: TextIO | None = sys.stderr,
) -> dict[str, Any] | None:
  """Builds the cache of `data_config` unless an up-to-date one exists; returns its manifest.

  Args:
    data_config: `config.data` with `cache_dir` set and paths resolved.
    num_workers: tokenizer processes on this host; 0 = one per core (in this process for
      collections under 32 MiB), 1 = in this process.
    process_index, process_count: this host's place in a multi-host prepare.
    force: rebuild even if the cache matches the config.
    wait: the other processes wait for process 0's manifest (the pipeline needs it to read).
    out: where the progress line and the summary go (None: silent).

  Returns:
    The manifest; None on the other processes of a multi-host prepare unless `wait`.
  """
  cache_dir = data_config.cache_dir
  if not cache_dir:
    raise DataError("config.data.cache_dir is not set: name a directory for the tokenized cache")
  files.check_writable(cache_dir, "config.data.cache_dir")
  specs = parse_sources(data_config.sources)
  fp = cache.fingerprint(data_config, specs)
  if not force:
    try:
      manifest = cache.open_cache(data_config, specs, fp)
      if out is not None:
        out.write(f"cache {cache_dir} is up to date ({cache.MANIFEST} matches the config)\n")
      return manifest
    except cache.CacheError:
      pass
  build = cache.build_name(fp)
  build_dir = os.path.join(cache_dir, build)
  manifest_path = os.path.join(cache_dir, cache.MANIFEST)
  if process_index == 0 and os.path.exists(manifest_path):
    os.remove(manifest_path)  # From here until the end the cache is absent, never half-new.
  start = time.perf_counter()
  progress = _Progress(specs, out)
  if not num_workers:  # Starting worker processes only pays off for a large collection.
    num_workers = 1 if progress.total < _POOL_MIN_BYTES else os.cpu_count() or 1
  plans = _tokenize_shards(data_config, specs, build_dir, num_workers, process_index, process_count, progress, force)
  progress.close()
  if process_index != 0:
    return _wait_for_manifest(data_config, specs, fp, out) if wait else None
  manifest = _write_manifest(
    data_config, fp, build, plans, time.perf_counter() - start, num_workers, process_count, out
  )
  for stale in glob.glob(os.path.join(cache_dir, "build-*")):
    if os.path.basename(stale) != build:
      shutil.rmtree(stale, ignore_errors=True)
  if out is not None:
    out.write(summary_table(manifest) + "\n")
  return manifest


def _tokenize_shards(
  data_config: ml_collections.ConfigDict,
  specs: Sequence[SourceSpec],
  build_dir: str,
  num_workers: int,
  process_index: int,
  process_count: int,
  progress: _Progress,
  force: bool = False,
) -> list[_SourcePlan]:
  """Reads every source and tokenizes this process's shards (those not already done, or all with `force`)."""
  seq_len, overlong = data_config.seq_len, data_config.overlong
  plans, shard_counter = [], 0
  pending: collections.deque = collections.deque()
  if num_workers > 1:
    pool = concurrent.futures.ProcessPoolExecutor(
      num_workers,
      mp_context=multiprocessing.get_context("spawn"),
      initializer=_init_worker,
      initargs=(data_config.tokenizer, data_config.chat_template),
    )
    template = None
  else:
    pool = None
    template = load_chat_template(data_config.chat_template, load_tokenizer(data_config.tokenizer))

  def finish(future_or_counts) -> None:
    counts = future_or_counts.result() if pool else future_or_counts
    progress.conversations += counts["conversations"]

  def submit(plan: _SourcePlan, conversations: list) -> None:
    nonlocal shard_counter
    stem = cache.shard_stem(build_dir, plan.spec.name, plan.num_shards)
    mine = shard_counter % process_count == process_index
    plan.num_shards += 1
    shard_counter += 1
    if not mine or (not force and os.path.exists(f"{stem}.json")):
      return
    if pool is None:
      finish(cache.write_shard(stem, plan.spec.name, conversations, template, seq_len, overlong))
      return
    pending.append(pool.submit(_work, stem, plan.spec.name, conversations, seq_len, overlong))
    while len(pending) > 2 * num_workers:  # Bounds the conversations held in memory.
      finish(pending.popleft())

  try:
    for spec in specs:
      plan = _SourcePlan(spec, SourceStats())
      plans.append(plan)
      chunk = []
      for record in iter_conversations(spec, data_config.on_error, plan.stats):
        chunk.append(record.conversation)
        progress.record(record.location.path, record.location.line)
        if len(chunk) == cache.SHARD_CONVERSATIONS:
          submit(plan, chunk)
          chunk = []
        progress.show(spec.name)
      if chunk:
        submit(plan, chunk)
    while pending:
      finish(pending.popleft())
      progress.show(specs[-1].name)
    progress.show(specs[-1].name, force=True)
  finally:
    if pool is not None:
      pool.shutdown(wait=True, cancel_futures=True)
  return plans


def _wait_for_shards(stems: Sequence[str], out: TextIO | None) -> None:
  """Process 0 waits for the shards that other processes tokenize."""
  deadline, said = time.monotonic() + _WAIT_S, False
  while True:
    missing = [s for s in stems if not os.path.exists(f"{s}.json")]
    if not missing:
      return
    if time.monotonic() > deadline:
      raise DataError(
        f"waited {_WAIT_S / 3600:g} h for {len(missing)} shards of other processes (first:"
        f" {missing[0]}.json); check that every process runs prepare with the same config"
      )
    if not said and out is not None:
      out.write(f"waiting for {len(missing)} shards of other processes\n")
      said = True
    time.sleep(_POLL_S)


def _wait_for_manifest(
  data_config: ml_collections.ConfigDict, specs: Sequence[SourceSpec], fp: dict, out: TextIO | None
) -> dict[str, Any]:
  """The other processes wait until process 0 has written the manifest of this build."""
  deadline = time.monotonic() + _WAIT_S
  if out is not None:
    out.write(f"waiting for process 0 to write {cache.MANIFEST}\n")
  while True:
    try:
      return cache.open_cache(data_config, specs, fp)
    except cache.CacheError:
      if time.monotonic() > deadline:
        raise
    time.sleep(_POLL_S)


def _write_manifest(
  data_config: ml_collections.ConfigDict,
  fp: dict,
  build: str,
  plans: Sequence[_SourcePlan],
  seconds: float,
  num_workers: int,
  process_count: int,
  out: TextIO | None,
) -> dict[str, Any]:
  """Sums the shards per source, writes each source's lengths.npy, then the manifest (last)."""
  build_dir = os.path.join(data_config.cache_dir, build)
  _wait_for_shards([cache.shard_stem(build_dir, p.spec.name, k) for p in plans for k in range(p.num_shards)], out)
  sources = {}
  for plan in plans:
    name, stats = plan.spec.name, plan.stats
    stems = [cache.shard_stem(build_dir, name, k) for k in range(plan.num_shards)]
    shards = [files.read_json(f"{stem}.json") for stem in stems]
    entry = {k: sum(s[k] for s in shards) for k in ("examples", "tokens", "loss_tokens", "dropped", "truncated")}
    if not entry["examples"]:
      raise DataError(
        f"source {name!r}: all {stats.records - stats.skipped} examples are longer than"
        f" seq_len={data_config.seq_len} and were dropped; raise config.data.seq_len or set overlong='truncate'"
      )
    lengths = np.concatenate([np.load(f"{stem}.lengths.npy") for stem in stems])
    with open(os.path.join(build_dir, name, "lengths.npy.tmp"), "wb") as f:
      np.save(f, lengths)
    os.replace(os.path.join(build_dir, name, "lengths.npy.tmp"), os.path.join(build_dir, name, "lengths.npy"))
    entry.update(
      records=stats.records,
      skipped=stats.skipped,
      first_skip=stats.first_skip,
      lengths=f"{name}/lengths.npy",
      shards=[
        {"file": os.path.relpath(f"{stem}.array_record", build_dir), "examples": s["examples"]}
        for stem, s in zip(stems, shards)
      ],
    )
    sources[name] = entry
  manifest = {
    "version": cache.CACHE_VERSION,
    "build": build,
    "fingerprint": fp,
    "sources": sources,
    "prepare_s": round(seconds, 3),
    "num_workers": num_workers,
    "num_processes": process_count,
    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
  }
  files.write_json_atomic(os.path.join(data_config.cache_dir, cache.MANIFEST), manifest)
  return manifest


def summary_table(manifest: dict[str, Any]) -> str:
  """Per source: records read, examples, tokens, loss tokens, skipped, dropped, truncated, shards."""
  header = ("source", "records", "examples", "tokens", "loss_tokens", "skipped", "dropped", "truncated", "shards")
  lines = [header]
  for name, e in manifest["sources"].items():
    lines.append((name, *(f"{e[k]:,}" for k in header[1:-1]), str(len(e["shards"]))))
  widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
  rows = [
    "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))) for line in lines
  ]
  examples = sum(e["examples"] for e in manifest["sources"].values())
  title = (
    f"prepared {examples:,} examples in {manifest['prepare_s']:.1f} s"
    f" ({examples / max(manifest['prepare_s'], 1e-9):,.0f} examples/s, {manifest['num_workers']} workers"
    f" x {manifest['num_processes']} processes)"
  )
  return "\n".join([title] + rows)


def main(argv: list[str]) -> None:
  """The command: see the module docstring."""
  del argv
  import jax

  from csft_jax import distributed

  f = flags.FLAGS
  distributed.initialize_from_flags()
  config = configuration.from_flags()
  data = configuration.training_data_config(config)
  manifest = prepare(
    data, num_workers=f.num_workers, process_index=jax.process_index(), process_count=jax.process_count(), force=f.force
  )
  if f.json and manifest is not None:
    sources = {
      n: {k: e[k] for k in ("records", "examples", "tokens", "loss_tokens", "skipped", "dropped", "truncated")}
      | {"shards": len(e["shards"])}
      for n, e in manifest["sources"].items()
    }
    print(
      json.dumps(
        dict(
          cache_dir=data.cache_dir,
          build=manifest["build"],
          prepare_s=manifest["prepare_s"],
          num_workers=manifest["num_workers"],
          sources=sources,
        ),
        ensure_ascii=False,
      )
    )


def define_flags() -> None:
  """Command-line flags, defined only when run as a program."""
  from csft_jax import distributed

  configuration.define_config_flag("Config file with a `data` field (data.cache_dir set).")
  distributed.define_flags()
  flags.DEFINE_integer("num_workers", 0, "Tokenizer processes on this host; 0 = one per core (none below 32 MiB).")
  flags.DEFINE_bool("force", False, "Rebuild even when the cache matches the config.")
  flags.DEFINE_bool("json", False, "Print a JSON summary as the last line.")


if __name__ == "__main__":
  from csft_jax.console import run_cli

  define_flags()
  run_cli(main)
