"""Packed and padded rows: shapes, segments, positions, shifted targets, intact examples."""

import numpy as np

from csft_jax.data.packing import ROW_KEYS, padded_to_longest_efficiency
from tests.data_fixtures import sample_pipeline


def _segments(row):
  for s in range(1, row["segment_ids"].max() + 1):
    yield np.flatnonzero(row["segment_ids"] == s)


def test_packed_rows_hold_whole_examples_of_the_mixture_in_order():
  pipeline = sample_pipeline("packed")
  batch = next(iter(pipeline.train_dataset(4)))
  assert set(batch) == set(ROW_KEYS)
  for k in ROW_KEYS:
    assert batch[k].shape == (4, 128) and batch[k].dtype == np.int32
  examples = pipeline.examples()
  for r in range(4):
    row = {k: v[r] for k, v in batch.items()}
    # Row r first-fit packs mixture elements r, r + 4, ... into its bins.
    stream = examples[r::4]
    candidates = [tuple(stream[i]["input_ids"]) for i in range(4 * 8)]
    packed = [tuple(row["input_ids"][idx]) for idx in _segments(row)]
    assert packed and all(p in candidates for p in packed)
    assert tuple(row["input_ids"][next(_segments(row))]) == candidates[0]
    for idx in _segments(row):
      np.testing.assert_array_equal(row["positions"][idx], np.arange(len(idx)))
      assert np.all(np.diff(idx) == 1)  # Segments are contiguous.
      assert len(set(row["source_ids"][idx])) == 1
      # Targets are the next token of the same example.
      np.testing.assert_array_equal(row["target_ids"][idx][:-1], row["input_ids"][idx][1:])
    pad = row["segment_ids"] == 0
    assert not row["loss_mask"][pad].any()


def test_padded_rows_hold_one_example_each():
  batch = next(iter(sample_pipeline("padded").train_dataset(4)))
  assert batch["segment_ids"].max(axis=1).tolist() == [1, 1, 1, 1]
  n = (batch["segment_ids"] > 0).sum(axis=1)
  for r in range(4):
    np.testing.assert_array_equal(batch["positions"][r, : n[r]], np.arange(n[r]))


def test_padded_to_longest_efficiency_by_hand():
  # Batches of 2: [3, 5] pads to 5, [2, 2] to 2: slots 10 + 4; loss tokens 1+2+1+1.
  assert padded_to_longest_efficiency([1, 2, 1, 1, 9], [3, 5, 2, 2, 7], 2) == 5 / 14
