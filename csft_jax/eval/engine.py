"""The evaluation engine: batched, jitted generation and continuation scoring with a KV cache.

Public API:
  generate(model, prompts, max_new_tokens, eos_token_id, ...) -> Generation   (greedy or sampled)
  greedy_generate(model, prompts, max_new_tokens, eos_token_id, ...) -> list[list[int]]
  score(model, contexts, continuations, ...) -> Scores
  score_continuations(model, contexts, continuations, ...) -> list[float]

Batching: prompts are sorted by length and cut into batches; each batch is left-padded to a
bucket length (`BUCKETS_PER_OCTAVE` steps between powers of two, at least `MIN_BUCKET`) and the
last, short batch to a power-of-two row count, so a run compiles one program per distinct
(rows, bucket) pair: a handful, whatever the number of prompts. Each new program is logged.

Shared prefixes: prompts that start alike (the chat template's header, the few-shot demos of a
CMB exam_class) are batched together when that saves prefill work; their common prefix is
prefilled once and its keys/values are copied into every row's cache (`plan_generation`). The
tokens each row computes do not change: greedy outputs are those of whole-prompt prefills.

Generation: one jitted program per batch runs the prefill and then a `lax.while_loop` of
single-token decode steps on a static KV cache, entirely on device; the loop ends when every row
has produced a stop token or `max_new_tokens` tokens.

Determinism: greedy outputs depend only on the model and the prompt. A sampled sequence draws its
randomness from `fold_in(fold_in(key(seed), prompt index), sample index)` and the step number, so
it does not depend on batch size, bucketing, the mesh, or the other prompts.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from csft_jax import sharding
from csft_jax.models import Decoder, KVCache

MIN_BUCKET = 16
# Finer than powers of two: prefill cost grows with the padded length, so a bucket wastes at most
# ~1/BUCKETS_PER_OCTAVE of it, at the price of up to BUCKETS_PER_OCTAVE programs per octave (at 4, a
# 1,040-token MedS prompt padded to 1,280 made our prefill 12% slower than HF's, which pads to the
# batch's longest).
BUCKETS_PER_OCTAVE = 8
# A shared prefix shorter than this is prefilled per row: too little work saved to be worth a program.
MIN_SHARED_PREFIX = 32
# Decode attends over windows of the cache that grow by this many slots: few programs (or loops), and
# little attention to slots not written yet or no longer live.
WINDOW_GRID = 64
_CACHE_AXES = ("layers", "batch", "kv_heads", "length", "head_dim")
# Number of times each jitted program was traced (= compiled) in this process.
_TRACES: collections.Counter = collections.Counter()

Progress = Callable[[int], None]


# ---------------------------------------------------------------- options ----


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


@dataclasses.dataclass
class Generation:
  """New tokens per prompt and sample, and what the engine had to do to produce them.

  Attributes:
    tokens: `[prompt][sample]` new token ids, up to and including the first stop token.
    num_truncated: prompts cut from the left to fit `max_prompt_len`.
    num_compilations: programs compiled by this call (0 when every shape was seen before).
    prefill_slots: token slots the prefills computed (padding included; a shared prefix once
      per data-parallel shard).
    stopped: whether `should_stop` ended the call before every prompt was generated.
    decode_steps: decode steps the device ran (each one for every row of its batch or every slot).
  """

  tokens: list[list[list[int]]]
  num_truncated: int
  num_compilations: int
  prefill_slots: int = 0
  stopped: bool = False  # `should_stop` ended the call early: prompts not reported done have no tokens
  decode_steps: int = 0


@dataclasses.dataclass
class Scores:
  """Summed log-probabilities per (context, continuation), and truncation/compile counts."""

  values: list[float]
  num_truncated: int
  num_compilations: int


# --------------------------------------------------------------- batching ----


def bucket_length(length: int, cap: int) -> int:
  """Padded length for a batch whose longest row is `length` (<= `cap` unless `length` is larger).

  The next multiple of 1/BUCKETS_PER_OCTAVE of the power of two below `length` (and of 8):
  16, 24, 32, ..., 64, 72, 80, ..., 128, 144, 160, ..., 1024, 1152, ...
  """
  octave = 1 << max(length - 1, 1).bit_length() - 1
  bucket = max(MIN_BUCKET, _round_up(length, max(octave // BUCKETS_PER_OCTAVE, 8)))
  return max(min(bucket, cap), length)


def plan_batches(lengths: Sequence[int], batch_size: int, cap: int, row_multiple: int = 1
                 ) -> list[tuple[list[int], int, int]]:
  """Groups rows by length into batches: `[(row indices, padded rows, padded length)]`.

  Longest rows go first, so similar lengths share a batch (little padding) and the slowest
  batches come first (an honest ETA). A short last batch is padded to a power-of-two row count
  (a multiple of `row_multiple`, the data-parallel size) rather than to `batch_size`.
  """
  order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
  plans = []
  for start in range(0, len(order), batch_size):
    rows = order[start:start + batch_size]
    plans.append((rows, _padded_rows(len(rows), batch_size, row_multiple),
                  bucket_length(max(lengths[i] for i in rows), cap)))
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


def plan_generation(prompts: Sequence[Sequence[int]], batch_size: int, cap: int, row_multiple: int = 1,
                    share_prefixes: bool = True) -> list[BatchPlan]:
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
      rows = order[start:start + batch_size]
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
  plain = [BatchPlan([rest[i] for i in rows], padded_rows, 0, padded_len)
           for rows, padded_rows, padded_len in plan_batches([lengths[i] for i in rest], batch_size, cap,
                                                             row_multiple)]
  return shared + plain


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
    logging.info("batch_size %d rounded up to %d (a multiple of the mesh's data-parallel size).",
                 batch_size, size)
  return size


def _stop_ids(eos_token_id: int | Sequence[int] | None) -> np.ndarray:
  if eos_token_id is None:
    return np.zeros((0,), np.int32)
  if isinstance(eos_token_id, (int, np.integer)):
    return np.asarray([eos_token_id], np.int32)
  return np.asarray(list(eos_token_id), np.int32)


def _truncate_left(tokens: Sequence[int], limit: int) -> tuple[list[int], bool]:
  tokens = list(tokens)
  if len(tokens) <= limit:
    return tokens, False
  return tokens[len(tokens) - limit:], True


# -------------------------------------------------------------- placement ----


def _place_state(model: Decoder, mesh: Mesh | None):
  graphdef, state = nnx.split(model)
  if mesh is not None:
    state = jax.device_put(state, sharding.state_shardings(state, mesh))
  return graphdef, state


def _place_rows(mesh: Mesh | None, *arrays: np.ndarray) -> tuple[jax.Array, ...]:
  """Puts `[B, ...]` host arrays on the mesh, rows sharded over the data axes."""
  if mesh is None:
    return tuple(jnp.asarray(a) for a in arrays)
  placed = []
  for a in arrays:
    names = ("batch",) + (None,) * (a.ndim - 1)
    placed.append(jax.device_put(a, NamedSharding(mesh, sharding.logical_to_spec(names, a.shape, mesh))))
  return tuple(placed)


def _to_host(x: jax.Array) -> np.ndarray:
  """The whole array on this host; across processes, gathered (every process runs the same batches)."""
  if not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def _activation_context(mesh: Mesh | None):
  return sharding.activation_sharding(mesh) if mesh is not None else contextlib.nullcontext()


def _log_compiles(name: str, before: int, shape: str) -> None:
  if _TRACES[name] > before:
    logging.info("%s: compiled a program for %s (%d so far in this process).", name, shape, _TRACES[name])


# ------------------------------------------------------------- generation ----


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


def _next_token(logits: jax.Array, row_keys: jax.Array, step: jax.Array, sampling: Sampling,
                seen: jax.Array | None, stop_ids: jax.Array) -> jax.Array:
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


def _map_kv(fn, cache: KVCache, *others: KVCache, segment_ids=None, end=None) -> KVCache:
  """`cache` with `fn(array, *others' arrays)` for each of its key and value arrays (one per layer,
  or stacked: batch is axis -4 and length -2 in both forms), pinned like the activations (rows over
  data, KV heads over tensor: the largest live buffer of the loop must not be replicated)."""

  def pinned(*arrays):
    out = fn(*arrays)
    return sharding.constrain(out, _CACHE_AXES[-out.ndim:])

  return KVCache(jax.tree.map(pinned, cache.k, *(o.k for o in others)),
                 jax.tree.map(pinned, cache.v, *(o.v for o in others)),
                 sharding.constrain(cache.segment_ids if segment_ids is None else segment_ids, ("batch", "length")),
                 cache.end if end is None else end)


def _empty_cache(model: Decoder, batch: int, length: int) -> KVCache:
  return _map_kv(lambda a: a, KVCache.empty(model.config, batch, length))


def _grown(cache: KVCache, extra: int) -> KVCache:
  """`cache` with `extra` empty slots after its last."""
  def pad(a):
    return jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, extra), (0, 0)])

  return _map_kv(pad, cache, segment_ids=jnp.pad(cache.segment_ids, ((0, 0), (0, extra))))


def _generate_batch(graphdef, state, tokens, segment_ids, positions, active, stop_ids, row_keys, *,
                    mesh: Mesh | None, max_new_tokens: int, sampling: Sampling):
  """Prefill + decode loop for one left-padded batch; returns `[B, max_new_tokens]` int32."""
  _TRACES["generate"] += 1
  with _activation_context(mesh):
    model = nnx.merge(graphdef, state)
    batch, prompt_len = tokens.shape
    cache = _empty_cache(model, batch, prompt_len)  # the decode loop grows it window by window
    logits, cache = model(tokens, positions=positions, segment_ids=segment_ids, cache=cache, prefill=True,
                          last_logits_only=True)
    seen = (_seen_tokens(tokens, segment_ids, logits.shape[-1]) if sampling.repetition_penalty != 1
            else None)
    return _decode(graphdef, state, cache, logits[:, -1], positions[:, -1] + 1, active, seen, stop_ids,
                   row_keys, max_new_tokens=max_new_tokens, sampling=sampling)


def _generate_shared_batch(graphdef, state, prefix, tokens, segment_ids, positions, active, stop_ids, row_keys,
                           *, mesh: Mesh | None, max_new_tokens: int, sampling: Sampling):
  """`_generate_batch` for rows that all start with `prefix` `[R, P]` (R identical rows).

  The prefix is prefilled once per data-parallel shard (R = that many rows, so each device
  computes its own copy and nothing is gathered) and its keys/values fill the first P slots of
  every row's cache; `tokens` `[B, S]` are the rows' own, left-padded suffixes, whose positions
  continue from P. Padding between the prefix and a suffix is segment 0, never attended, so each
  row computes what it would have computed on its whole prompt.
  """
  _TRACES["generate"] += 1
  with _activation_context(mesh):
    model = nnx.merge(graphdef, state)
    prefix_rows, prefix_len = prefix.shape
    batch, suffix_len = tokens.shape
    prefix_segments = jnp.ones_like(prefix)
    prefix_positions = jnp.broadcast_to(jnp.arange(prefix_len, dtype=jnp.int32), prefix.shape)
    _, prefix_cache = model(prefix, positions=prefix_positions, segment_ids=prefix_segments,
                            cache=_empty_cache(model, prefix_rows, prefix_len), prefill=True, last_logits_only=True)
    # The suffixes attend over the prefix and themselves only; the new tokens' slots come after.
    cache = _empty_cache(model, batch, prefix_len + suffix_len)
    copies = batch // prefix_rows  # row r of the batch takes prefix row r // copies (its shard's)
    cache = _map_kv(lambda a, p: a.at[..., :prefix_len, :].set(jnp.repeat(p, copies, axis=p.ndim - 4)), cache,
                    prefix_cache, segment_ids=cache.segment_ids.at[:, :prefix_len].set(1), end=jnp.int32(prefix_len))
    logits, cache = model(tokens, positions=positions, segment_ids=segment_ids, cache=cache,
                          last_logits_only=True)
    seen = None
    if sampling.repetition_penalty != 1:
      whole = jnp.concatenate([jnp.repeat(prefix, copies, axis=0), tokens], axis=1)
      whole_segments = jnp.concatenate([jnp.repeat(prefix_segments, copies, axis=0), segment_ids], axis=1)
      seen = _seen_tokens(whole, whole_segments, logits.shape[-1])
    return _decode(graphdef, state, cache, logits[:, -1], positions[:, -1] + 1, active, seen, stop_ids,
                   row_keys, max_new_tokens=max_new_tokens, sampling=sampling)


def _decode(graphdef, state, cache: KVCache, last_logits, first_position, active, seen, stop_ids, row_keys, *,
            max_new_tokens: int, sampling: Sampling) -> jax.Array:
  """The decode loop after a prefill: `[B, max_new_tokens]` int32 new tokens.

  `last_logits` `[B, V]` are the prefill's logits at each row's last prompt token (left padding
  puts it in the last column) and `first_position` the position of the first new token. After a
  row stops it keeps decoding (its outputs are ignored): rows share the cache slot.

  `cache` holds the prompt slots only. The loop runs in windows of `WINDOW_GRID` steps, and each
  window's steps attend over the cache as long as it has grown so far (the prompt plus the
  window's tokens), not over the whole budget: a step early in a 512-token budget reads ~1/4 of
  the cache a whole-budget cache would. The windows are one loop each in the same program.
  """
  batch = last_logits.shape[0]
  token = _next_token(last_logits, row_keys, jnp.int32(0), sampling, seen, stop_ids)
  seen = _add_seen(seen, token)
  out = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(token)
  done = ~active | _is_stop(token, stop_ids)
  ones = jnp.ones((batch, 1), jnp.int32)

  def decode_step(carry):
    # The weights ride in the carry (unchanged): NNX refuses to use arrays closed over from the
    # enclosing trace inside the loop's own trace.
    state, step, cache, token, done, out, seen = carry
    logits, cache = nnx.merge(graphdef, state)(
        token[:, None], positions=(first_position + step - 1)[:, None], segment_ids=ones, cache=cache)
    new = _next_token(logits[:, 0], row_keys, step, sampling, seen, stop_ids)
    new = jnp.where(done, token, new)
    out = jax.lax.dynamic_update_slice(out, new[:, None], (0, step))
    return state, step + 1, cache, new, done | _is_stop(new, stop_ids), out, _add_seen(seen, new)

  prompt_slots = cache.length
  step = jnp.int32(1)
  # Step i writes slot prompt_slots + i - 1: the window of steps < `last` needs prompt_slots + last - 1.
  for last in [*range(1 + WINDOW_GRID, max_new_tokens, WINDOW_GRID), max_new_tokens]:
    cache = _grown(cache, prompt_slots + last - 1 - cache.length)

    def keep_going(carry, last=last):
      _, step, _, _, done, _, _ = carry
      return (step < last) & ~jnp.all(done)

    carry = (state, step, cache, token, done, out, seen)
    _, step, cache, token, done, out, seen = jax.lax.while_loop(keep_going, decode_step, carry)
  return out


_STATIC = ("graphdef", "mesh", "max_new_tokens", "sampling")
_generate_batch_jit = jax.jit(_generate_batch, static_argnames=_STATIC)
_generate_shared_batch_jit = jax.jit(_generate_shared_batch, static_argnames=_STATIC)


# ------------------------------------------------- continuous batching ----
#
# A fixed number of decode slots share one KV cache `[layers, slots, kv_heads, C, head_dim]` with one
# write position `end`. A prompt joins a free slot by a prefill of its own (left-padded to a bucket `b`)
# whose keys/values land in that slot's row at `[end - b, end)`, after the row's old contents are
# masked out (segment 0); its decode then writes at `end` like every other slot's. Rows never attend
# across slots, and within a row the real tokens are contiguous, so each row computes what a static
# batch computes for it. When `end` would pass C, every row moves left by the same amount (the oldest
# slot still live decides how far). Sampling keys and `min_new_tokens` use each row's own token index.


def _new_slots_cache(config, slots: int, length: int, *, mesh: Mesh | None) -> KVCache:
  with _activation_context(mesh):
    return _map_kv(lambda a: a, KVCache.empty(config, slots, length))


def _prefill_slots(graphdef, state, cache: KVCache, seen, tokens, segment_ids, positions, slots, stop_ids, row_keys,
                   *, mesh: Mesh | None, sampling: Sampling):
  """Prefills `[R, b]` left-padded prompts into cache rows `slots` (index >= slots: a filler row, dropped)
  at `[end - b, end)`; returns (cache, seen, first new token `[R]`)."""
  _TRACES["prefill"] += 1
  row_keys = jax.random.wrap_key_data(row_keys)
  with _activation_context(mesh):
    model = nnx.merge(graphdef, state)
    rows, length = tokens.shape
    logits, own = model(tokens, positions=positions, segment_ids=segment_ids,
                        cache=_empty_cache(model, rows, length), prefill=True, last_logits_only=True)
    new_seen = _seen_tokens(tokens, segment_ids, logits.shape[-1]) if seen is not None else None
    first = _next_token(logits[:, -1], row_keys, jnp.int32(0), sampling, new_seen, stop_ids)
    start = cache.end - length

    def put(big, small):
      # The slots' rows, their [start, end) written with the prompts' own, scattered back.
      rows_now = jnp.take(big, slots, axis=big.ndim - 4, mode="clip")
      updated = jax.lax.dynamic_update_slice_in_dim(rows_now, small.astype(big.dtype), start, axis=big.ndim - 2)
      return big.at[(slice(None),) * (big.ndim - 4) + (slots,)].set(updated, mode="drop")

    cleared = jnp.zeros((rows, cache.segment_ids.shape[1]), cache.segment_ids.dtype)
    segments = cache.segment_ids.at[slots].set(
        jax.lax.dynamic_update_slice(cleared, segment_ids.astype(cleared.dtype), (0, start)), mode="drop")
    if seen is not None:
      seen = seen.at[slots].set(_add_seen(new_seen, first), mode="drop")
    return _map_kv(put, cache, own, segment_ids=segments), seen, first


def _decode_slots(graphdef, state, cache: KVCache, seen, token, position, count, done, stop_ids, row_keys, low, *,
                  mesh: Mesh | None, steps: int, window: int, max_new_tokens: int, sampling: Sampling):
  """Up to `steps` decode steps of every slot (fewer once all are done), attending over the cache's
  `[low, low + window)` only: every live slot's tokens and the steps' own (the rest is empty or dead).

  Returns (cache, seen, new tokens `[S, steps]` (-1 where a slot was done), steps run, and each slot's
  last token, position, count of new tokens and done flag).
  """
  _TRACES["decode"] += 1
  row_keys = jax.random.wrap_key_data(row_keys)
  full = cache
  cache = KVCache(jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, low, window, axis=a.ndim - 2), cache.k),
                  jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, low, window, axis=a.ndim - 2), cache.v),
                  jax.lax.dynamic_slice_in_dim(cache.segment_ids, low, window, axis=1), cache.end - low)
  with _activation_context(mesh):
    slots = token.shape[0]
    ones = jnp.ones((slots, 1), jnp.int32)

    def keep_going(carry):
      return (carry[1] < steps) & ~jnp.all(carry[7])

    def step_once(carry):
      state, i, cache, seen, token, position, count, done, out = carry
      logits, cache = nnx.merge(graphdef, state)(token[:, None], positions=position[:, None], segment_ids=ones,
                                                 cache=cache)
      new = _next_token(logits[:, 0], row_keys, count, sampling, seen, stop_ids)
      new = jnp.where(done, token, new)
      out = out.at[:, i].set(jnp.where(done, -1, new))
      finished = done | _is_stop(new, stop_ids) | (count + 1 >= max_new_tokens)
      count = jnp.where(done, count, count + 1)
      return (state, i + 1, cache, _add_seen(seen, new), new, position + 1, count, finished, out)

    out = jnp.full((slots, steps), -1, jnp.int32)
    carry = (state, jnp.int32(0), cache, seen, token, position, count, done, out)
    _, ran, cache, seen, token, position, count, done, out = jax.lax.while_loop(keep_going, step_once, carry)
    cache = _map_kv(lambda a, w: jax.lax.dynamic_update_slice_in_dim(a, w, low, axis=a.ndim - 2), full, cache,
                    segment_ids=jax.lax.dynamic_update_slice(full.segment_ids, cache.segment_ids, (0, low)),
                    end=cache.end + low)
    return cache, seen, out, ran, token, position, count, done


def _shift_slots(cache: KVCache, shift):
  """Every row's cache moved `shift` slots left (what falls off the front is no longer live)."""
  length = cache.segment_ids.shape[1]
  live = jnp.arange(length) < length - shift
  return KVCache(jax.tree.map(lambda a: jnp.roll(a, -shift, axis=a.ndim - 2), cache.k),
                 jax.tree.map(lambda a: jnp.roll(a, -shift, axis=a.ndim - 2), cache.v),
                 jnp.where(live[None, :], jnp.roll(cache.segment_ids, -shift, axis=1), 0), cache.end - shift)


