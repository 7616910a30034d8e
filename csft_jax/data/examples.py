"""Tokenized examples of a source: chat template, over-long policy."""

import dataclasses
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
