"""Source mixture: target weights and a Grain selection map that realizes them.

Guarantee: element k of the mixture is a pure function of (seed, weights,
block size, k). In every block of `block_size` consecutive draws each source
appears exactly `counts[i]` times (largest-remainder rounding of
weight_i * block_size) at seeded random positions, so the realized share of a
source over any whole number of blocks equals counts[i] / block_size, within
1 / block_size of its target. Sources are shuffled and repeated on their own
(reshuffled each epoch), so a small source cycles through all its examples
before repeating any. Being a function of the index, the mixture resumes
exactly from any position and does not depend on the length of the run.
"""

import math
import sys
from collections.abc import Sequence

import grain
import numpy as np

from csft_jax.data.errors import DataError

MIXINGS = ("explicit", "proportional", "temperature", "uniform")


def mixture_weights(
  mixing: str, names: Sequence[str], sizes: Sequence[int], explicit: Sequence[float | None], temperature: float
) -> np.ndarray:
  """Returns normalized target weights (fractions of examples) per source.

  Args:
    mixing: "explicit" (config weights), "proportional" (n_i, i.e. plain
      concatenation as LLaMA-Factory does), "temperature" (n_i ** (1 / T)) or
      "uniform".
    names: source names, for errors.
    sizes: training examples per source after caps and drops.
    explicit: config weights (None where unset).
    temperature: T for temperature mixing.
  """
  if mixing == "explicit":
    unset = [n for n, w in zip(names, explicit) if w is None]
    if unset:
      raise DataError(
        f"config.data.mixing='explicit' but sources {unset} have no weight; set config.data.sources.<name>.weight"
      )
    raw = np.asarray(explicit, dtype=np.float64)
  elif mixing == "proportional":
    raw = np.asarray(sizes, dtype=np.float64)
  elif mixing == "temperature":
    if not (math.isfinite(temperature) and temperature > 0):
      raise DataError(f"config.data.temperature={temperature!r} must be finite and > 0")
    raw = np.asarray(sizes, dtype=np.float64) ** (1.0 / temperature)
  elif mixing == "uniform":
    raw = np.ones(len(sizes))
  else:
    raise DataError(f"config.data.mixing={mixing!r} is not one of {MIXINGS}")
  return raw / raw.sum()


def block_counts(weights: np.ndarray, block_size: int, names: Sequence[str]) -> np.ndarray:
  """Largest-remainder apportionment of `block_size` draws to the sources."""
  exact = weights * block_size
  counts = np.floor(exact).astype(np.int64)
  # Stable sort: ties go to the earlier source, deterministically.
  order = np.argsort(-(exact - counts), kind="stable")
  counts[order[: block_size - counts.sum()]] += 1
  starved = [n for n, c in zip(names, counts) if c == 0]
  if starved:
    raise DataError(
      f"sources {starved} get no draw in a mixture block of {block_size};"
      " raise config.data.mixture_block or their weight"
    )
  return counts


class BlockShuffleSelectionMap(grain.transforms.DatasetSelectionMap):
  """Mixture index -> (source, index in source); see the module docstring."""

  def __init__(self, counts: Sequence[int], seed: int):
    self._counts = np.asarray(counts, dtype=np.int64)
    self._block_size = int(self._counts.sum())
    self._seed = seed
    self._cache: tuple[int, np.ndarray, np.ndarray] | None = None

  def __len__(self) -> int:
    return sys.maxsize

  def _block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
    if self._cache is None or self._cache[0] != block:
      sources = np.repeat(np.arange(len(self._counts)), self._counts)
      sources = np.random.default_rng([self._seed, block]).permutation(sources)
      rank = np.empty(self._block_size, dtype=np.int64)
      for i, count in enumerate(self._counts):
        rank[sources == i] = np.arange(count)
      self._cache = (block, sources, rank)
    return self._cache[1], self._cache[2]

  def __getitem__(self, index: int) -> tuple[int, int]:
    block, position = divmod(index, self._block_size)
    sources, rank = self._block(block)
    source = int(sources[position])
    return source, int(block * self._counts[source] + rank[position])

  def __getstate__(self):
    return {**self.__dict__, "_cache": None}


def mix_sources(sources: Sequence[grain.MapDataset], counts: Sequence[int], seed: int) -> grain.MapDataset:
  """Infinite mixture of per-source datasets, each shuffled and repeated.

  Args:
    sources: finite per-source datasets, in source order.
    counts: draws per block for each source (see `block_counts`).
    seed: pipeline seed; sources get independent seeds derived from it.
  """
  repeated = []
  for i, source in enumerate(sources):
    # Distinct 32-bit seeds per source; grain adds the epoch to reshuffle.
    source_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
    repeated.append(source.shuffle(seed=source_seed).repeat())
  return grain.MapDataset.select_from_datasets(repeated, BlockShuffleSelectionMap(counts, seed))
