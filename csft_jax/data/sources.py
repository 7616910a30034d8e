"""Source registry: `config.data.sources` -> validated specs -> conversations.

Each source is read file by file in sorted order and record by record in
file order, so the conversations of a source are deterministic.
"""

import dataclasses
import math
from collections.abc import Iterator, Mapping
from typing import Any

from csft_jax.data.adapters import DEFAULT_COLUMNS, FORMATS
from csft_jax.data.conversation import Conversation
from csft_jax.data.errors import DataError, Location, RecordError, RecordLeftOut
from csft_jax.data.readers import read_records, resolve_paths

ON_ERROR = ("raise", "skip")


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  """One validated entry of `config.data.sources`."""

  name: str
  paths: tuple[str, ...]
  format: str
  weight: float | None
  max_samples: int | None
  encoding: str
  reader: str
  options: Mapping[str, Any]  # Adapter options, incl. the merged `columns`.


@dataclasses.dataclass
class SourceStats:
  """What happened to a source's records, for the mixture table and reports."""

  records: int = 0  # Records read (after the max_samples cap).
  skipped: int = 0  # Bad records skipped with on_error="skip".
  dropped: int = 0  # Over-long examples dropped (or left with nothing to train on).
  truncated: int = 0  # Over-long examples truncated to seq_len.
  examples: int = 0  # Examples kept, train and val.
  tokens: int = 0  # Tokens of the kept examples.
  loss_tokens: int = 0  # Trained (assistant) tokens of the kept examples.
  first_skip: str | None = None  # The first skipped record's error, to show people.
  left_out: int = 0  # Records the source's options leave out (e.g. meds_ins split_types).
  first_left_out: str | None = None  # Why the first of them was left out.


@dataclasses.dataclass(frozen=True)
class SourceRecord:
  """A conversation with the raw record and place it came from."""

  conversation: Conversation
  record: Mapping[str, Any]
  location: Location


def parse_sources(sources_config) -> list[SourceSpec]:
  """Validates `config.data.sources` (name -> ConfigDict) into specs, in config order.

  A source whose `enabled` is False is left out (drop a source from the command line with
  `--config.data.sources.NAME.enabled=False`).
  """
  if not sources_config or not len(sources_config):
    raise DataError("config.data.sources is empty; add at least one source")
  specs = []
  for name, cfg in sources_config.items():
    if not cfg.get("enabled", True):
      continue
    where = f"config.data.sources.{name}"
    if cfg.get("format") not in FORMATS:
      raise DataError(f"{where}.format={cfg.get('format')!r} is not one of {sorted(FORMATS)}")
    if not cfg.get("path"):
      raise DataError(f"{where}.path is not set")
    weight = cfg.get("weight")
    if weight is not None and not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
      raise DataError(f"{where}.weight={weight!r}: weights must be finite and > 0 (or None)")
    max_samples = cfg.get("max_samples")
    if max_samples is not None and (not isinstance(max_samples, int) or max_samples <= 0):
      raise DataError(f"{where}.max_samples={max_samples!r}: must be a positive integer or None")
    columns = dict(DEFAULT_COLUMNS.get(cfg.format, {}))
    user_columns = cfg.get("columns") or {}
    columns.update(user_columns.to_dict() if hasattr(user_columns, "to_dict") else user_columns)
    options = {
      k: v
      for k, v in cfg.items()
      if k not in ("path", "format", "weight", "max_samples", "encoding", "reader", "columns", "enabled")
    }
    options["columns"] = columns
    reader = cfg.get("reader") or "auto"
    if FORMATS[cfg.format].read is not None:  # the format reads its files itself
      if reader not in ("auto", cfg.format):  # reader='meds_ins' once named the format's own reader
        raise DataError(f"source {name!r}: its format reads its files with its own reader; remove reader={reader!r}")
      reader = "auto"
    specs.append(
      SourceSpec(
        name=name,
        paths=tuple(resolve_paths(name, cfg.path)),
        format=cfg.format,
        weight=None if weight is None else float(weight),
        max_samples=max_samples,
        encoding=cfg.get("encoding") or "utf-8",
        reader=reader,
        options=options,
      )
    )
  if not specs:
    raise DataError(f"config.data.sources: every source is disabled ({sorted(sources_config)}); enable one")
  return specs


def file_records(spec: SourceSpec, path: str):
  """The records of one of the source's files, read by its format's own reader or its `reader`."""
  return read_records(spec.name, path, spec.reader, spec.encoding, own=FORMATS[spec.format].read)


def load_conversations(spec: SourceSpec, on_error: str) -> tuple[list[SourceRecord], SourceStats]:
  """Reads and adapts a source's records: the first `max_samples` records read (bad or left out ones count).

  Args:
    spec: the source.
    on_error: "raise" stops at the first bad record with its source, file and
      line; "skip" counts it in `SourceStats.skipped` and goes on.

  Returns:
    The source's records in file order, and its stats so far.
  """
  stats = SourceStats()
  return list(iter_conversations(spec, on_error, stats)), stats


def iter_conversations(spec: SourceSpec, on_error: str, stats: SourceStats) -> Iterator[SourceRecord]:
  """`load_conversations` one record at a time (the cache streams sources); counts go to `stats`."""
  if on_error not in ON_ERROR:
    raise DataError(f"config.data.on_error={on_error!r} is not one of {ON_ERROR}")
  adapter = FORMATS[spec.format].adapt
  kept = 0
  # max_samples counts records read, as LLaMA-Factory's `dataset.select(range(max_samples))` before
  # its conversion: a record that is left out or skipped still counts.
  for path in spec.paths:
    if spec.max_samples is not None and stats.records >= spec.max_samples:
      break
    for item in file_records(spec, path):
      if spec.max_samples is not None and stats.records >= spec.max_samples:
        break
      stats.records += 1
      try:
        if isinstance(item, RecordError):
          raise item
        record, location = item
        try:
          conversation = adapter(record, spec.options)
        except RecordError as e:
          e.location = location
          raise
        except RecordLeftOut as e:
          stats.left_out += 1
          stats.first_left_out = stats.first_left_out or str(e)
          continue
      except RecordError as e:
        message = f"source {spec.name!r}, {e.location}: {e} (format {spec.format!r})"
        if on_error == "raise":
          raise DataError(message + "; fix the record or set config.data.on_error='skip'") from None
        stats.skipped += 1
        stats.first_skip = stats.first_skip or message
        continue
      kept += 1
      yield SourceRecord(conversation, record, location)
  if not kept:
    why = f"all {stats.records} records were bad; first: {stats.first_skip}" if stats.records else "no records"
    if stats.left_out:
      why = (
        f"the source's options leave out {stats.left_out} of its {stats.records} records and"
        f" {stats.skipped} were bad; first left out: {stats.first_left_out}"
      )
    raise DataError(f"source {spec.name!r}: {why} in {list(spec.paths)}")
