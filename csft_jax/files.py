"""Files a run writes and reads: atomic writes, and JSON read with located errors.

Every writer puts the text in a temporary file in the destination folder and renames it over the
target only when complete, so a crash, a signal or a bad input never leaves a half-written file:
a reader sees the previous version or the new one.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
  """Writes `text` (UTF-8) to `path` via a temp file + rename; creates parent folders."""
  target = Path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
      handle.write(text)
    os.chmod(tmp_name, 0o666 & ~_umask())  # mkstemp makes 0600; others must read results too
    os.replace(tmp_name, target)
  except BaseException:
    Path(tmp_name).unlink(missing_ok=True)
    raise
  return target


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def json_text(payload: Any) -> str:
  """`payload` as indented JSON text (Chinese kept readable; other objects as `str`)."""
  return json.dumps(payload, ensure_ascii=False, indent=2, default=str) + "\n"


def write_json_atomic(path: str | os.PathLike, payload: Any) -> Path:
  """Writes `payload` as indented UTF-8 JSON (`json_text`)."""
  return write_text_atomic(path, json_text(payload))


def csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A CSV with `header` then `rows` (quoted as the csv module does)."""
  buffer = io.StringIO()
  writer = csv.writer(buffer)
  writer.writerow(header)
  for row in rows:
    if len(row) != len(header):
      raise ValueError(f"CSV row has {len(row)} fields, header {list(header)} has {len(header)}.")
    writer.writerow(row)
  return buffer.getvalue()


def write_csv_atomic(path: str | os.PathLike, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
  """Writes `csv_text(header, rows)` atomically."""
  return write_text_atomic(path, csv_text(header, rows))


def read_json(
  path: str | os.PathLike, *, expect: type = dict, what: str = "fields", error: type[Exception] = ValueError
) -> Any:
  """Reads a JSON file that must hold a `expect` (list or dict) of `what`.

  Raises:
    `error` naming the file (and line, for a syntax error) and what was expected.
  """
  try:
    with open(path, encoding="utf-8") as handle:
      data = json.load(handle)
  except FileNotFoundError:
    raise error(f"{path}: file not found (expected a JSON {expect.__name__} of {what}).") from None
  except json.JSONDecodeError as e:
    raise error(f"{path}:{e.lineno}: not valid JSON ({e.msg}).") from None
  if not isinstance(data, expect):
    raise error(f"{path}: expected a JSON {expect.__name__} of {what}, found {type(data).__name__}.")
  return data


def read_json_if_exists(path: str | os.PathLike, *, error: type[Exception] = ValueError) -> dict[str, Any] | None:
  """A JSON object file, or None when the file does not exist (yet)."""
  if not os.path.isfile(path):
    return None
  return read_json(path, expect=dict, error=error)


def check_writable(directory: str | os.PathLike, what: str) -> None:
  """Fails now, before any work, when `directory` could not be created or written; creates nothing.

  Raises:
    PermissionError naming `what` (e.g. "config.out_dir") and the directory.
  """
  directory = Path(os.path.abspath(directory))
  existing = directory
  while not existing.exists():
    existing = existing.parent
  if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
    problem = "is not a directory" if not existing.is_dir() else "is not writable"
    raise PermissionError(f"{what}: cannot write to {directory} ({existing} {problem}); choose a writable directory.")


def fingerprint(settings: dict[str, Any], paths: Sequence[str] = ()) -> str:
  """A digest of `settings` and of each file's `(path, size, mtime_ns)`: it changes with a setting or
  with a file rewritten in place (what a journal's header keys its records by)."""
  stamps = [(path, stat.st_size, stat.st_mtime_ns) for path in sorted(paths) for stat in [os.stat(path)]]
  return hashlib.sha1(json.dumps([settings, stamps], sort_keys=True, default=str).encode()).hexdigest()


class JsonlJournal:
  """An append-only JSON-lines file: a header line `{"fingerprint": ...}`, then one record a line,
  each flushed to disk as it is written (`write`), so a kill loses at most the line in flight.

  Opening it reads the records back (`records`), without a last line a kill cut off; a journal with
  another fingerprint is set aside as `<path>.old` and a new one begun. Only the `primary` process
  (of several sharing the file system) writes: the others read.
  """

  def __init__(self, path: str, fingerprint: str, *, primary: bool = True, written_by: str = "other settings"):
    self.path, self.primary = path, primary
    lines, entries = _complete_json_lines(path)
    if entries and entries[0].get("fingerprint") != fingerprint:
      from absl import logging

      logging.warning("%s was written with %s; moved to %s.old and starting over.", path, written_by, path)
      if primary:
        os.replace(path, path + ".old")
      lines, entries = [], []
    self.records: list[dict[str, Any]] = entries[1:]
    self._handle = None
    if primary:
      if os.path.isfile(path) and os.path.getsize(path) != sum(len(line) + 1 for line in lines):
        write_text_atomic(path, "".join(line.decode() + "\n" for line in lines))  # drop a cut-off tail
      os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
      self._handle = open(path, "a", encoding="utf-8")
      if not lines:
        self.write({"fingerprint": fingerprint})

  def write(self, record: dict[str, Any]) -> None:
    """Appends `record` and flushes it to disk (nothing on a process that is not primary)."""
    if self._handle is None:
      return
    self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    self._handle.flush()
    os.fsync(self._handle.fileno())

  def close(self) -> None:
    if self._handle is not None:
      self._handle.close()


def _complete_json_lines(path: str) -> tuple[list[bytes], list[dict[str, Any]]]:
  """The complete lines of a JSON-lines file and their objects: a last line cut off is dropped, be it
  the header or cut inside a multi-byte character."""
  if not os.path.isfile(path):
    return [], []
  with open(path, "rb") as handle:
    pieces = handle.read().split(b"\n")
  complete, entries = [], []
  for line in pieces:
    try:
      entries.append(json.loads(line.decode("utf-8")))
    except (UnicodeDecodeError, json.JSONDecodeError):
      break
    complete.append(line)
  return complete, entries
