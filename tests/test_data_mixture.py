"""Mixture weights, exact block counts, realized fractions over a stream."""

import numpy as np
import pytest

from csft_jax.data.errors import DataError
from csft_jax.data.mixture import BlockShuffleSelectionMap, block_counts, mixture_weights
from csft_jax.data.pipeline import DataPipeline, source_fractions
from tests.data_fixtures import sample_config

NAMES = ("a", "b", "c")
SIZES = (900, 100, 25)


def test_mixture_weights_follow_each_rule():
  np.testing.assert_allclose(mixture_weights("proportional", NAMES, SIZES, [None] * 3, 1.0), np.array(SIZES) / 1025)
  np.testing.assert_allclose(mixture_weights("temperature", NAMES, SIZES, [None] * 3, 2.0), np.array([30, 10, 5]) / 45)
  np.testing.assert_allclose(mixture_weights("uniform", NAMES, SIZES, [None] * 3, 1.0), [1 / 3] * 3)
  np.testing.assert_allclose(mixture_weights("explicit", NAMES, SIZES, [2.0, 1.0, 1.0], 1.0), [0.5, 0.25, 0.25])
  with pytest.raises(DataError, match=r"sources \['c'\] have no weight"):
    mixture_weights("explicit", NAMES, SIZES, [2.0, 1.0, None], 1.0)


def test_every_block_holds_exact_counts():
  counts = block_counts(np.array([30, 10, 5]) / 45, 1000, NAMES)
  assert counts.tolist() == [667, 222, 111]
  selection = BlockShuffleSelectionMap(counts, seed=3)
  picks = np.array([selection[k] for k in range(3000)])
  for block in range(3):
    np.testing.assert_array_equal(np.bincount(picks[block * 1000 : (block + 1) * 1000, 0]), counts)
  # Each source's indices are consecutive: no example repeats before its epoch ends.
  for i, count in enumerate(counts):
    np.testing.assert_array_equal(np.sort(picks[picks[:, 0] == i, 1]), np.arange(3 * count))
  assert picks[:20, 0].tolist() != sorted(picks[:20, 0].tolist())  # Shuffled within a block.


@pytest.mark.parametrize("mixing", ["temperature", "uniform", "explicit"])
def test_realized_fractions_within_one_point_of_target(mixing):
  # Long rows hold many examples, so 100 batches span about 30 mixture blocks.
  data = sample_config(mixing=mixing, mixture_block=200, seq_len=512)
  for i, source in enumerate(data.sources.values()):
    source.weight = float(i + 1)
  pipeline = DataPipeline(data)
  it = iter(pipeline.train_dataset(8))
  batches = [next(it) for _ in range(100)]
  examples, _ = source_fractions(batches, len(pipeline.source_names))
  assert sum(b["segment_ids"].max(axis=1).sum() for b in batches) > 5000
  np.testing.assert_allclose(examples, pipeline.weights, atol=0.01)
