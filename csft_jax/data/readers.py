"""Readers: files -> (record dict, Location) pairs, for JSON, JSONL, CSV and Parquet.

Every record carries the file and 1-based line (JSON/JSONL/CSV) or row
(Parquet) it came from, so that errors downstream can point at it.
"""

import csv
import glob
import io
import json
import os
from collections.abc import Callable, Generator, Iterator
from typing import Any

from csft_jax.configuration import resolve_path
from csft_jax.data.errors import DataError, Location, RecordError

READERS = ("auto", "json", "jsonl", "csv", "parquet")
_DECODER = json.JSONDecoder()
_EXTENSIONS = {".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}
# Tried in this order to suggest `encoding=` when a file does not decode.
_ENCODING_CANDIDATES = ("utf-8", "gb18030", "utf-16", "big5")

Record = tuple[dict[str, Any], Location]


def resolve_paths(source: str, path: str) -> list[str]:
  """Expands a file, directory or glob into a sorted list of data files.

  Args:
    source: source name, for errors.
    path: file, directory (all known data files directly inside) or glob,
      resolved by `csft_jax.configuration.resolve_path`.

  Returns:
    Absolute file paths, sorted so that reading order is deterministic.
  """
  full = os.path.normpath(resolve_path(path))
  if any(c in path for c in "*?["):
    files = sorted(f for f in glob.glob(full, recursive=True) if os.path.isfile(f))
    if not files:
      raise DataError(f"source {source!r}: glob {path!r} (tried {full}) matches no files")
    return files
  if os.path.isdir(full):
    files = sorted(os.path.join(full, f) for f in os.listdir(full) if os.path.splitext(f)[1] in _EXTENSIONS)
    if not files:
      raise DataError(f"source {source!r}: directory {full} holds no {'/'.join(_EXTENSIONS)} files")
    return files
  if not os.path.isfile(full):
    raise DataError(
      f"source {source!r}: path {path!r} not found (tried {full}); relative paths are relative to the current directory"
    )
  return [full]


def read_records(
  source: str,
  path: str,
  reader: str,
  encoding: str,
  own: Callable[[str, str, str], Iterator[Record | RecordError]] | None = None,
) -> Iterator[Record | RecordError]:
  """Yields the records of one file in file order.

  A record that cannot be parsed on its own (a malformed JSONL line) is
  yielded as a `RecordError` carrying its location, so that the caller can
  skip it; errors that spoil the whole file raise `DataError`.

  Args:
    source: source name, for errors.
    path: the file.
    reader: one of READERS; "auto" picks by extension and, for .json, by
      content (a file starting with '{' is read as JSON lines).
    encoding: text encoding of JSON/JSONL/CSV files.
    own: the source format's own reader of a decoded file (`adapters.Format.read`), which then
      reads every file of the source (`parse_sources` refuses a `reader` beside it).
  """
  if own is not None:
    yield from own(source, path, _decode(source, path, encoding))
    return
  if reader not in READERS:
    raise DataError(f"source {source!r}: reader {reader!r} is not one of {READERS}")
  if reader == "auto":
    reader = _EXTENSIONS.get(os.path.splitext(path)[1].lower())
    if reader is None:
      raise DataError(
        f"source {source!r}: cannot tell the format of {path} from its extension; set reader= to one of {READERS[1:]}"
      )
  if reader == "parquet":
    yield from _read_parquet(path)
    return
  text = _decode(source, path, encoding)
  if reader == "json" and text.lstrip()[:1] == "{":
    reader = "jsonl"  # Common in the wild: JSON lines in a file named .json.
  if reader == "json":
    yield from _read_json_list(source, path, text)
  elif reader == "jsonl":
    yield from _read_jsonl(path, text)
  else:
    yield from _read_csv(source, path, text)


def _decode(source: str, path: str, encoding: str) -> str:
  with open(path, "rb") as f:
    raw = f.read()
  try:
    text = raw.decode(encoding)
  except UnicodeDecodeError as e:
    line = raw[: e.start].count(b"\n") + 1
    fits = [c for c in _ENCODING_CANDIDATES if c != encoding and _decodes(raw, c)]
    hint = f"set encoding={fits[0]!r} on this source" if fits else "set encoding= to the file's encoding"
    raise DataError(
      f"source {source!r}: {path}:{line} is not valid {encoding}"
      f" (byte 0x{raw[e.start]:02x} at offset {e.start}); {hint}"
    ) from None
  return text.removeprefix("\ufeff")


def _decodes(raw: bytes, encoding: str) -> bool:
  try:
    raw.decode(encoding)
  except UnicodeDecodeError:
    return False
  return True


def _read_jsonl(path: str, text: str) -> Iterator[Record | RecordError]:
  for i, line in enumerate(text.splitlines(), start=1):
    if not line.strip():
      continue
    location = Location(path, i)
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      yield RecordError(f"malformed JSON line: {e.msg} at column {e.colno}", location)
      continue
    if not isinstance(record, dict):
      yield RecordError(f"expected a JSON object, found {type(record).__name__}", location)
      continue
    yield record, location


def _read_json_list(source: str, path: str, text: str) -> Iterator[Record | RecordError]:
  """Parses a JSON list item by item so that each record knows its line."""
  pos = skip_space(text, 0)
  if text[pos : pos + 1] != "[":
    raise DataError(f"source {source!r}: {path}:1 expected a JSON list of records or JSON lines")
  for item, (record, line) in enumerate(iter_json_array(source, path, text, pos, "JSON list"), start=1):
    if isinstance(record, dict):
      yield record, Location(path, line, item)
    else:
      yield RecordError(f"expected a JSON object, found {type(record).__name__}", Location(path, line, item))


def decode_json(source: str, path: str, text: str, pos: int) -> tuple[Any, int]:
  """The JSON value at `text[pos]` and the position after it; `DataError` at its line:column."""
  try:
    return _DECODER.raw_decode(text, pos)
  except json.JSONDecodeError as e:
    raise DataError(f"source {source!r}: {path}:{e.lineno}:{e.colno} malformed JSON ({e.msg}); fix the file") from None


def iter_json_array(source: str, path: str, text: str, pos: int, what: str) -> Generator[tuple[Any, int], None, int]:
  """Yields the items of the JSON array that opens at `text[pos]` ('[') one at a time, each with the
  1-based line it starts on (so that errors downstream point at it); returns the position after the
  closing ']'. The one scanner with line numbers: JSON-list sources (streamed: a `max_samples` cap
  decodes no further) and MedS-Ins task files' `Instances`."""
  pos = skip_space(text, pos + 1)
  line, counted_to = 1, 0
  while text[pos : pos + 1] != "]":
    line += text.count("\n", counted_to, pos)
    counted_to = pos
    value, pos = decode_json(source, path, text, pos)
    yield value, line
    pos = skip_space(text, pos)
    if text[pos : pos + 1] == ",":
      pos = skip_space(text, pos + 1)
    elif text[pos : pos + 1] != "]":
      line += text.count("\n", counted_to, pos)
      raise DataError(f"source {source!r}: {path}:{line} malformed {what}: expected ',' or ']'")
  return pos + 1


def scan_json_array(source: str, path: str, text: str, pos: int, what: str) -> tuple[list[tuple[Any, int]], int]:
  """`iter_json_array`'s items as a list, and the position after the closing ']'."""
  items, scanner = [], iter_json_array(source, path, text, pos, what)
  while True:
    try:
      items.append(next(scanner))
    except StopIteration as end:
      return items, end.value


def skip_space(text: str, pos: int) -> int:
  """The position of the first non-whitespace character at or after `pos`."""
  while pos < len(text) and text[pos] in " \t\r\n":
    pos += 1
  return pos


def _read_csv(source: str, path: str, text: str) -> Iterator[Record | RecordError]:
  reader = csv.DictReader(io.StringIO(text, newline=""))
  if not reader.fieldnames:
    raise DataError(f"source {source!r}: {path}:1 CSV file has no header row")
  line = 2
  for row in reader:
    # DictReader puts surplus cells under the None key: a misquoted row.
    extra = row.pop(None, None)
    if extra:
      yield RecordError(
        f"row has {len(extra)} more cells than the header {reader.fieldnames}; check the quoting", Location(path, line)
      )
    else:
      yield row, Location(path, line)
    line = reader.line_num + 1


def _read_parquet(path: str) -> Iterator[Record]:
  import pyarrow.parquet as pq  # Only needed for Parquet sources.

  for i, record in enumerate(pq.read_table(path).to_pylist(), start=1):
    yield record, Location(path, item=i)
