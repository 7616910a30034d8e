"""The host side: truncation, batches or slots, placing rows, collecting tokens, progress and early stop."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding

from csft_jax import sharding
from csft_jax.eval.engine.plans import (
  _batch_size,
  _data_parallel_size,
  _left_padded,
  _padded_rows,
  _round_up,
  _truncate_left,
  bucket_length,
  plan_batches,
  plan_generation,
  prefix_groups,
  prompt_limit,
)
from csft_jax.eval.engine.programs import (
  _TRACES,
  DECODE_STEPS_PER_CALL,
  WINDOW_GRID,
  _decode_slots_jit,
  _generate_batch_jit,
  _log_compiles,
  _new_slots_cache_jit,
  _place_rows,
  _place_state,
  _prefill_prefix_jit,
  _prefill_slots_jit,
  _score_batch_jit,
  _shift_slots_jit,
  _slots_cache_length,
  _to_host,
)
from csft_jax.eval.engine.sampling import GREEDY, Sampling, _cut_at_stop, _row_keys, _stop_ids
from csft_jax.models import Decoder, KVCache

Progress = Callable[[int], None]


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


def _generate_continuous(
  model: Decoder,
  graphdef,
  state,
  row_prompts: list[list[int]],
  row_keys_host: np.ndarray,
  stop_ids: np.ndarray,
  *,
  slots: int,
  limit: int,
  max_new_tokens: int,
  sampling: Sampling,
  mesh: Mesh | None,
  on_row_done: Callable[[int, list[int]], bool],
  share: bool,
) -> tuple[int, int, bool]:
  """Continuous batching over `row_prompts` (see above); calls `on_row_done(row, tokens)` as rows finish,
  which returns True to stop. With `share`, rows that start alike (`prefix_groups`) come one after the
  other, their prefix is prefilled once and its keys/values copied into each slot that takes one of them.
  Returns (prefill slots computed, decode steps run, stopped)."""
  groups = prefix_groups(row_prompts) if share else []
  group_of = {row: g for g, (rows, _) in enumerate(groups) for row in rows}
  prefix_of = {None: 0, **{g: prefix for g, (_, prefix) in enumerate(groups)}}  # group (None: none) -> its prefix
  left_in_group = [len(rows) for rows, _ in groups]
  prefix_caches: dict[int, tuple[jax.Array, KVCache]] = {}

  def by_length(rows: list[int]) -> list[int]:
    return sorted(rows, key=lambda i: (-len(row_prompts[i]), i))

  order = collections.deque(
    [row for rows, _ in groups for row in by_length(rows)]
    + by_length([i for i in range(len(row_prompts)) if i not in group_of])
  )

  def region(rows: list[int], prefix: int) -> int:
    """Cache slots the rows' prefill takes: the prefix, then the rest left-padded to a bucket."""
    return prefix + bucket_length(max(len(row_prompts[r]) for r in rows) - prefix, limit - prefix)

  longest = max(region([i], prefix_of[group_of.get(i)]) for i in range(len(row_prompts)))
  steps = min(DECODE_STEPS_PER_CALL, max_new_tokens)
  length = _slots_cache_length(longest, max_new_tokens)
  cache = _new_slots_cache_jit(model.config, slots, length, mesh=mesh)
  seen = jnp.zeros((slots, model.config.vocab_size), bool) if sampling.repetition_penalty != 1 else None
  if seen is not None and mesh is not None:
    seen = jax.device_put(seen, NamedSharding(mesh, sharding.logical_to_spec(("batch", "vocab"), seen.shape, mesh)))
  stop_device = jnp.asarray(stop_ids)
  dp = _data_parallel_size(mesh)
  end = 0
  row_of = [-1] * slots  # the row each slot decodes (-1: free)
  start_of = [0] * slots  # the cache index where that row's prompt region begins
  token = np.zeros(slots, np.int32)
  position = np.zeros(slots, np.int32)
  count = np.zeros(slots, np.int32)
  done = np.ones(slots, bool)
  keys = np.zeros((slots, *row_keys_host.shape[1:]), row_keys_host.dtype)
  new_tokens: dict[int, list[int]] = {}
  prefill_slots = decode_steps = 0

  def make_room(needed_end: int) -> None:
    """Moves every row left when a call from `needed_end` would pass the cache's end. A live row spans
    at most the longest region + max_new_tokens, which the cache holds with room to spare."""
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
      parts = collections.defaultdict(list)  # one prefill per prefix group among the rows taken
      for row, s in zip(taken, free):
        parts[group_of.get(row)].append((row, s))
      regions = {g: region([r for r, _ in part], prefix_of[g]) for g, part in parts.items()}
      make_room(max(end, *regions.values()))
      end = max(end, *regions.values())
      cache = KVCache(cache.k, cache.v, cache.segment_ids, jnp.int32(end))
      for g, part in parts.items():
        prefix = prefix_of[g]
        bucket = regions[g] - prefix
        padded = _padded_rows(len(part), slots, dp)
        ids, segment_ids, positions = _left_padded(
          [row_prompts[row][prefix:] for row, _ in part], padded, bucket, prefix
        )
        target = np.full((padded,), slots, np.int32)  # filler rows: out of range, dropped
        row_keys = np.zeros((padded, *row_keys_host.shape[1:]), row_keys_host.dtype)
        for r, (row, s) in enumerate(part):
          target[r], row_keys[r] = s, row_keys_host[row]
        shared = {}
        if g is not None:
          if g not in prefix_caches:
            prefix_ids = _place_rows(mesh, np.tile(np.asarray(row_prompts[part[0][0]][:prefix], np.int32), (dp, 1)))[0]
            prefix_caches[g] = (prefix_ids, _prefill_prefix_jit(graphdef, state, prefix_ids, mesh=mesh))
            prefill_slots += dp * prefix
          shared = dict(zip(("prefix", "prefix_cache"), prefix_caches[g]))
          left_in_group[g] -= len(part)
          if not left_in_group[g]:
            del prefix_caches[g]
        cache, seen, first = _prefill_slots_jit(
          graphdef,
          state,
          cache,
          seen,
          *_place_rows(mesh, ids, segment_ids, positions),
          jnp.asarray(target),
          stop_device,
          jnp.asarray(row_keys),
          **shared,
          mesh=mesh,
          sampling=sampling,
        )
        prefill_slots += padded * bucket
        first = _to_host(first)
        for r, (row, s) in enumerate(part):
          row_of[s], start_of[s], keys[s] = row, end - prefix - bucket, row_keys_host[row]
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
      graphdef,
      state,
      cache,
      seen,
      *_place_rows(mesh, token, position, count, done),
      stop_device,
      jnp.asarray(keys),
      jnp.int32(low),
      mesh=mesh,
      steps=steps,
      window=window,
      max_new_tokens=max_new_tokens,
      sampling=sampling,
    )
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