_prefill_slots_jit = jax.jit(_prefill_slots, static_argnames=("graphdef", "mesh", "sampling"), donate_argnums=(2, 3))
_decode_slots_jit = jax.jit(_decode_slots,
                            static_argnames=("graphdef", "mesh", "steps", "window", "max_new_tokens", "sampling"),
                            donate_argnums=(2, 3))
_shift_slots_jit = jax.jit(_shift_slots, donate_argnums=0)
_new_slots_cache_jit = jax.jit(_new_slots_cache, static_argnums=(0, 1, 2), static_argnames=("mesh",))
# Decode steps per device call between refills: fewer calls vs. slots idle after their row stopped.
DECODE_STEPS_PER_CALL = 16


def _generate_continuous(model: Decoder, graphdef, state, row_prompts: list[list[int]], row_keys_host: np.ndarray,
                         stop_ids: np.ndarray, *, slots: int, limit: int, max_new_tokens: int, sampling: Sampling,
                         mesh: Mesh | None, on_row_done: Callable[[int, list[int]], bool]) -> tuple[int, int, bool]:
  """Continuous batching over `row_prompts` (see above); calls `on_row_done(row, tokens)` as rows finish,
  which returns True to stop. Returns (prefill slots computed, decode steps run, stopped)."""
  order = collections.deque(sorted(range(len(row_prompts)), key=lambda i: (-len(row_prompts[i]), i)))
  longest = bucket_length(len(row_prompts[order[0]]), limit)
  steps = min(DECODE_STEPS_PER_CALL, max_new_tokens)
  length = _slots_cache_length(longest, max_new_tokens)
  cache = _new_slots_cache_jit(model.config, slots, length, mesh=mesh)
  seen = (jnp.zeros((slots, model.config.vocab_size), bool) if sampling.repetition_penalty != 1 else None)
  if seen is not None and mesh is not None:
    seen = jax.device_put(seen, NamedSharding(mesh, sharding.logical_to_spec(("batch", "vocab"), seen.shape, mesh)))
  stop_device = jnp.asarray(stop_ids)
  dp = _data_parallel_size(mesh)
  end = 0
  row_of = [-1] * slots  # the row each slot decodes (-1: free)
  start_of = [0] * slots  # the cache index where that row's prompt bucket begins
  token = np.zeros(slots, np.int32)
  position = np.zeros(slots, np.int32)
  count = np.zeros(slots, np.int32)
  done = np.ones(slots, bool)
  keys = np.zeros((slots, *row_keys_host.shape[1:]), row_keys_host.dtype)
  new_tokens: dict[int, list[int]] = {}
  prefill_slots = decode_steps = 0

  def make_room(needed_end: int) -> None:
    """Moves every row left when a call from `needed_end` would pass the cache's end. Prompts come
    longest first, so a live row spans at most the longest bucket + max_new_tokens: room is left."""
    nonlocal cache, end
    if needed_end + steps <= length:
      return
    live = [start_of[s] for s in range(slots) if row_of[s] >= 0]
    shift = min(live) if live else end
    if shift > 0:
      cache = _shift_slots_jit(cache, jnp.int32(shift))
      end -= shift
      for s in range(slots):
        start_of[s] -= shift

  def finish(s: int) -> bool:
    row = row_of[s]
    row_of[s] = -1
    done[s] = True
    return on_row_done(row, _cut_at_stop(np.asarray(new_tokens.pop(row), np.int32), stop_ids))

  while order or any(r >= 0 for r in row_of):
    free = [s for s in range(slots) if row_of[s] < 0]
    if free and order:
      taken = [order.popleft() for _ in range(min(len(free), len(order)))]
      bucket = bucket_length(max(len(row_prompts[r]) for r in taken), limit)
      make_room(max(end, bucket))
      end = max(end, bucket)
      padded = _padded_rows(len(taken), slots, dp)
      ids = np.zeros((padded, bucket), np.int32)
      segment_ids = np.zeros((padded, bucket), np.int32)
      positions = np.zeros((padded, bucket), np.int32)
      target = np.full((padded,), slots, np.int32)  # filler rows: out of range, dropped
      segment_ids[:, -1] = 1
      row_keys = np.zeros((padded, *row_keys_host.shape[1:]), row_keys_host.dtype)
      for r, (row, s) in enumerate(zip(taken, free)):
        prompt = row_prompts[row]
        ids[r, bucket - len(prompt):] = prompt
        segment_ids[r, bucket - len(prompt):] = 1
        positions[r, bucket - len(prompt):] = np.arange(len(prompt))
        target[r], row_keys[r] = s, row_keys_host[row]
      cache = KVCache(cache.k, cache.v, cache.segment_ids, jnp.int32(end))
      cache, seen, first = _prefill_slots_jit(
          graphdef, state, cache, seen, *_place_rows(mesh, ids, segment_ids, positions), jnp.asarray(target),
          stop_device, jnp.asarray(row_keys), mesh=mesh, sampling=sampling)
      prefill_slots += padded * bucket
      first = _to_host(first)
      for r, (row, s) in enumerate(zip(taken, free)):
        row_of[s], start_of[s], keys[s] = row, end - bucket, row_keys_host[row]
        token[s], position[s], count[s], done[s] = first[r], len(row_prompts[row]), 1, False
        new_tokens[row] = [int(first[r])]
        if first[r] in stop_ids or max_new_tokens == 1:
          if finish(s):
            return prefill_slots, decode_steps, True
      continue  # fill every free slot before decoding
    if not any(r >= 0 for r in row_of):
      continue
    make_room(end)
    cache = KVCache(cache.k, cache.v, cache.segment_ids, jnp.int32(end))
    live_low = min(start_of[s] for s in range(slots) if row_of[s] >= 0)
    window = min(_round_up(end + steps - live_low, WINDOW_GRID), length)
    low = min(live_low, length - window)
    cache, seen, out, ran, last, last_position, last_count, last_done = _decode_slots_jit(
        graphdef, state, cache, seen, *_place_rows(mesh, token, position, count, done), stop_device,
        jnp.asarray(keys), jnp.int32(low), mesh=mesh, steps=steps, window=window, max_new_tokens=max_new_tokens,
        sampling=sampling)
    ran = int(_to_host(ran))
    end += ran
    decode_steps += ran
    out, token, position, count, done = (_to_host(x).copy() for x in (out, last, last_position, last_count, last_done))
    for s in range(slots):
      if row_of[s] < 0:
        continue
      new_tokens[row_of[s]].extend(int(t) for t in out[s] if t >= 0)
      if done[s] and finish(s):
        return prefill_slots, decode_steps, True
  return prefill_slots, decode_steps, False


