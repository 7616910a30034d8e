"""The jitted programs of generation and scoring, and the KV cache they carry.

Static batches: one program per batch runs the prefill and then `lax.while_loop`s of single-token
decode steps, entirely on device, until every row has produced a stop token or `max_new_tokens`
tokens. Continuous batching: a prefill program per (rows, bucket) writes new prompts into free
decode slots, and one decode program per cache window runs a few steps of every slot.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from csft_jax import sharding
from csft_jax.eval.engine.plans import _batch_size
from csft_jax.eval.engine.sampling import GREEDY, Sampling, _add_seen, _is_stop, _next_token, _seen_tokens
from csft_jax.models import Decoder, KVCache

# Decode attends over windows of the cache that grow by this many slots: few programs (or loops), and
# little attention to slots not written yet or no longer live.
WINDOW_GRID = 64
_CACHE_AXES = ("layers", "batch", "kv_heads", "length", "head_dim")
# Number of times each jitted program was traced (= compiled) in this process.
_TRACES: collections.Counter = collections.Counter()


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
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def _activation_context(mesh: Mesh | None):
  return sharding.activation_sharding(mesh) if mesh is not None else contextlib.nullcontext()


def _log_compiles(name: str, before: int, shape: str) -> None:
  if _TRACES[name] > before:
    logging.info("%s: compiled a program for %s (%d so far in this process).", name, shape, _TRACES[name])


def _map_kv(fn, cache: KVCache, *others: KVCache, segment_ids=None, end=None) -> KVCache:
  """`cache` with `fn(array, *others' arrays)` for each of its key and value arrays (one per layer,
  or stacked: batch is axis -4 and length -2 in both forms), pinned like the activations (rows over
  data, KV heads over tensor: the largest live buffer of the loop must not be replicated)."""

  def pinned(*arrays):
    out = fn(*arrays)
    return sharding.constrain(out, _CACHE_AXES[-out.ndim :])

  return KVCache(
    jax.tree.map(pinned, cache.k, *(o.k for o in others)),
    jax.tree.map(pinned, cache.v, *(o.v for o in others)),
    sharding.constrain(cache.segment_ids if segment_ids is None else segment_ids, ("batch", "length")),
    cache.end if end is None else end,
  )


def _empty_cache(model: Decoder, batch: int, length: int) -> KVCache:
  return _map_kv(lambda a: a, KVCache.empty(model.config, batch, length))


def _grown(cache: KVCache, extra: int) -> KVCache:
  """`cache` with `extra` empty slots after its last."""

  def pad(a):
    return jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, extra), (0, 0)])

  return _map_kv(pad, cache, segment_ids=jnp.pad(cache.segment_ids, ((0, 0), (0, extra))))


def _prefix_cache(model: Decoder, prefix: jax.Array) -> KVCache:
  """The keys/values of `prefix` `[R, P]` (R identical rows, one per data-parallel shard)."""
  positions = jnp.broadcast_to(jnp.arange(prefix.shape[1], dtype=jnp.int32), prefix.shape)
  _, cache = model(
    prefix,
    positions=positions,
    segment_ids=jnp.ones_like(prefix),
    cache=_empty_cache(model, *prefix.shape),
    prefill=True,
    last_logits_only=True,
  )
  return cache


def _prefill_rows(
  model: Decoder, tokens, segment_ids, positions, prefix, prefix_cache: KVCache | None, *, penalize: bool
):
  """Prefills rows `tokens` `[B, S]` (left-padded) into a new cache.

  `prefix_cache` None: the rows are whole prompts. Else they continue `prefix` `[R, P]` whose
  keys/values are `prefix_cache` (positions from P on): row r takes prefix row r // (B / R) (its
  shard's), and its tokens attend over the prefix and themselves. Padding between the prefix and a
  row's tokens is segment 0, never attended, so each row computes what it would on its whole prompt.

  Returns (logits at the last position `[B, 1, V]`, the rows' cache (`[B, S]`, or `[B, P + S]` after
  a prefix), and the tokens each row holds for the repetition penalty when `penalize`, else None).
  """
  if prefix_cache is None:
    logits, cache = model(
      tokens,
      positions=positions,
      segment_ids=segment_ids,
      cache=_empty_cache(model, *tokens.shape),  # a decode loop grows it window by window
      prefill=True,
      last_logits_only=True,
    )
    return logits, cache, _seen_tokens(tokens, segment_ids, logits.shape[-1]) if penalize else None
  rows, prefix_len = tokens.shape[0], prefix.shape[1]
  copies = rows // prefix.shape[0]
  cache = _map_kv(
    lambda a: jnp.repeat(a, copies, axis=a.ndim - 4), prefix_cache, segment_ids=jnp.ones((rows, prefix_len), jnp.int32)
  )
  logits, cache = model(
    tokens, positions=positions, segment_ids=segment_ids, cache=_grown(cache, tokens.shape[1]), last_logits_only=True
  )
  seen = None
  if penalize:
    whole = jnp.concatenate([jnp.repeat(prefix, copies, axis=0), tokens], axis=1)
    seen = _seen_tokens(whole, cache.segment_ids, logits.shape[-1])
  return logits, cache, seen


def _generate_batch(
  graphdef,
  state,
  prefix,
  tokens,
  segment_ids,
  positions,
  active,
  stop_ids,
  row_keys,
  *,
  mesh: Mesh | None,
  max_new_tokens: int,
  sampling: Sampling,
):
  """Prefill + decode loop for one left-padded batch; returns `[B, max_new_tokens]` int32.

  `prefix` None: `tokens` `[B, S]` are the rows' whole prompts. Else every row starts with `prefix`
  `[R, P]` (R identical rows): it is prefilled once per data-parallel shard (R = that many rows, so
  each device computes its own copy and nothing is gathered) and its keys/values fill the first P
  slots of every row's cache; `tokens` are then the rows' own, left-padded suffixes, whose positions
  continue from P (`_prefill_rows`).
  """
  _TRACES["generate"] += 1
  penalize = sampling.repetition_penalty != 1
  with _activation_context(mesh):
    model = nnx.merge(graphdef, state)
    prefix_cache = None if prefix is None else _prefix_cache(model, prefix)
    logits, cache, seen = _prefill_rows(model, tokens, segment_ids, positions, prefix, prefix_cache, penalize=penalize)
    return _decode(
      graphdef,
      state,
      cache,
      logits[:, -1],
      positions[:, -1] + 1,
      active,
      seen,
      stop_ids,
      row_keys,
      max_new_tokens=max_new_tokens,
      sampling=sampling,
    )


def _decode(
  graphdef,
  state,
  cache: KVCache,
  last_logits,
  first_position,
  active,
  seen,
  stop_ids,
  row_keys,
  *,
  max_new_tokens: int,
  sampling: Sampling,
) -> jax.Array:
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
      token[:, None], positions=(first_position + step - 1)[:, None], segment_ids=ones, cache=cache
    )
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


def _prefill_prefix(graphdef, state, prefix, *, mesh: Mesh | None) -> KVCache:
  """The keys/values of `prefix` `[R, P]` (R identical rows, one per data-parallel shard)."""
  _TRACES["prefix"] += 1
  with _activation_context(mesh):
    return _prefix_cache(nnx.merge(graphdef, state), prefix)


def _prefill_slots(
  graphdef,
  state,
  cache: KVCache,
  seen,
  tokens,
  segment_ids,
  positions,
  slots,
  stop_ids,
  row_keys,
  prefix=None,
  prefix_cache: KVCache | None = None,
  *,
  mesh: Mesh | None,
  sampling: Sampling,
):
  """Prefills `[R, b]` left-padded prompts into cache rows `slots` (index >= slots: a filler row, dropped)
  at `[end - b, end)`; returns (cache, seen, first new token `[R]`).

  With `prefix` `[D, P]` (the prompts' common start, one row per data-parallel shard) and its keys/values
  `prefix_cache` (`_prefill_prefix`), `tokens` are the rest of each prompt (positions from P on): they
  attend over the prefix and themselves, and the rows get `[end - P - b, end)`.
  """
  _TRACES["prefill"] += 1
  row_keys = jax.random.wrap_key_data(row_keys)
  with _activation_context(mesh):
    model = nnx.merge(graphdef, state)
    logits, own, new_seen = _prefill_rows(
      model, tokens, segment_ids, positions, prefix, prefix_cache, penalize=seen is not None
    )
    first = _next_token(logits[:, -1], row_keys, jnp.int32(0), sampling, new_seen, stop_ids)
    segment_ids, length = own.segment_ids, own.length
    start = cache.end - length

    def put(big, small):
      # The slots' rows, their [start, end) written with the prompts' own, scattered back.
      rows_now = jnp.take(big, slots, axis=big.ndim - 4, mode="clip")
      updated = jax.lax.dynamic_update_slice_in_dim(rows_now, small.astype(big.dtype), start, axis=big.ndim - 2)
      return big.at[(slice(None),) * (big.ndim - 4) + (slots,)].set(updated, mode="drop")

    cleared = jnp.zeros((tokens.shape[0], cache.segment_ids.shape[1]), cache.segment_ids.dtype)
    segments = cache.segment_ids.at[slots].set(
      jax.lax.dynamic_update_slice(cleared, segment_ids.astype(cleared.dtype), (0, start)), mode="drop"
    )
    if seen is not None:
      seen = seen.at[slots].set(_add_seen(new_seen, first), mode="drop")
    return _map_kv(put, cache, own, segment_ids=segments), seen, first


def _decode_slots(
  graphdef,
  state,
  cache: KVCache,
  seen,
  token,
  position,
  count,
  done,
  stop_ids,
  row_keys,
  low,
  *,
  mesh: Mesh | None,
  steps: int,
  window: int,
  max_new_tokens: int,
  sampling: Sampling,
):
  """Up to `steps` decode steps of every slot (fewer once all are done), attending over the cache's
  `[low, low + window)` only: every live slot's tokens and the steps' own (the rest is empty or dead).

  Returns (cache, seen, new tokens `[S, steps]` (-1 where a slot was done), steps run, and each slot's
  last token, position, count of new tokens and done flag).
  """
  _TRACES["decode"] += 1
  row_keys = jax.random.wrap_key_data(row_keys)
  full = cache
  cache = KVCache(
    jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, low, window, axis=a.ndim - 2), cache.k),
    jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, low, window, axis=a.ndim - 2), cache.v),
    jax.lax.dynamic_slice_in_dim(cache.segment_ids, low, window, axis=1),
    cache.end - low,
  )
  with _activation_context(mesh):
    slots = token.shape[0]
    ones = jnp.ones((slots, 1), jnp.int32)

    def keep_going(carry):
      return (carry[1] < steps) & ~jnp.all(carry[7])

    def step_once(carry):
      state, i, cache, seen, token, position, count, done, out = carry
      logits, cache = nnx.merge(graphdef, state)(
        token[:, None], positions=position[:, None], segment_ids=ones, cache=cache
      )
      new = _next_token(logits[:, 0], row_keys, count, sampling, seen, stop_ids)
      new = jnp.where(done, token, new)
      out = out.at[:, i].set(jnp.where(done, -1, new))
      finished = done | _is_stop(new, stop_ids) | (count + 1 >= max_new_tokens)
      count = jnp.where(done, count, count + 1)
      return (state, i + 1, cache, _add_seen(seen, new), new, position + 1, count, finished, out)

    out = jnp.full((slots, steps), -1, jnp.int32)
    carry = (state, jnp.int32(0), cache, seen, token, position, count, done, out)
    _, ran, cache, seen, token, position, count, done, out = jax.lax.while_loop(keep_going, step_once, carry)
    cache = _map_kv(
      lambda a, w: jax.lax.dynamic_update_slice_in_dim(a, w, low, axis=a.ndim - 2),
      full,
      cache,
      segment_ids=jax.lax.dynamic_update_slice(full.segment_ids, cache.segment_ids, (0, low)),
      end=cache.end + low,
    )
    return cache, seen, out, ran, token, position, count, done


def _shift_slots(cache: KVCache, shift):
  """Every row's cache moved `shift` slots left (what falls off the front is no longer live)."""
  length = cache.segment_ids.shape[1]
  live = jnp.arange(length) < length - shift
  return KVCache(
    jax.tree.map(lambda a: jnp.roll(a, -shift, axis=a.ndim - 2), cache.k),
    jax.tree.map(lambda a: jnp.roll(a, -shift, axis=a.ndim - 2), cache.v),
    jnp.where(live[None, :], jnp.roll(cache.segment_ids, -shift, axis=1), 0),
    cache.end - shift,
  )


_prefill_slots_jit = jax.jit(_prefill_slots, static_argnames=("graphdef", "mesh", "sampling"), donate_argnums=(2, 3))
_prefill_prefix_jit = jax.jit(_prefill_prefix, static_argnames=("graphdef", "mesh"))
_decode_slots_jit = jax.jit(
  _decode_slots,
  static_argnames=("graphdef", "mesh", "steps", "window", "max_new_tokens", "sampling"),
  donate_argnums=(2, 3),
)
_shift_slots_jit = jax.jit(_shift_slots, donate_argnums=0)
_new_slots_cache_jit = jax.jit(_new_slots_cache, static_argnums=(0, 1, 2), static_argnames=("mesh",))
# Decode steps per device call between refills: fewer calls vs. slots idle after their row stopped.
DECODE_STEPS_PER_CALL = 16


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


def generate_program(
  model_config,
  mesh: Mesh,
  *,
  batch_size: int,
  prompt_len: int,
  max_new_tokens: int,
  sampling: Sampling = None,
  batching: str = "static",
) -> GenerateProgram:
  """The abstract generate program of `model_config` on `mesh` (see `GenerateProgram`).

  With continuous batching that is the prefill of every slot at once into the slots' cache (its
  largest program: the cache plus a full prefill's activations); with static batching, the
  prefill + decode program of one batch.
  """
  from jax.sharding import PartitionSpec

  rows = _batch_size(batch_size, mesh)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(model_config, rngs=nnx.Rngs(0))))
  shardings = sharding.state_shardings(abstract, mesh)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)

  def by_rows(shape, dtype) -> jax.ShapeDtypeStruct:
    names = ("batch",) + (None,) * (len(shape) - 1)
    return jax.ShapeDtypeStruct(
      shape, dtype, sharding=NamedSharding(mesh, sharding.logical_to_spec(names, shape, mesh))
    )

  replicated = NamedSharding(mesh, PartitionSpec())
  keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), rows))
  stop_ids = jax.ShapeDtypeStruct((2,), jnp.int32, sharding=replicated)  # end of turn, end of sequence
  args = (
    graphdef,
    state,
    by_rows((rows, prompt_len), jnp.int32),
    by_rows((rows, prompt_len), jnp.int32),
    by_rows((rows, prompt_len), jnp.int32),
    by_rows((rows,), jnp.bool_),
    stop_ids,
    jax.ShapeDtypeStruct(keys.shape, keys.dtype, sharding=replicated),
  )
  sampling = sampling or GREEDY
  continuous = batching == "continuous" and model_config.sliding_window is None
  length = _slots_cache_length(prompt_len, max_new_tokens) if continuous else prompt_len + max_new_tokens
  cache_shape = (model_config.num_layers, rows, model_config.num_kv_heads, length, model_config.head_dim)
  cache_spec = sharding.logical_to_spec(_CACHE_AXES, cache_shape, mesh)
  cache_bytes = (
    2 * int(np.prod(NamedSharding(mesh, cache_spec).shard_shape(cache_shape))) * jnp.dtype(model_config.dtype).itemsize
  )
  if not continuous:
    return GenerateProgram(
      _generate_batch_jit,
      (*args[:2], None, *args[2:]),  # no shared prefix
      dict(mesh=mesh, max_new_tokens=max_new_tokens, sampling=sampling),
      rows,
      state,
      cache_bytes,
      f"generate {rows} rows x {prompt_len} prompt tokens + {max_new_tokens} new",
    )
  cache = jax.eval_shape(lambda: KVCache.empty(model_config, rows, length))

  def cache_array(a):
    spec = sharding.logical_to_spec(_CACHE_AXES[-a.ndim :], a.shape, mesh)
    return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, spec))

  cache = KVCache(
    jax.tree.map(cache_array, cache.k),
    jax.tree.map(cache_array, cache.v),
    by_rows(cache.segment_ids.shape, cache.segment_ids.dtype),
    jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
  )
  seen = by_rows((rows, model_config.vocab_size), jnp.bool_) if sampling.repetition_penalty != 1 else None
  key_data = jax.eval_shape(lambda: jax.random.key_data(jax.random.split(jax.random.key(0), rows)))
  slot_args = (
    graphdef,
    state,
    cache,
    seen,
    *args[2:5],
    jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=replicated),
    stop_ids,
    jax.ShapeDtypeStruct(key_data.shape, key_data.dtype, sharding=replicated),
  )
  return GenerateProgram(
    _prefill_slots_jit,
    slot_args,
    dict(mesh=mesh, sampling=sampling),
    rows,
    state,
    cache_bytes,
    f"continuous batching: {rows} slots, a {length}-token cache each; prefill of {rows} x {prompt_len} prompt tokens",
  )


def _slots_cache_length(longest_bucket: int, max_new_tokens: int) -> int:
  """The slots' cache: the longest live row (prompt bucket + new tokens) and room for the calls between
  moves left."""
  return longest_bucket + max_new_tokens + max(2 * min(DECODE_STEPS_PER_CALL, max_new_tokens), 64)


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
