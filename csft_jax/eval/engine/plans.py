"""Batch planning: which prompts run together, padded to which length, with which shared prefix.

Prompts are sorted by length and cut into batches; each batch is left-padded to a bucket length
(`BUCKETS_PER_OCTAVE` steps between powers of two, at least `MIN_BUCKET`) and the last, short batch
to a power-of-two row count, so a run compiles one program per distinct (rows, bucket) pair: a
handful, whatever the number of prompts. Prompts that start alike are batched together when
prefilling their common prefix once saves work (`plan_generation`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from absl import logging
from jax.sharding import Mesh

from csft_jax.models import Decoder

MIN_BUCKET = 16
# Finer than powers of two: prefill cost grows with the padded length, so a bucket wastes at most
# ~1/BUCKETS_PER_OCTAVE of it, at the price of up to BUCKETS_PER_OCTAVE programs per octave (HF pads
# only to the batch's longest prompt: coarser buckets cost our prefill its margin on long prompts).
BUCKETS_PER_OCTAVE = 8
# A shared prefix shorter than this is prefilled per row: too little work saved to be worth a program.
MIN_SHARED_PREFIX = 32


def bucket_length(length: int, cap: int) -> int:
  """Padded length for a batch whose longest row is `length` (<= `cap` unless `length` is larger).

  The next multiple of 1/BUCKETS_PER_OCTAVE of the power of two below `length` (and of 8):
  16, 24, 32, ..., 64, 72, 80, ..., 128, 144, 160, ..., 1024, 1152, ...
  """
  octave = 1 << max(length - 1, 1).bit_length() - 1
  bucket = max(MIN_BUCKET, _round_up(length, max(octave // BUCKETS_PER_OCTAVE, 8)))
  return max(min(bucket, cap), length)


def plan_batches(
  lengths: Sequence[int], batch_size: int, cap: int, row_multiple: int = 1
) -> list[tuple[list[int], int, int]]:
  """Groups rows by length into batches: `[(row indices, padded rows, padded length)]`.

  Longest rows go first, so similar lengths share a batch (little padding) and the slowest
  batches come first (an honest ETA). A short last batch is padded to a power-of-two row count
  (a multiple of `row_multiple`, the data-parallel size) rather than to `batch_size`.
  """
  order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
  plans = []
  for start in range(0, len(order), batch_size):
    rows = order[start : start + batch_size]
    plans.append(
      (rows, _padded_rows(len(rows), batch_size, row_multiple), bucket_length(max(lengths[i] for i in rows), cap))
    )
  return plans


@dataclasses.dataclass(frozen=True)
class BatchPlan:
  """One compiled batch: its rows, padded row count, shared prefix length and per-row length.

  With `prefix_len > 0` every row starts with the same `prefix_len` tokens; they are prefilled
  once and their keys/values copied to every row, and only the rest (`padded_len` slots per row,
  left-padded) is prefilled per row.
  """

  rows: list[int]
  padded_rows: int
  prefix_len: int
  padded_len: int


def plan_generation(
  prompts: Sequence[Sequence[int]], batch_size: int, cap: int, row_multiple: int = 1, share_prefixes: bool = True
) -> list[BatchPlan]:
  """Batches for `generate`: shared-prefix batches where they prefill fewer slots, else by length.

  Prompts are sorted lexicographically, so prompts with a common start (a chat header, the
  few-shot demos of a CMB exam_class) are neighbours, and cut into batches. A batch whose rows
  share at least `MIN_SHARED_PREFIX` tokens keeps that prefix (rounded down to the bucket grid,
  so few programs are compiled) when prefilling it once plus the padded suffixes costs fewer
  token slots than the plain batch would; every other prompt is batched by length
  (`plan_batches`). Each row keeps at least one token of its own, whose logits start decoding.
  """
  lengths = [len(p) for p in prompts]
  shared, rest = [], []
  if share_prefixes:
    order = sorted(range(len(prompts)), key=lambda i: (tuple(prompts[i]), i))
    for start in range(0, len(order), batch_size):
      rows = order[start : start + batch_size]
      # In lexicographic order the first and last rows' common prefix is every row's.
      common = min(_common_prefix(prompts[rows[0]], prompts[rows[-1]]), min(lengths[i] for i in rows) - 1)
      prefix_len = _bucket_floor(common)
      padded_rows = _padded_rows(len(rows), batch_size, row_multiple)
      longest = max(lengths[i] for i in rows)
      if prefix_len >= MIN_SHARED_PREFIX:
        padded_len = bucket_length(longest - prefix_len, cap - prefix_len)
        if row_multiple * prefix_len + padded_rows * padded_len < padded_rows * bucket_length(longest, cap):
          shared.append(BatchPlan(rows, padded_rows, prefix_len, padded_len))
          continue
      rest.extend(rows)
  else:
    rest = list(range(len(prompts)))
  plain = [
    BatchPlan([rest[i] for i in rows], padded_rows, 0, padded_len)
    for rows, padded_rows, padded_len in plan_batches([lengths[i] for i in rest], batch_size, cap, row_multiple)
  ]
  return shared + plain


def prefix_groups(prompts: Sequence[Sequence[int]]) -> list[tuple[list[int], int]]:
  """For continuous batching: runs of prompts (in lexicographic order) that share a start worth
  prefilling once, `[(rows, prefix length)]`, at least two rows each; the prefix is on the bucket grid
  (`MIN_SHARED_PREFIX` or more) and leaves each row a token."""
  order = sorted(range(len(prompts)), key=lambda i: (tuple(prompts[i]), i))
  groups, i = [], 0
  while i < len(order):
    common, j = len(prompts[order[i]]) - 1, i + 1
    while j < len(order):
      shared = min(common, _common_prefix(prompts[order[i]], prompts[order[j]]), len(prompts[order[j]]) - 1)
      if _bucket_floor(shared) < MIN_SHARED_PREFIX:
        break
      common, j = shared, j + 1
    if j - i >= 2:
      groups.append((order[i:j], _bucket_floor(common)))
    i = j
  return groups


def _left_padded(
  rows: Sequence[Sequence[int]], padded_rows: int, length: int, first_position: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`(ids, segment_ids, positions)` `[padded_rows, length]` of `rows` left-padded to `length`.

  As HF does for left padding, real tokens count positions from `first_position` (0, or the length
  of a prefix prefilled apart). Filler rows past `rows` hold one token so no row attends to nothing.
  """
  ids = np.zeros((padded_rows, length), np.int32)
  segment_ids = np.zeros((padded_rows, length), np.int32)
  positions = np.full((padded_rows, length), first_position, np.int32)
  segment_ids[:, -1] = 1
  for r, row in enumerate(rows):
    ids[r, length - len(row) :] = row
    segment_ids[r, length - len(row) :] = 1
    positions[r, length - len(row) :] = first_position + np.arange(len(row))
  return ids, segment_ids, positions


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
  n = min(len(a), len(b))
  differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
  return int(differ[0]) if len(differ) else n