@dataclasses.dataclass(frozen=True)
class GenerateProgram:
  """The engine's generate program for one batch shape, abstract: what `--compile_for` compiles.

  `jitted(*args, **kwargs)` is the very call `generate` makes for its largest batch (`rows` left-padded
  prompts of `prompt_len` tokens, `max_new_tokens` decoded on the KV cache); `args` are
  `ShapeDtypeStruct`s with their shardings, so `jitted.lower(*args, **kwargs)` allocates nothing.
  """

  jitted: Callable
  args: tuple
  kwargs: dict
  rows: int
  params: nnx.State  # the abstract model state, with its shardings
  cache_bytes_per_device: int  # the KV cache (keys and values), one of the program's temporaries
  description: str = ""


def generate_program(model_config, mesh: Mesh, *, batch_size: int, prompt_len: int, max_new_tokens: int,
                     sampling: Sampling = None, batching: str = "static") -> GenerateProgram:
  """The abstract generate program of `model_config` on `mesh` (see `GenerateProgram`).

  With continuous batching that is the prefill of every slot at once into the slots' cache (its
  largest program: the cache plus a full prefill's activations); with static batching, the
  prefill + decode program of one batch.
  """
  from jax.sharding import PartitionSpec  # pylint: disable=import-outside-toplevel
  rows = _batch_size(batch_size, mesh)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(model_config, rngs=nnx.Rngs(0))))
  shardings = sharding.state_shardings(abstract, mesh)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)

  def by_rows(shape, dtype) -> jax.ShapeDtypeStruct:
    names = ("batch",) + (None,) * (len(shape) - 1)
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, sharding.logical_to_spec(names, shape, mesh)))

  replicated = NamedSharding(mesh, PartitionSpec())
  keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), rows))
  stop_ids = jax.ShapeDtypeStruct((2,), jnp.int32, sharding=replicated)  # end of turn, end of sequence
  args = (graphdef, state, by_rows((rows, prompt_len), jnp.int32), by_rows((rows, prompt_len), jnp.int32),
          by_rows((rows, prompt_len), jnp.int32), by_rows((rows,), jnp.bool_), stop_ids,
          jax.ShapeDtypeStruct(keys.shape, keys.dtype, sharding=replicated))
  sampling = sampling or GREEDY
  continuous = batching == "continuous" and model_config.sliding_window is None
  length = (_slots_cache_length(prompt_len, max_new_tokens) if continuous else prompt_len + max_new_tokens)
  cache_shape = (model_config.num_layers, rows, model_config.num_kv_heads, length, model_config.head_dim)
  cache_spec = sharding.logical_to_spec(_CACHE_AXES, cache_shape, mesh)
  cache_bytes = 2 * int(np.prod(NamedSharding(mesh, cache_spec).shard_shape(cache_shape))) * jnp.dtype(
      model_config.dtype).itemsize
  if not continuous:
    return GenerateProgram(_generate_batch_jit, args, dict(mesh=mesh, max_new_tokens=max_new_tokens,
                                                           sampling=sampling), rows, state, cache_bytes,
                           f"generate {rows} rows x {prompt_len} prompt tokens + {max_new_tokens} new")
  cache = jax.eval_shape(lambda: KVCache.empty(model_config, rows, length))

  def cache_array(a):
    spec = sharding.logical_to_spec(_CACHE_AXES[-a.ndim:], a.shape, mesh)
    return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, spec))

  cache = KVCache(jax.tree.map(cache_array, cache.k), jax.tree.map(cache_array, cache.v),
                  by_rows(cache.segment_ids.shape, cache.segment_ids.dtype),
                  jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated))
  seen = by_rows((rows, model_config.vocab_size), jnp.bool_) if sampling.repetition_penalty != 1 else None
  key_data = jax.eval_shape(lambda: jax.random.key_data(jax.random.split(jax.random.key(0), rows)))
  slot_args = (graphdef, state, cache, seen, *args[2:5], jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=replicated),
               stop_ids, jax.ShapeDtypeStruct(key_data.shape, key_data.dtype, sharding=replicated))
  return GenerateProgram(_prefill_slots_jit, slot_args, dict(mesh=mesh, sampling=sampling), rows, state, cache_bytes,
                         f"continuous batching: {rows} slots, a {length}-token cache each; prefill of {rows} x "
                         f"{prompt_len} prompt tokens")


