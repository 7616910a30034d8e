"""Assembles the data pipeline: config.data -> tokenized sources -> mixture -> batches.

Trainer entry points:
  pipeline = DataPipeline(config.data)
  ds = pipeline.train_dataset(global_batch_size, process_index, process_count)
  it = iter(ds)  # grain DatasetIterator: get_state()/set_state(), Orbax-checkpointable
  pipeline.val_batches(global_batch_size, process_index, process_count)
or `make_train_dataset(config.data, global_batch_size=...)` for the first two.

Guarantees: the same config and seed give the same stream of batches. The
stream is infinite and does not depend on the number of training steps, so a
restored iterator continues exactly even if the run length changed. Row r of
global batch k is the k-th row of row stream r, which packs only mixture
elements r, r + B, r + 2B, ... (B = global batch size); a process reads and
packs only the streams of its own rows, and its batch is rows
[p * b, (p + 1) * b) of the single-process global batch (b = B / processes).

With `config.data.cache` = "require" (or "auto") the sources come from the tokenize-once
cache (`csft_jax.data.cache`) instead: start-up reads the manifest and opens one Grain
ArrayRecord data source per source, and examples are read by random access, so start-up
time and memory do not grow with the collection. The batches are bitwise the same as
without the cache (same examples in the same order, same split, same mixture).
"""

import math
from collections.abc import Sequence

import grain
import ml_collections
import numpy as np
from absl import logging

from csft_jax.data import cache
from csft_jax.data.errors import DataError
from csft_jax.data.examples import TokenizedSource, tokenize_source
from csft_jax.data.holdout import held_out_indices, split_validation
from csft_jax.data.mixture import block_counts, mix_sources, mixture_weights
from csft_jax.data.packing import PACKINGS, ROW_KEYS, TrainingExample, packed_rows, padded_rows, stack_rows
from csft_jax.data.sources import SourceSpec, SourceStats, load_conversations, parse_sources
from csft_jax.data.templates import ChatTemplate, load_chat_template
from csft_jax.data.tokenizer import load_tokenizer

Source = TokenizedSource | cache.CachedSource