def _bucket_floor(length: int) -> int:
  """The largest length <= `length` on `bucket_length`'s grid (0 for 0)."""
  if length < MIN_BUCKET:
    return length
  octave = 1 << length.bit_length() - 1
  step = max(octave // BUCKETS_PER_OCTAVE, 8)
  return length // step * step


def _padded_rows(rows: int, batch_size: int, row_multiple: int) -> int:
  if rows == batch_size:
    return batch_size
  return min(batch_size, _round_up(1 << (rows - 1).bit_length(), row_multiple))


def _round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def _data_parallel_size(mesh: Mesh | None) -> int:
  if mesh is None:
    return 1
  return int(np.prod([mesh.shape[a] for a in ("data", "fsdp") if a in mesh.shape]))


def _batch_size(batch_size: int, mesh: Mesh | None) -> int:
  # Rows are sharded over data x fsdp; a batch that does not divide would be replicated instead.
  size = _round_up(batch_size, _data_parallel_size(mesh))
  if size != batch_size:
    logging.info("batch_size %d rounded up to %d (a multiple of the mesh's data-parallel size).", batch_size, size)
  return size


def _truncate_left(tokens: Sequence[int], limit: int) -> tuple[list[int], bool]:
  tokens = list(tokens)
  if len(tokens) <= limit:
    return tokens, False
  return tokens[len(tokens) - limit :], True


def prompt_limit(model: Decoder, max_new_tokens: int, max_prompt_len: int | None = None) -> int:
  """The most prompt tokens `generate` keeps (longer prompts lose their start)."""
  limit = max_prompt_len or model.config.max_position_embeddings - max_new_tokens
  if limit < 1:
    raise ValueError(
      f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
      f"context of {model.config.max_position_embeddings} tokens; lower max_new_tokens."
    )
  return limit