def generate(
  model: Decoder,
  prompts: Sequence[Sequence[int]],
  max_new_tokens: int,
  eos_token_id: int | Sequence[int] | None,
  *,
  sampling: Sampling = GREEDY,
  num_samples: int = 1,
  seed: int = 0,
  batch_size: int = 16,
  max_prompt_len: int | None = None,
  mesh: Mesh | None = None,
  progress: Progress | None = None,
  share_prefixes: bool = True,
  key_ids: Sequence[int] | None = None,
  on_prompt_done: Callable[[int, list[list[int]]], None] | None = None,
  should_stop: Callable[[], bool] | None = None,
  batching: str = "static",
) -> Generation:
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
    logging.warning("num_samples=%d with greedy decoding gives identical samples; set a temperature.", num_samples)
  limit = prompt_limit(model, max_new_tokens, max_prompt_len)
  truncated = []
  for index, prompt in enumerate(prompts):
    if not len(prompt):
      raise ValueError(f"prompt {index} is empty: generation needs at least one prompt token.")
    truncated.append(_truncate_left(prompt, limit))
  if any(cut for _, cut in truncated):
    logging.warning(
      "%d of %d prompts are longer than %d tokens and were truncated from the left.",
      sum(cut for _, cut in truncated),
      len(prompts),
      limit,
    )

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
  options = dict(mesh=mesh, max_new_tokens=max_new_tokens, sampling=sampling)  # both batchings'
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
      model,
      graphdef,
      state,
      row_prompts,
      keys,
      stop_ids,
      slots=_batch_size(batch_size, mesh),
      limit=limit,
      on_row_done=on_row_done,
      share=share,
      **options,
    )
    compiled = _TRACES["prefill"] - before[0] + _TRACES["decode"] - before[1]
    if compiled:
      logging.info(
        "generate: compiled %d continuous-batching programs (%d prefill, %d decode so far).",
        compiled,
        _TRACES["prefill"],
        _TRACES["decode"],
      )
    return Generation(tokens, sum(cut for _, cut in truncated), compiled, prefill_slots, stopped, decode_steps)
  for plan in plan_generation(row_prompts, _batch_size(batch_size, mesh), limit, dp, share):
    rows, padded_rows, padded_len, prefix_len = plan.rows, plan.padded_rows, plan.padded_len, plan.prefix_len
    ids, segment_ids, positions = _left_padded(
      [row_prompts[row][prefix_len:] for row in rows], padded_rows, padded_len, prefix_len
    )
    active = np.zeros((padded_rows,), bool)  # filler rows start finished
    prompt_ids = np.zeros((padded_rows,), np.int32)
    sample_ids = np.zeros((padded_rows,), np.int32)
    for r, row in enumerate(rows):
      p, s = sequences[row]
      active[r], prompt_ids[r], sample_ids[r] = True, p if key_ids is None else key_ids[p], s
    before = _TRACES["generate"]
    row_args = (
      *_place_rows(mesh, ids, segment_ids, positions, active),
      stop_ids_device,
      _row_keys(seed, prompt_ids, sample_ids),
    )
    if prefix_len:
      prefix = np.tile(np.asarray(row_prompts[rows[0]][:prefix_len], np.int32), (dp, 1))
      out = _generate_batch_jit(graphdef, state, *_place_rows(mesh, prefix), *row_args, **options)
      shape = f"{padded_rows} rows x ({prefix_len} shared + {padded_len}) prompt tokens + {max_new_tokens} new"
    else:
      out = _generate_batch_jit(graphdef, state, None, *row_args, **options)
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
  return Generation(
    tokens, sum(cut for _, cut in truncated), _TRACES["generate"] - traces_before, prefill_slots, stopped, decode_steps
  )