class DataPipeline:
  """Loads every source once (or opens its cache); builds train and val batches from them."""

  def __init__(self, data_config: ml_collections.ConfigDict):
    """Reads, adapts and tokenizes all sources, or opens their cache; raises `DataError` on bad data.

    Args:
      data_config: `config.data` (see `csft_jax.data.config.default_config`).
    """
    self.config = data_config
    if data_config.packing not in PACKINGS:
      raise DataError(f"config.data.packing={data_config.packing!r} is not one of {PACKINGS}")
    if data_config.seq_len < 2:
      raise DataError(f"config.data.seq_len={data_config.seq_len} must be at least 2")
    if not data_config.tokenizer:
      raise DataError(
        "config.data.tokenizer is not set: name a tokenizer directory (the trainer takes "
        "config.init.from_hf's when it is empty)"
      )
    mode = data_config.get("cache", "off")  # Configs stored before the cache existed have no field.
    if mode not in cache.CACHE_MODES:
      raise DataError(f"config.data.cache={mode!r} is not one of {cache.CACHE_MODES}")
    specs = parse_sources(data_config.sources)
    self.tokenizer = load_tokenizer(data_config.tokenizer)
    self.template: ChatTemplate = load_chat_template(data_config.chat_template, self.tokenizer)
    self.source_names: list[str] = [s.name for s in specs]
    self.train_sources: list[Source] = []
    self.val_sources: list[Source | None] = []
    sources = list(self._tokenized_sources(specs) if mode == "off" else _cached_sources(data_config, specs))
    # Held-out examples (indices into each source's examples), e.g. to see what eval loss is on.
    self.held_out: list[np.ndarray] = held_out_indices(
      [len(s) for s in sources],
      data_config.val_fraction,
      data_config.seed,
      data_config.get("val_split", "per_source"),
      self.source_names,
    )
    for source, held_out in zip(sources, self.held_out):
      train, val = split_validation(source, held_out)
      self.train_sources.append(train)
      self.val_sources.append(val)
    self.weights = mixture_weights(
      data_config.mixing,
      self.source_names,
      [len(s) for s in self.train_sources],
      [s.weight for s in specs],
      data_config.temperature,
    )
    self.block_counts = block_counts(self.weights, data_config.mixture_block, self.source_names)
    weighted = [s.name for s in specs if s.weight is not None]
    # A weight is read by explicit mixing only: say so rather than let an override do nothing.
    self.ignored_weights = weighted if data_config.mixing != "explicit" else []

  def _tokenized_sources(self, specs: Sequence[SourceSpec]):
    for spec in specs:
      records, stats = load_conversations(spec, self.config.on_error)
      yield tokenize_source(spec.name, records, stats, self.template, self.config.seq_len, self.config.overlong)

  @property
  def stats(self) -> list[SourceStats]:
    return [s.stats for s in self.train_sources]

  @property
  def num_examples(self) -> int:
    """Training examples in one epoch of the mixture (all sources, after caps and drops)."""
    return sum(len(s) for s in self.train_sources)

  @property
  def num_tokens(self) -> int:
    """Expected tokens in one epoch of the mixture: num_examples draws at the target weights."""
    mean_len = [s.num_tokens / len(s) for s in self.train_sources]
    return int(round(self.num_examples * float(np.dot(self.weights, mean_len))))

  def examples(self) -> grain.MapDataset:
    """The infinite mixed stream of unpacked training examples."""
    sources = [_source_dataset(s, i) for i, s in enumerate(self.train_sources)]
    return mix_sources(sources, self.block_counts, self.config.seed)

  def train_example(self, source_index: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """(token_ids, loss_mask) of training example `index` of a source, in source order."""
    source = self.train_sources[source_index]
    if isinstance(source, cache.CachedSource):
      return source[index]
    return source.token_ids[index], source.loss_masks[index]

  def train_lengths(self, source_index: int) -> np.ndarray:
    """Tokens per training example of a source."""
    source = self.train_sources[source_index]
    if isinstance(source, cache.CachedSource):
      return np.asarray(source.lengths)
    return np.fromiter((len(t) for t in source.token_ids), dtype=np.int64, count=len(source))

  def train_dataset(self, global_batch_size: int, process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """Infinite batches for this process: dicts of int32 [global_batch_size // process_count, seq_len].

    Keys: input_ids, target_ids, loss_mask, segment_ids, positions, source_ids.
    """
    rows = _process_rows(global_batch_size, process_index, process_count)
    examples = self.examples()
    streams = [self._rows(examples[r::global_batch_size]) for r in rows]
    return stack_rows(streams)

  def _rows(self, examples: grain.MapDataset) -> grain.IterDataset:
    if self.config.packing == "packed":
      return packed_rows(examples, self.config.seq_len, self.config.num_packing_bins)
    return padded_rows(examples, self.config.seq_len)

  def val_batches(
    self, global_batch_size: int, process_index: int = 0, process_count: int = 1
  ) -> list[dict[str, np.ndarray]]:
    """Fixed held-out batches (every val example once), same keys and shapes as train.

    Rows are packed (or padded) from the val examples of all sources in source
    order; the last batch is filled with empty rows (loss_mask 0).
    """
    rows_of_process = _process_rows(global_batch_size, process_index, process_count)
    sources = [_source_dataset(s, i) for i, s in enumerate(self.val_sources) if s is not None]
    if not sources:
      return []
    rows = list(self._rows(grain.MapDataset.concatenate(sources)))
    empty = {k: np.zeros(self.config.seq_len, dtype=np.int32) for k in ROW_KEYS}
    rows += [empty] * (-len(rows) % global_batch_size)
    return [
      {k: np.stack([rows[start + r][k] for r in rows_of_process]) for k in ROW_KEYS}
      for start in range(0, len(rows), global_batch_size)
    ]

  def estimate_steps_per_epoch(self, global_batch_size: int, num_batches: int = 4) -> int:
    """Steps for one mixture epoch (num_examples draws), from examples per batch in the first batches."""
    it = iter(self.train_dataset(global_batch_size))
    segments = sum(int(_count_segments(next(it)["segment_ids"])) for _ in range(num_batches))
    return math.ceil(self.num_examples * num_batches / max(segments, 1))

  def mixture_rows(self, num_epochs: float = 1.0) -> list[dict]:
    """Per source: examples, tokens, target weight, expected epochs over the run, drop counts."""
    out = []
    for source, weight in zip(self.train_sources, self.weights):
      s = source.stats
      out.append(
        dict(
          source=source.name,
          examples=len(source),
          tokens=source.num_tokens,
          target_weight=float(weight),
          expected_epochs=float(weight * self.num_examples * num_epochs / len(source)),
          skipped=s.skipped,
          dropped=s.dropped,
          truncated=s.truncated,
        )
      )
    return out

  def mixture_table(self, num_epochs: float = 1.0) -> str:
    """The mixture as a text table, for the start of a run."""
    header = ("source", "examples", "tokens", "weight", "epochs", "skipped", "dropped", "truncated")
    lines = [header]
    for r in self.mixture_rows(num_epochs):
      lines.append(
        (
          r["source"],
          str(r["examples"]),
          str(r["tokens"]),
          f"{r['target_weight']:.4f}",
          f"{r['expected_epochs']:.2f}",
          str(r["skipped"]),
          str(r["dropped"]),
          str(r["truncated"]),
        )
      )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    title = (
      f"mixture: {self.config.mixing}"
      + (f" (T={self.config.temperature})" if self.config.mixing == "temperature" else "")
      + f", {self.num_examples} examples/epoch, epochs over {num_epochs:g} mixture epoch(s)"
    )
    rows = [
      "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))) for line in lines
    ]
    notes = (
      [
        f"note: config.data.sources.<name>.weight is set for {self.ignored_weights} but mixing is "
        f"{self.config.mixing!r}; weights are read only with config.data.mixing=explicit."
      ]
      if self.ignored_weights
      else []
    )
    return "\n".join([title] + rows + notes)


def _source_dataset(source: Source, source_index: int) -> grain.MapDataset:
  """A source's examples as (token_ids, loss_mask) -> unpacked row features."""
  if isinstance(source, cache.CachedSource):
    examples = grain.MapDataset.source(source)  # Random access into the ArrayRecord shards.
  else:
    examples = grain.MapDataset.source(list(zip(source.token_ids, source.loss_masks)))
  return examples.map(TrainingExample(source_index))


def _cached_sources(data_config: ml_collections.ConfigDict, specs: Sequence[SourceSpec]) -> list[cache.CachedSource]:
  """The sources from the cache; under cache="auto" an absent or stale cache is built first."""
  if not data_config.cache_dir:
    raise DataError(
      f"config.data.cache={data_config.cache!r} needs config.data.cache_dir: name the directory"
      " of the tokenized cache (or set config.data.cache='off')"
    )
  try:
    manifest = cache.open_cache(data_config, specs)
  except cache.CacheError as e:
    if data_config.cache != "auto":
      raise
    import jax

    from csft_jax.data import prepare

    logging.warning("building the data cache (config.data.cache='auto'): %s", e)
    manifest = prepare.prepare(
      data_config, process_index=jax.process_index(), process_count=jax.process_count(), wait=True
    )
  return [cache.cached_source(data_config.cache_dir, manifest, spec.name) for spec in specs]


def _process_rows(global_batch_size: int, process_index: int, process_count: int) -> range:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise DataError(f"process_index={process_index} must be in [0, process_count={process_count})")
  if global_batch_size % process_count:
    raise DataError(f"global_batch_size={global_batch_size} is not divisible by process_count={process_count}")
  per_process = global_batch_size // process_count
  return range(process_index * per_process, (process_index + 1) * per_process)


def _count_segments(segment_ids: np.ndarray) -> int:
  """Number of examples in a batch: distinct nonzero segment ids per row."""
  return int(segment_ids.max(axis=-1).sum())


def make_train_dataset(
  data_config: ml_collections.ConfigDict,
  *,
  global_batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
  num_epochs: float = 1.0,
) -> tuple[grain.IterDataset, DataPipeline]:
  """Builds the pipeline, logs its mixture table and returns (train dataset, pipeline).

  Args:
    data_config: `config.data`.
    global_batch_size: rows per global batch.
    process_index, process_count: this host's place (jax.process_index/count()).
    num_epochs: run length in mixture epochs, for the table's expected epochs.
  """
  pipeline = DataPipeline(data_config)
  logging.info("%s", pipeline.mixture_table(num_epochs))
  return pipeline.train_dataset(global_batch_size, process_index, process_count), pipeline


def source_fractions(batches: Sequence[dict[str, np.ndarray]], num_sources: int) -> tuple[np.ndarray, np.ndarray]:
  """Realized (example, token) fractions per source over some batches."""
  examples = np.zeros(num_sources)
  tokens = np.zeros(num_sources)
  for b in batches:
    seg, src = b["segment_ids"], b["source_ids"]
    # An example starts where a nonzero segment begins (position 0).
    starts = (seg > 0) & (b["positions"] == 0)
    examples += np.bincount(src[starts], minlength=num_sources)
    tokens += np.bincount(src[seg > 0], minlength=num_sources)
  return examples / max(examples.sum(), 1), tokens / max(tokens.sum(), 1)
