"""Which examples are held out for validation, chosen when the data is read (the tokenize-once cache
holds every example: this module is not part of its code fingerprint)."""

import math
from collections.abc import Sequence

import numpy as np

from csft_jax.data.errors import DataError

VAL_SPLITS = ("per_source", "concatenation")


def held_out_indices(
  lengths: Sequence[int], val_fraction: float, seed: int, how: str = "per_source", names: Sequence[str] | None = None
) -> list[np.ndarray]:
  """Which examples of each source are held out (sorted indices per source); fixed across runs.

  Args:
    lengths: examples per source, in the config's source order.
    val_fraction: the held-out fraction, in [0, 1).
    seed: `config.data.seed`.
    how: 'per_source': round(val_fraction * n) examples of each source (at least 1), a random subset
      that depends only on (seed, source index, n). 'concatenation': as LLaMA-Factory v0.8.3's
      `split_dataset` holds out of the concatenated sources (`datasets`' `train_test_split(test_size=
      val_fraction, seed=seed)`): ceil(val_fraction * N) of all N examples, the first of
      `numpy.random.default_rng(seed).permutation(N)`; a source may then have none held out.
    names: the sources' names, for errors.
  """
  names = names or [f"#{i}" for i in range(len(lengths))]
  if not 0.0 <= val_fraction < 1.0:
    raise DataError(f"config.data.val_fraction={val_fraction} must be in [0, 1)")
  if how not in VAL_SPLITS:
    raise DataError(f"config.data.val_split={how!r} is not one of {VAL_SPLITS}")
  if val_fraction == 0.0:
    return [np.zeros(0, np.int64) for _ in lengths]
  if how == "per_source":
    held = []
    for i, n in enumerate(lengths):
      num_val = max(1, round(val_fraction * n))
      if num_val >= n:
        raise DataError(f"source {names[i]!r}: val_fraction={val_fraction} leaves no training examples of {n}")
      held.append(np.sort(np.random.default_rng([seed, i, 0x5A1]).permutation(n)[:num_val]))
    return held
  total = int(sum(lengths))
  chosen = np.random.default_rng(seed).permutation(total)[: math.ceil(val_fraction * total)]
  starts = np.cumsum([0, *lengths])
  held = [np.sort(chosen[(chosen >= lo) & (chosen < hi)] - lo) for lo, hi in zip(starts[:-1], starts[1:])]
  for name, n, h in zip(names, lengths, held):
    if len(h) == n:
      raise DataError(
        f"source {name!r}: val_fraction={val_fraction} with val_split='concatenation' holds out "
        f"all {n} of its examples; lower val_fraction or use val_split='per_source'"
      )
  return held


def split_validation(source, held_out: np.ndarray):
  """`(train, held-out or None)` subsets of `source` (a `TokenizedSource` or cached source)."""
  if not len(held_out):
    return source, None
  return source.subset(np.setdiff1d(np.arange(len(source)), held_out)), source.subset(held_out)
