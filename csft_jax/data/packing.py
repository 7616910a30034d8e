"""Rows of fixed length from examples: first-fit packing, or one padded example per row.

Row keys (each int32 [seq_len]): input_ids, target_ids (next token within
the segment), loss_mask (1 where the target is a trained assistant token),
segment_ids (1..k per example in the row, 0 = padding), positions (restart
at 0 in each segment), source_ids (the example's source index, 0 on padding).
"""

from collections.abc import Sequence

import grain
import numpy as np

PACKINGS = ("packed", "padded")
# Loss-mask value of a token that is trained with the example's last token as its target instead
# of itself (LLaMA-Factory's efficient_eos labels; see data/llamafactory.py).
LAST_TOKEN_TARGET = 2
ROW_KEYS = ("input_ids", "target_ids", "loss_mask", "segment_ids", "positions", "source_ids")
ROW_DTYPE = np.int32  # of every row feature, packed or padded (what the train step is compiled for)
_SEQUENCE_KEYS = ("input_ids", "target_ids", "loss_mask", "source_ids")
# Row streams run on the caller's thread: rows are cheap and the trainer
# prefetches batches; grain's default of 16 threads per stream would swamp
# hosts that run one stream per batch row.
_READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


class TrainingExample:
  """(token_ids, loss_mask) -> the unpacked row features of one example."""

  def __init__(self, source_index: int):
    self.source_index = source_index

  def __call__(self, example: tuple[np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
    token_ids, loss_mask = example
    n = len(token_ids) - 1
    return {
      "input_ids": token_ids[:-1],
      "target_ids": np.where(loss_mask[1:] == LAST_TOKEN_TARGET, token_ids[-1], token_ids[1:]),
      # The mask is on tokens; a target is trained iff its token is.
      "loss_mask": (loss_mask[1:] > 0).astype(ROW_DTYPE),
      "source_ids": np.full(n, self.source_index, dtype=ROW_DTYPE),
    }


def _rename_packed(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  out = {k: row[k].astype(ROW_DTYPE) for k in _SEQUENCE_KEYS}
  out["segment_ids"] = row["input_ids_segment_ids"].astype(ROW_DTYPE)
  out["positions"] = row["input_ids_positions"].astype(ROW_DTYPE)
  return out


def packed_rows(examples: grain.MapDataset, seq_len: int, num_bins: int) -> grain.IterDataset:
  """First-fit packs an example stream into rows of `seq_len`.

  Guarantee: rows are a deterministic function of the example stream; the
  iterator state is (position in the stream, rows emitted) so restoring it
  re-packs the current bins and continues exactly. Examples must already fit
  (`tokenize_source` ensures that).
  """
  stream = examples.to_iter_dataset(_READ_OPTIONS)
  packed = grain.experimental.FirstFitPackIterDataset(
    stream, length_struct={k: seq_len for k in _SEQUENCE_KEYS}, num_packing_bins=num_bins, shuffle_bins=False
  )
  return packed.map(_rename_packed)


def _pad(example: dict[str, np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
  n = len(example["input_ids"])
  out = {k: np.zeros(seq_len, dtype=ROW_DTYPE) for k in ROW_KEYS}
  for k in _SEQUENCE_KEYS:
    out[k][:n] = example[k]
  out["segment_ids"][:n] = 1
  out["positions"][:n] = np.arange(n, dtype=ROW_DTYPE)
  return out


def padded_rows(examples: grain.MapDataset, seq_len: int) -> grain.IterDataset:
  """One example per row, right-padded to `seq_len` (for comparison with packing)."""
  return examples.map(lambda e: _pad(e, seq_len)).to_iter_dataset(_READ_OPTIONS)


def stack_rows(rows: Sequence[grain.IterDataset]) -> grain.IterDataset:
  """Zips row streams into batches: row i of each batch comes from stream i."""
  if len(rows) == 1:
    return rows[0].map(lambda row: {k: v[None] for k, v in row.items()})
  return grain.experimental.ZipIterDataset(list(rows)).map(
    lambda rs: {k: np.stack([r[k] for r in rs]) for k in ROW_KEYS}
  )


def packing_efficiency(batches: Sequence[dict[str, np.ndarray]]) -> float:
  """Trained target tokens / all token slots over some batches."""
  loss = sum(int(b["loss_mask"].sum()) for b in batches)
  slots = sum(b["loss_mask"].size for b in batches)
  return loss / max(slots, 1)


def padded_to_longest_efficiency(loss_tokens: Sequence[int], lengths: Sequence[int], batch_size: int) -> float:
  """Efficiency of batching examples padded to the longest of each batch.

  This is what LLaMA-Factory does without packing: consecutive groups of
  `batch_size` examples, each group padded to its longest example.
  """
  lengths = np.asarray(lengths)
  n = len(lengths) - len(lengths) % batch_size
  if n == 0:
    raise ValueError(f"need at least batch_size={batch_size} examples, got {len(lengths)}")
  slots = lengths[:n].reshape(-1, batch_size).max(axis=1).sum() * batch_size
  return float(np.sum(loss_tokens[:n]) / slots)