def greedy_generate(
  model: Decoder,
  prompts: Sequence[Sequence[int]],
  max_new_tokens: int,
  eos_token_id: int | Sequence[int] | None,
  **kwargs,
) -> list[list[int]]:
  """Greedy new tokens per prompt, up to and including the first stop token.

  Args:
    model, prompts, max_new_tokens, eos_token_id: as in `generate`.
    **kwargs: `generate` options (batch_size, max_prompt_len, mesh, progress).

  Returns:
    One list of new token ids per prompt.
  """
  return [samples[0] for samples in generate(model, prompts, max_new_tokens, eos_token_id, **kwargs).tokens]


def score(
  model: Decoder,
  contexts: Sequence[Sequence[int]],
  continuations: Sequence[Sequence[int]],
  *,
  batch_size: int = 16,
  max_len: int | None = None,
  mesh: Mesh | None = None,
  progress: Progress | None = None,
  should_stop: Callable[[], bool] | None = None,
) -> Scores | None:
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
      raise ValueError(
        f"pair {index}: context ({len(context)} tokens) and continuation "
        f"({len(continuation)} tokens) must both be non-empty."
      )
    if len(continuation) > limit:
      raise ValueError(f"pair {index}: continuation of {len(continuation)} tokens does not fit max_len={limit}.")
    sequence, cut = _truncate_left(list(context) + list(continuation[:-1]), limit)
    num_truncated += cut
    inputs.setdefault((tuple(sequence), len(continuation)), []).append(index)
  if num_truncated:
    logging.warning(
      "%d of %d contexts were truncated from the left to fit %d tokens.", num_truncated, len(contexts), limit
    )

  keys = list(inputs)
  graphdef, state = _place_state(model, mesh)
  values = [0.0] * len(contexts)
  traces_before, scored = _TRACES["score"], 0
  for rows, padded_rows, padded_len in plan_batches(
    [len(k[0]) for k in keys], _batch_size(batch_size, mesh), limit, _data_parallel_size(mesh)
  ):
    ids = np.zeros((padded_rows, padded_len), np.int32)
    segment_ids = np.zeros((padded_rows, padded_len), np.int32)
    target_mask = np.zeros((padded_rows, padded_len), bool)
    last_index = np.zeros((padded_rows,), np.int32)
    for r, row in enumerate(rows):
      sequence, cont_len = keys[row]
      n = len(sequence)
      ids[r, :n], segment_ids[r, :n], last_index[r] = sequence, 1, n - 1
      # Position t predicts token t+1: the shared continuation tokens sit at n-cont_len+1..n-1.
      target_mask[r, n - cont_len : n - 1] = True
    before = _TRACES["score"]
    prefix, last_log_probs = _score_batch_jit(
      graphdef, state, *_place_rows(mesh, ids, segment_ids, target_mask, last_index), mesh=mesh
    )
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


def score_continuations(
  model: Decoder, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]], **kwargs
) -> list[float]:
  """Summed log-probabilities of each continuation after its context (see `score`).

  Returns:
    One float per (context, continuation) pair.
  """
  return score(model, contexts, continuations, **kwargs).values
