"""How the next token is chosen (greedy, temperature + top-p, repetition penalty, a minimum length),
inside the jitted programs, and the per-sequence randomness that makes samples independent of batching.

A sampled sequence draws its randomness from `fold_in(fold_in(key(seed), prompt index), sample index)`
and its own token index, so it does not depend on batch size, bucketing, slots, the mesh, or the
other prompts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from csft_jax import sharding


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is chosen: argmax when `temperature == 0`, else temperature + top-p.

  `repetition_penalty` has Hugging Face's meaning (`RepetitionPenaltyLogitsProcessor`, applied
  before temperature and top-p): the logit of every token already in the sequence, prompt
  included, is divided by it where positive and multiplied by it where negative; 1.0 is off.
  Left padding is not part of a sequence, so unlike HF's padded batches it is never penalised.
  `min_new_tokens` is HF's too (`MinNewTokensLengthLogitsProcessor`): no stop token is chosen
  before that many new tokens.
  """

  temperature: float = 0.0
  top_p: float = 1.0
  repetition_penalty: float = 1.0
  min_new_tokens: int = 0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"Sampling temperature={self.temperature} must be >= 0 (0 = greedy).")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"Sampling top_p={self.top_p} must be in (0, 1].")
    if not self.repetition_penalty > 0:
      raise ValueError(f"Sampling repetition_penalty={self.repetition_penalty} must be > 0 (1.0 = off).")
    if self.min_new_tokens < 0:
      raise ValueError(f"Sampling min_new_tokens={self.min_new_tokens} must be >= 0.")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


GREEDY = Sampling()


def _top_p_logits(logits: jax.Array, top_p: float) -> jax.Array:
  """Keeps the smallest set of most likely tokens whose probability mass reaches `top_p`."""
  sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  # The most likely token always survives (mass_before = 0 < top_p).
  kept = jnp.where(mass_before < top_p, sorted_logits, jnp.inf)
  threshold = jnp.min(kept, axis=-1, keepdims=True)
  return jnp.where(logits >= threshold, logits, -jnp.inf)


def _seen_tokens(tokens: jax.Array, segment_ids: jax.Array, vocab_size: int) -> jax.Array:
  """`[B, V]` bool: the tokens each row's prompt holds (what the repetition penalty applies to)."""
  # Padding (segment 0) goes to the out-of-range id `vocab_size`, which the scatter drops.
  ids = jnp.where(segment_ids > 0, tokens, vocab_size)
  rows = jnp.arange(tokens.shape[0])[:, None]
  seen = jnp.zeros((tokens.shape[0], vocab_size), bool).at[rows, ids].set(True, mode="drop")
  return sharding.constrain(seen, ("batch", "vocab"))


def _add_seen(seen: jax.Array | None, token: jax.Array) -> jax.Array | None:
  if seen is None:
    return None
  return seen.at[jnp.arange(token.shape[0]), token].set(True)


def _penalize_repeats(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
  """HF's repetition penalty: seen tokens' logits divided by `penalty` if positive, else multiplied."""
  penalized = jnp.where(logits < 0, logits * penalty, logits / penalty)
  return jnp.where(seen, penalized, logits)


def _next_token(
  logits: jax.Array,
  row_keys: jax.Array,
  step: jax.Array,
  sampling: Sampling,
  seen: jax.Array | None,
  stop_ids: jax.Array,
) -> jax.Array:
  """`[B, V]` float32 logits -> `[B]` token ids; `seen` marks the tokens to penalise; `step` (scalar
  or `[B]`) is the index among the new tokens of the token chosen."""
  if seen is not None:
    logits = _penalize_repeats(logits, seen, sampling.repetition_penalty)
  step = jnp.broadcast_to(step, logits.shape[:1])  # each row's own token index (one for all, or per slot)
  if sampling.min_new_tokens:
    is_stop = jnp.zeros((logits.shape[-1],), bool).at[stop_ids].set(True)
    logits = jnp.where(is_stop[None, :] & (step < sampling.min_new_tokens)[:, None], -jnp.inf, logits)
  if sampling.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / sampling.temperature
  if sampling.top_p < 1:
    logits = _top_p_logits(logits, sampling.top_p)
  keys = jax.vmap(jax.random.fold_in)(row_keys, step)
  return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


def _is_stop(tokens: jax.Array, stop_ids: jax.Array) -> jax.Array:
  return jnp.any(tokens[:, None] == stop_ids[None, :], axis=-1)


def _stop_ids(eos_token_id: int | Sequence[int] | None) -> np.ndarray:
  if eos_token_id is None:
    return np.zeros((0,), np.int32)
  if isinstance(eos_token_id, (int, np.integer)):
    return np.asarray([eos_token_id], np.int32)
  return np.asarray(list(eos_token_id), np.int32)


def _row_keys(seed: int, prompt_ids: np.ndarray, sample_ids: np.ndarray) -> jax.Array:
  base = jax.random.key(seed)
  per_prompt = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(base, jnp.asarray(prompt_ids))
  return jax.vmap(jax.random.fold_in)(per_prompt, jnp.asarray(sample_ids))


def _cut_at_stop(row: np.ndarray, stop_ids: np.ndarray) -> list[int]:
  stops = np.flatnonzero(np.isin(row, stop_ids))
  end = int(stops[0]) + 1 if len(stops) else len(row)
  return row[:end].tolist()
