"""Errors raised for bad data, always naming the source and the place in a file."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Location:
  """Where a record came from: a file, a 1-based line and/or item (row) number."""

  path: str
  line: int | None = None
  item: int | None = None  # Item of a JSON list or row of a Parquet file.

  def __str__(self) -> str:
    where = self.path if self.line is None else f"{self.path}:{self.line}"
    return where if self.item is None else f"{where} (item {self.item})"


class DataError(ValueError):
  """Bad input data or data config; the message says where and what to do."""


class RecordError(ValueError):
  """One record cannot be used; the loader adds the source name and location.

  With `config.data.on_error = "skip"` these are counted and skipped, while a
  `DataError` always stops the run.
  """

  def __init__(self, message: str, location: Location | None = None):
    super().__init__(message)
    self.location = location


class RecordLeftOut(Exception):
  """A record that a source's own options leave out on purpose (e.g. meds_ins `split_types`).

  Not an error: the loader counts it in `SourceStats.left_out`, and fails only when a source's
  options leave out every record.
  """
