"""Tokenized examples of a source: chat template, over-long policy, held-out split."""

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from csft_jax.data.errors import DataError
from csft_jax.data.llamafactory import truncate_turns
from csft_jax.data.sources import SourceRecord, SourceStats
from csft_jax.data.templates import ChatTemplate

OVERLONG = ("truncate", "drop", "infer_seqlen")
_ENCODE_CHUNK = 2048  # Conversations per tokenizer call: bounds peak memory.


@dataclasses.dataclass
class TokenizedSource:
  """A source's examples as token ids and loss masks (on tokens, not targets; nonzero = trained,
  `packing.LAST_TOKEN_TARGET` = trained towards the example's last token)."""

  name: str
  token_ids: list[np.ndarray]
  loss_masks: list[np.ndarray]
  stats: SourceStats

  def __len__(self) -> int:
    return len(self.token_ids)

  @property
  def num_tokens(self) -> int:
    return int(sum(len(t) for t in self.token_ids))

  def subset(self, indices: Sequence[int]) -> "TokenizedSource":
    return TokenizedSource(
      self.name, [self.token_ids[i] for i in indices], [self.loss_masks[i] for i in indices], self.stats
    )


def tokenize_source(
  name: str, records: Sequence[SourceRecord], stats: SourceStats, template: ChatTemplate, seq_len: int, overlong: str
) -> TokenizedSource:
  """Encodes a source's conversations and applies the over-long policy.

  An example of n tokens gives n - 1 (input, target) pairs, so it fits a row
  of `seq_len` when n <= seq_len + 1. Policies for longer ones:
    truncate      cut the end off, to seq_len + 1 tokens;
    drop          leave the example out;
    infer_seqlen  LLaMA-Factory's cutoff (cutoff_len = seq_len tokens an example keeps): each
                  turn's budget split between its prompt and reply (`llamafactory.infer_seqlen`).
  A template that appends a trained eos to every example (efficient_eos) keeps it under
  either cut. A cut example with no trained target left is dropped. Counts go to `stats`
  (truncated, dropped, examples, tokens, loss_tokens).
  """
  if overlong not in OVERLONG:
    raise DataError(f"config.data.overlong={overlong!r} is not one of {OVERLONG}")
  efficient_eos = getattr(template, "efficient_eos", False)
  limit = seq_len if overlong == "infer_seqlen" else seq_len + 1
  token_ids, loss_masks = [], []
  for start in range(0, len(records), _ENCODE_CHUNK):
    chunk = [r.conversation for r in records[start : start + _ENCODE_CHUNK]]
    for ids, mask in template.encode_batch(chunk):
      if len(ids) > limit:
        if overlong == "drop":
          stats.dropped += 1
          continue
        if overlong == "infer_seqlen":
          ids, mask = truncate_turns(ids, mask, limit, efficient_eos)
        else:
          keep = np.r_[0 : limit - 1, len(ids) - 1] if efficient_eos else np.arange(limit)
          ids, mask = ids[keep], mask[keep]
        if not mask[1:].any():
          stats.dropped += 1
          continue
        stats.truncated += 1
      token_ids.append(ids)
      loss_masks.append(mask)
  if not token_ids:
    raise DataError(
      f"source {name!r}: all {len(records)} examples are longer than"
      f" seq_len={seq_len} and were dropped; raise config.data.seq_len or set overlong='truncate'"
    )
  stats.examples = len(token_ids)
  stats.tokens = int(sum(len(t) for t in token_ids))
  stats.loss_tokens = int(sum(np.count_nonzero(m[1:]) for m in loss_masks))
  return TokenizedSource(name, token_ids, loss_masks, stats)


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
