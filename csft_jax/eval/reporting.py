"""Evaluation files: benchmark JSON read with located errors, outputs written atomically.

Every writer goes through `write_text_atomic`: the text lands in a temporary file
in the destination folder and is renamed over the target only when complete, so
a crash or a bad input never leaves a half-written results file behind.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def read_json(path: str | os.PathLike, *, expect: type, what: str, error: type[Exception]) -> Any:
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


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
  """Writes `text` (UTF-8) to `path` via a temp file + rename; creates parent folders."""
  target = Path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
      handle.write(text)
    os.replace(tmp_name, target)
  except BaseException:
    Path(tmp_name).unlink(missing_ok=True)
    raise
  return target


def write_json_atomic(path: str | os.PathLike, payload: Any) -> Path:
  """Writes `payload` as indented UTF-8 JSON (Chinese kept readable)."""
  return write_text_atomic(path, json.dumps(payload, ensure_ascii=False, indent=2) + "\n")


def write_csv_atomic(
    path: str | os.PathLike, header: Sequence[str], rows: Sequence[Sequence[Any]]
) -> Path:
  """Writes a CSV with `header` then `rows` (quoted as the csv module does)."""
  buffer = io.StringIO()
  writer = csv.writer(buffer)
  writer.writerow(header)
  for row in rows:
    if len(row) != len(header):
      raise ValueError(f"CSV row has {len(row)} fields, header {list(header)} has {len(header)}.")
    writer.writerow(row)
  return write_text_atomic(path, buffer.getvalue())


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A GitHub markdown table; floats shown with two decimals."""

  def cell(value: Any) -> str:
    text = f"{value:.2f}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")

  lines = [
      "| " + " | ".join(cell(h) for h in header) + " |",
      "|" + "|".join("---" for _ in header) + "|",
  ]
  lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
  return "\n".join(lines) + "\n"