def _slots_cache_length(longest_bucket: int, max_new_tokens: int) -> int:
  """The slots' cache: the longest live row (prompt bucket + new tokens) and room for the calls between
  moves left."""
  return longest_bucket + max_new_tokens + max(2 * min(DECODE_STEPS_PER_CALL, max_new_tokens), 64)


def _row_keys(seed: int, prompt_ids: np.ndarray, sample_ids: np.ndarray) -> jax.Array:
  base = jax.random.key(seed)
  per_prompt = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(base, jnp.asarray(prompt_ids))
  return jax.vmap(jax.random.fold_in)(per_prompt, jnp.asarray(sample_ids))


def _cut_at_stop(row: np.ndarray, stop_ids: np.ndarray) -> list[int]:
  stops = np.flatnonzero(np.isin(row, stop_ids))
  end = int(stops[0]) + 1 if len(stops) else len(row)
  return row[:end].tolist()


def prompt_limit(model: Decoder, max_new_tokens: int, max_prompt_len: int | None = None) -> int:
  """The most prompt tokens `generate` keeps (longer prompts lose their start)."""
  limit = max_prompt_len or model.config.max_position_embeddings - max_new_tokens
  if limit < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                     f"context of {model.config.max_position_embeddings} tokens; lower max_new_tokens.")
  return limit


def generate(model: Decoder, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             eos_token_id: int | Sequence[int] | None, *, sampling: Sampling = GREEDY, num_samples: int = 1,
             seed: int = 0, batch_size: int = 16, max_prompt_len: int | None = None,
             mesh: Mesh | None = None, progress: Progress | None = None,
             share_prefixes: bool = True, key_ids: Sequence[int] | None = None,
             on_prompt_done: Callable[[int, list[list[int]]], None] | None = None,
             should_stop: Callable[[], bool] | None = None, batching: str = "static") -> Generation:
  """Generates `num_samples` continuations of every prompt.

  Args:
    model: the decoder (its parameters are placed on `mesh` when one is given).
    prompts: token ids per prompt (no padding); each needs at least one token.
    max_new_tokens: the most new tokens per sequence.
    eos_token_id: stop token id(s) (e.g. end-of-turn and end-of-sequence), or None.
    sampling: `GREEDY` (default) or temperature/top-p sampling, optionally with a repetition penalty
      and a minimum number of new tokens.
    num_samples: sequences per prompt (e.g. several samples for CMB's majority vote).
    seed: sampling seed (see the module docstring for what it determines).
    batch_size: sequences per compiled batch (rounded up to the data-parallel size).
    max_prompt_len: longer prompts keep their last `max_prompt_len` tokens; default: the model's
      `max_position_embeddings - max_new_tokens`.
    mesh: run sharded on this mesh (rows over data/fsdp, weights per `csft_jax.sharding`).
    progress: called with the number of prompts finished after each batch.
    share_prefixes: prefill a prefix common to a batch's prompts once (`plan_generation`); the
      outputs are the same either way.
    key_ids: the index each prompt's sampling randomness is keyed by (default: its position);
      an evaluation that resumes with the prompts still to do passes their original indices.
    on_prompt_done: called with (prompt index, its samples' tokens) once all its samples are done.
    should_stop: asked after each batch; True ends the call early (`Generation.stopped`).
    batching: 'static' (default): each batch decodes until its last row stops, and prompts with a
      common start share its prefill (`share_prefixes`); 'continuous': `batch_size` decode slots, a
      slot takes the next prompt as soon as its row stops. The tokens are the same. A model with a
      sliding window always runs 'static'.

  Returns:
    A `Generation`; `tokens[i][s]` holds the new tokens of prompt i, sample s, up to and including
    the first stop token.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1.")
  if num_samples < 1:
    raise ValueError(f"num_samples={num_samples} must be >= 1.")
  if num_samples > 1 and sampling.greedy:
    logging.warning("num_samples=%d with greedy decoding gives identical samples; set a temperature.",
                    num_samples)
  limit = prompt_limit(model, max_new_tokens, max_prompt_len)
  truncated = []
  for index, prompt in enumerate(prompts):
    if not len(prompt):
      raise ValueError(f"prompt {index} is empty: generation needs at least one prompt token.")
    truncated.append(_truncate_left(prompt, limit))
  if any(cut for _, cut in truncated):
    logging.warning("%d of %d prompts are longer than %d tokens and were truncated from the left.",
                    sum(cut for _, cut in truncated), len(prompts), limit)

  sequences = [(p, s) for p in range(len(prompts)) for s in range(num_samples)]
  stop_ids = _stop_ids(eos_token_id)
  graphdef, state = _place_state(model, mesh)
  stop_ids_device = jnp.asarray(stop_ids)
  tokens: list[list[list[int]]] = [[[] for _ in range(num_samples)] for _ in prompts]
  traces_before, done_prompts = _TRACES["generate"], 0
  remaining = collections.Counter(p for p, _ in sequences)
  row_prompts = [truncated[p][0] for p, _ in sequences]
  # A sliding window counts slots, and the padding between a shared prefix and a row's suffix
  # would put slots between tokens: such models prefill whole prompts.
  share = share_prefixes and model.config.sliding_window is None
  dp = _data_parallel_size(mesh)
  prefill_slots, decode_steps, stopped = 0, 0, False
  if batching not in ("continuous", "static"):
    raise ValueError(f"batching={batching!r}; choose 'continuous' or 'static'.")
  if batching == "continuous" and model.config.sliding_window is None:
    prompt_ids = np.asarray([p if key_ids is None else key_ids[p] for p, _ in sequences], np.int32)
    keys = np.asarray(jax.random.key_data(_row_keys(seed, prompt_ids, np.asarray([s for _, s in sequences], np.int32))))

    def on_row_done(row: int, row_tokens: list[int]) -> bool:
      nonlocal done_prompts
      p, s = sequences[row]
      tokens[p][s] = row_tokens
      remaining[p] -= 1
      if remaining[p]:
        return False
      done_prompts += 1
      if on_prompt_done is not None:
        on_prompt_done(p, tokens[p])
      if progress is not None:
        progress(done_prompts)
      return should_stop is not None and done_prompts < len(prompts) and should_stop()

    before = (_TRACES["prefill"], _TRACES["decode"])
    prefill_slots, decode_steps, stopped = _generate_continuous(
        model, graphdef, state, row_prompts, keys, stop_ids, slots=_batch_size(batch_size, mesh), limit=limit,
        max_new_tokens=max_new_tokens, sampling=sampling, mesh=mesh, on_row_done=on_row_done)
    compiled = _TRACES["prefill"] - before[0] + _TRACES["decode"] - before[1]
    if compiled:
      logging.info("generate: compiled %d continuous-batching programs (%d prefill, %d decode so far).", compiled,
                   _TRACES["prefill"], _TRACES["decode"])
    return Generation(tokens, sum(cut for _, cut in truncated), compiled, prefill_slots, stopped, decode_steps)
  for plan in plan_generation(row_prompts, _batch_size(batch_size, mesh), limit, dp, share):
    rows, padded_rows, padded_len, prefix_len = plan.rows, plan.padded_rows, plan.padded_len, plan.prefix_len
    ids = np.zeros((padded_rows, padded_len), np.int32)
    segment_ids = np.zeros((padded_rows, padded_len), np.int32)
    positions = np.full((padded_rows, padded_len), prefix_len, np.int32)
    active = np.zeros((padded_rows,), bool)
    prompt_ids = np.zeros((padded_rows,), np.int32)
    sample_ids = np.zeros((padded_rows,), np.int32)
    # Filler rows hold one token so no row attends to nothing; they start finished.
    segment_ids[:, -1] = 1
    for r, row in enumerate(rows):
      p, s = sequences[row]
      own = row_prompts[row][prefix_len:]
      ids[r, padded_len - len(own):] = own
      segment_ids[r, padded_len - len(own):] = 1
      # As HF does for left padding: real tokens count positions from 0 (the prefix's come first).
      positions[r, padded_len - len(own):] = prefix_len + np.arange(len(own))
      active[r], prompt_ids[r], sample_ids[r] = True, p if key_ids is None else key_ids[p], s
    before = _TRACES["generate"]
    row_args = (*_place_rows(mesh, ids, segment_ids, positions, active), stop_ids_device,
                _row_keys(seed, prompt_ids, sample_ids))
    options = dict(mesh=mesh, max_new_tokens=max_new_tokens, sampling=sampling)
    if prefix_len:
      prefix = np.tile(np.asarray(row_prompts[rows[0]][:prefix_len], np.int32), (dp, 1))
      out = _generate_shared_batch_jit(graphdef, state, *_place_rows(mesh, prefix), *row_args, **options)
      shape = f"{padded_rows} rows x ({prefix_len} shared + {padded_len}) prompt tokens + {max_new_tokens} new"
    else:
      out = _generate_batch_jit(graphdef, state, *row_args, **options)
      shape = f"{padded_rows} rows x {padded_len} prompt tokens + {max_new_tokens} new"
    prefill_slots += dp * prefix_len + padded_rows * padded_len
    _log_compiles("generate", before, shape)
    out = _to_host(out)
    for r, row in enumerate(rows):
      p, s = sequences[row]
      tokens[p][s] = _cut_at_stop(out[r], stop_ids)
    decode_steps += max(len(tokens[p][s]) for p, s in (sequences[row] for row in rows)) - 1
    for row in rows:
      p, s = sequences[row]
      remaining[p] -= 1
      if remaining[p] == 0:
        done_prompts += 1
        if on_prompt_done is not None:
          on_prompt_done(p, tokens[p])
    if progress is not None:
      progress(done_prompts)
    if should_stop is not None and done_prompts < len(prompts) and should_stop():
      stopped = True
      break
  return Generation(tokens, sum(cut for _, cut in truncated), _TRACES["generate"] - traces_before, prefill_slots,
                    stopped, decode_steps)


def greedy_generate(model: Decoder, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    eos_token_id: int | Sequence[int] | None, **kwargs) -> list[list[int]]:
  """Greedy new tokens per prompt, up to and including the first stop token.

  Args:
    model, prompts, max_new_tokens, eos_token_id: as in `generate`.
    **kwargs: `generate` options (batch_size, max_prompt_len, mesh, progress).

  Returns:
    One list of new token ids per prompt.
  """
  return [samples[0] for samples in generate(model, prompts, max_new_tokens, eos_token_id, **kwargs).tokens]


# ---------------------------------------------------------------- scoring ----


def _score_batch(graphdef, state, tokens, segment_ids, target_mask, last_index, *, mesh: Mesh | None):
  """Right-padded rows -> (sum of log p(token t+1 | ..t) where target_mask[t], log p at last_index).

  Returns `([B] float32, [B, V] float32)`.
  """
  _TRACES["score"] += 1
  with _activation_context(mesh):
    model = nnx.merge(graphdef, state)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    logits = model(tokens, positions=positions, segment_ids=segment_ids)
    # log p = logit - logsumexp: avoids materialising a second [B, T, V] array of log-probs.
    log_norm = jax.nn.logsumexp(logits, axis=-1)
    targets = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    prefix = jnp.sum(jnp.where(target_mask, target_logits - log_norm, 0.0), axis=-1)
    last_logits = jnp.take_along_axis(logits, last_index[:, None, None], axis=1)[:, 0]
    return prefix, jax.nn.log_softmax(last_logits, axis=-1)


_score_batch_jit = jax.jit(_score_batch, static_argnames=("graphdef", "mesh"))


def score(model: Decoder, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]], *,
          batch_size: int = 16, max_len: int | None = None, mesh: Mesh | None = None,
          progress: Progress | None = None, should_stop: Callable[[], bool] | None = None) -> Scores | None:
  """Summed log p(continuation | context) per pair, in float32.

  Pairs whose `context + continuation[:-1]` is the same sequence (e.g. one question scored against
  each option letter) share one forward pass: only the last token's log-probability differs.

  Args:
    model: the decoder.
    contexts: token ids of each context (at least one token).
    continuations: token ids to score after each context (at least one token).
    batch_size: forward-pass rows per batch.
    max_len: longer inputs lose context tokens from the left; default `max_position_embeddings`.
    mesh: run sharded on this mesh.
    progress: called with the number of pairs scored after each batch.
    should_stop: asked after each batch; True ends the call early and returns None.

  Returns:
    `Scores` with one value per pair (None when `should_stop` ended the call).
  """
  if len(contexts) != len(continuations):
    raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations.")
  limit = max_len or model.config.max_position_embeddings
  inputs: dict[tuple[tuple[int, ...], int], list[int]] = {}
  num_truncated = 0
  for index, (context, continuation) in enumerate(zip(contexts, continuations)):
    if not len(context) or not len(continuation):
      raise ValueError(f"pair {index}: context ({len(context)} tokens) and continuation "
                       f"({len(continuation)} tokens) must both be non-empty.")
    if len(continuation) > limit:
      raise ValueError(f"pair {index}: continuation of {len(continuation)} tokens does not fit max_len={limit}.")
    sequence, cut = _truncate_left(list(context) + list(continuation[:-1]), limit)
    num_truncated += cut
    inputs.setdefault((tuple(sequence), len(continuation)), []).append(index)
  if num_truncated:
    logging.warning("%d of %d contexts were truncated from the left to fit %d tokens.",
                    num_truncated, len(contexts), limit)

  keys = list(inputs)
  graphdef, state = _place_state(model, mesh)
  values = [0.0] * len(contexts)
  traces_before, scored = _TRACES["score"], 0
  for rows, padded_rows, padded_len in plan_batches([len(k[0]) for k in keys], _batch_size(batch_size, mesh),
                                                    limit, _data_parallel_size(mesh)):
    ids = np.zeros((padded_rows, padded_len), np.int32)
    segment_ids = np.zeros((padded_rows, padded_len), np.int32)
    target_mask = np.zeros((padded_rows, padded_len), bool)
    last_index = np.zeros((padded_rows,), np.int32)
    for r, row in enumerate(rows):
      sequence, cont_len = keys[row]
      n = len(sequence)
      ids[r, :n], segment_ids[r, :n], last_index[r] = sequence, 1, n - 1
      # Position t predicts token t+1: the shared continuation tokens sit at n-cont_len+1..n-1.
      target_mask[r, n - cont_len:n - 1] = True
    before = _TRACES["score"]
    prefix, last_log_probs = _score_batch_jit(
        graphdef, state, *_place_rows(mesh, ids, segment_ids, target_mask, last_index), mesh=mesh)
    _log_compiles("score", before, f"{padded_rows} rows x {padded_len} tokens")
    prefix, last_log_probs = _to_host(prefix), _to_host(last_log_probs)
    for r, row in enumerate(rows):
      for index in inputs[keys[row]]:
        values[index] = float(prefix[r] + last_log_probs[r, continuations[index][-1]])
        scored += 1
    if progress is not None:
      progress(scored)
    if should_stop is not None and scored < len(contexts) and should_stop():
      return None
  return Scores(values, num_truncated, _TRACES["score"] - traces_before)


def score_continuations(model: Decoder, contexts: Sequence[Sequence[int]],
                        continuations: Sequence[Sequence[int]], **kwargs) -> list[float]:
  """Summed log-probabilities of each continuation after its context (see `score`).

  Returns:
    One float per (context, continuation) pair.
  """
  return score(model, contexts, continuations, **kwargs).values
