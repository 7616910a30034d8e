"""The one attention entry point of the model, and the segment-aware causal mask.

Every attention call goes through `attend` with an `AttentionMask`: the inputs of the mask
(segment ids and slot indices), never a dense `[T, T]` array, so each implementation can exploit
the mask's structure:
- `xla` / `cudnn`: `jax.nn.dot_product_attention` on the dense mask (`AttentionMask.dense`);
- `blockwise` (CPU, GPU): pure JAX over `(q block, kv block)` pairs with an online softmax; it
  runs only the pairs that causality, the sliding window and the segment ids leave live, so a
  packed row of short examples costs the blocks inside its segments, not the whole `T x T`;
- `splash` (TPU): the Pallas splash-attention kernel with causal (or local) mask and segment ids,
  in Pallas's interpret mode when the program is not built for a TPU (so it runs in CPU tests).
"""

from __future__ import annotations

import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from csft_jax.models.config import ATTENTION_IMPLEMENTATIONS
from csft_jax.sharding import active_mesh, logical_to_spec, target_platform


def attention_mask(
  q_segment_ids: jnp.ndarray,
  kv_segment_ids: jnp.ndarray,
  q_index: jnp.ndarray,
  kv_index: jnp.ndarray,
  sliding_window: int | None = None,
) -> jnp.ndarray:
  """Boolean mask `[B, 1, Tq, Tkv]`: causal within a segment, never across segments.

  Args:
    q_segment_ids: `[B, Tq]`, 0 marks padding (attends nowhere).
    kv_segment_ids: `[B, Tkv]`, 0 marks padding or an empty cache slot (never attended).
    q_index: `[Tq]` slot index of each query in the row (cache slot when decoding).
    kv_index: `[Tkv]` slot index of each key.
    sliding_window: if set, a query sees at most this many most recent keys (Mistral).
  """
  same_segment = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
  valid = (q_segment_ids[:, :, None] != 0) & (kv_segment_ids[:, None, :] != 0)
  causal = kv_index[None, :] <= q_index[:, None]
  if sliding_window is not None:
    causal &= q_index[:, None] - kv_index[None, :] < sliding_window
  return (same_segment & valid & causal[None])[:, None]


@flax.struct.dataclass
class AttentionMask:
  """Which keys each query sees: same non-zero segment, key slot <= query slot, within the window.

  `self_attention` is True when queries and keys are the same slots (training, a prefill without
  cache): `q_index == kv_index == arange(T)`; a decode step against a KV cache has it False.
  """

  q_segment_ids: jax.Array  # [B, Tq], 0 = padding
  kv_segment_ids: jax.Array  # [B, Tkv], 0 = padding or an empty cache slot
  q_index: jax.Array  # [Tq]
  kv_index: jax.Array  # [Tkv]
  sliding_window: int | None = flax.struct.field(pytree_node=False, default=None)
  self_attention: bool = flax.struct.field(pytree_node=False, default=False)

  @classmethod
  def causal(cls, segment_ids: jax.Array, sliding_window: int | None = None) -> AttentionMask:
    """Self-attention over the slots of `segment_ids` `[B, T]` (packed or padded rows)."""
    index = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
    return cls(segment_ids, segment_ids, index, index, sliding_window, True)

  def dense(self) -> jax.Array:
    """The boolean `[B, 1, Tq, Tkv]` mask (`attention_mask`)."""
    return attention_mask(self.q_segment_ids, self.kv_segment_ids, self.q_index, self.kv_index, self.sliding_window)


def check_backend(implementation: str, platform: str | None = None) -> None:
  """Fails before any work when `implementation` cannot run on this JAX backend.

  `cudnn` needs an NVIDIA GPU; `splash` runs anywhere (interpret mode off TPU, slowly).

  Raises:
    ValueError naming the config field, the backend found and what to use instead.
  """
  platform = platform or jax.default_backend()
  if implementation == "cudnn" and platform not in ("gpu", "cuda"):
    raise ValueError(
      f"config.model.attention_impl='cudnn' needs an NVIDIA GPU with cuDNN, but the JAX backend here "
      f"is {platform!r}; use 'blockwise' (CPU/GPU) or 'xla'."
    )


def attend(
  q: jnp.ndarray,
  k: jnp.ndarray,
  v: jnp.ndarray,
  mask: AttentionMask,
  *,
  implementation: str = "xla",
  block_q: int = 128,
  block_kv: int = 128,
) -> jnp.ndarray:
  """Scaled dot-product attention with grouped KV heads.

  Args:
    q: `[B, Tq, heads, head_dim]`.
    k, v: `[B, Tkv, kv_heads, head_dim]`; heads must be a multiple of kv_heads.
    mask: the `AttentionMask` of these queries and keys.
    implementation: one of `ATTENTION_IMPLEMENTATIONS` (see the module docstring). `splash` needs
      self-attention; a decode step against a KV cache falls back to `xla`.
    block_q, block_kv: tile sizes of `blockwise` and `splash` (clipped to the lengths).

  Returns:
    `[B, Tq, heads, head_dim]` in q's dtype. Rows whose mask is all False (padding) come out
    finite but meaningless (and differ between implementations); the loss masks them.
  """
  if implementation in ("xla", "cudnn") or (implementation == "splash" and not mask.self_attention):
    return jax.nn.dot_product_attention(
      q, k, v, mask=mask.dense(), implementation="xla" if implementation == "splash" else implementation
    )
  if implementation == "blockwise":
    return _per_shard(functools.partial(_blockwise, block_q=block_q, block_kv=block_kv), q, k, v, mask)
  if implementation == "splash":
    return _per_shard(
      functools.partial(_splash, block_q=block_q, block_kv=block_kv, interpret=target_platform() != "tpu"),
      q,
      k,
      v,
      mask,
    )
  raise ValueError(f"attend(implementation={implementation!r}); choose one of {ATTENTION_IMPLEMENTATIONS}.")


def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask) -> jax.Array:
  """One query per row against a KV cache in its own layout: `q` `[B, 1, heads, head_dim]`, `k`, `v`
  `[B, kv_heads, S, head_dim]`; returns `[B, 1, heads, head_dim]` in q's dtype.

  Each KV head's slots are contiguous, so the two products read the cache once, in place; the
  `[B, S, kv_heads, head_dim]` layout `attend` takes would cost a transposed copy of the whole cache
  per layer and step.
  """
  batch, _, heads, head_dim = q.shape
  kv_heads = k.shape[1]
  qg = q.reshape(batch, kv_heads, heads // kv_heads, head_dim) * jnp.asarray(1 / math.sqrt(head_dim), q.dtype)
  scores = jnp.einsum("bkgd,bksd->bkgs", qg, k.astype(q.dtype), preferred_element_type=jnp.float32)
  allowed = (
    (mask.kv_segment_ids == mask.q_segment_ids[:, :1])
    & (mask.kv_segment_ids != 0)
    & (mask.kv_index <= mask.q_index[0])[None]
  )
  if mask.sliding_window is not None:
    allowed &= (mask.q_index[0] - mask.kv_index < mask.sliding_window)[None]
  scores = jnp.where(allowed[:, None, None, :], scores, -jnp.inf)
  top = jnp.max(scores, axis=-1, keepdims=True)
  probs = jnp.exp(scores - jnp.where(jnp.isfinite(top), top, 0.0))
  total = jnp.sum(probs, axis=-1, keepdims=True)
  out = jnp.einsum("bkgs,bksd->bkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  out = out / jnp.where(total > 0, total, 1.0)
  return out.reshape(batch, 1, heads, head_dim).astype(q.dtype)


def _per_shard(fn, q, k, v, mask: AttentionMask):
  """Runs `fn(q, k, v, mask)` on each device's rows and heads (shard_map under an active mesh).

  Both kernels index rows and blocks dynamically, which the SPMD partitioner can only serve by
  gathering the whole batch; attention is independent per row and per KV-head group, so each
  device runs it on its own shard instead.
  """
  mesh = active_mesh()
  if mesh is None or mesh.size == 1:
    return fn(q, k, v, mask)
  q_spec = logical_to_spec(("batch", "length", "heads", "head_dim"), q.shape, mesh)
  kv_spec = logical_to_spec(("batch", "length", "kv_heads", "head_dim"), k.shape, mesh)
  if q_spec[2] != kv_spec[2]:
    # Heads and KV heads must split alike to keep each query head with its KV head.
    q_spec = PartitionSpec(q_spec[0], None, kv_spec[2], None)
  row_spec = PartitionSpec(q_spec[0], None)
  index_spec = PartitionSpec(None)
  mask_specs = AttentionMask(row_spec, row_spec, index_spec, index_spec, mask.sliding_window, mask.self_attention)
  return jax.shard_map(
    fn, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, mask_specs), out_specs=q_spec, check_vma=False
  )(q, k, v, mask)


# ---------------------------------------------------------------- blockwise ----


def _pad_to(x: jax.Array, axis: int, multiple: int, value) -> jax.Array:
  extra = -x.shape[axis] % multiple
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def _block_bounds(segment_ids: jax.Array, index: jax.Array, block: int):
  """Per block: (lowest, highest) non-zero segment id `[B, n]` and (lowest, highest) slot `[n]`.

  A block with no real token gets lowest > highest, so it meets nothing.
  """
  batch, length = segment_ids.shape
  segments = segment_ids.reshape(batch, length // block, block)
  real = segments != 0
  seg_lo = jnp.where(real, segments, jnp.iinfo(jnp.int32).max).min(-1)
  seg_hi = jnp.where(real, segments, 0).max(-1)
  slots = index.reshape(length // block, block)
  return seg_lo, seg_hi, slots.min(-1), slots.max(-1)


def _live_pairs(mask: AttentionMask, block_q: int, block_kv: int) -> tuple[jax.Array, jax.Array]:
  """The flat `(row, q block, kv block)` numbers of the pairs that may hold an allowed entry.

  A pair is skipped only when the mask is provably all False on it: no segment id in common
  (by their ranges), every key after every query, or every key outside the window. Returns the
  live pair numbers, in row-major order, padded to the number of pairs, and how many are live.
  """
  q_seg_lo, q_seg_hi, q_lo, q_hi = _block_bounds(mask.q_segment_ids, mask.q_index, block_q)
  kv_seg_lo, kv_seg_hi, kv_lo, kv_hi = _block_bounds(mask.kv_segment_ids, mask.kv_index, block_kv)
  live = (q_seg_lo[:, :, None] <= kv_seg_hi[:, None, :]) & (kv_seg_lo[:, None, :] <= q_seg_hi[:, :, None])
  live &= (kv_lo[None, :] <= q_hi[:, None])[None]
  if mask.sliding_window is not None:
    live &= (q_lo[:, None] - kv_hi[None, :] < mask.sliding_window)[None]
  flat = live.reshape(-1)
  (pairs,) = jnp.nonzero(flat, size=flat.shape[0], fill_value=0)
  return pairs.astype(jnp.int32), flat.sum(dtype=jnp.int32)


def _blockwise(q, k, v, mask: AttentionMask, *, block_q: int, block_kv: int) -> jax.Array:
  batch, q_len, heads, head_dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  block_q, block_kv = min(block_q, q_len), min(block_kv, kv_len)
  # Padded slots get segment 0 (never allowed) and repeat the last index (bounds stay tight).
  padded = AttentionMask(
    _pad_to(mask.q_segment_ids, 1, block_q, 0),
    _pad_to(mask.kv_segment_ids, 1, block_kv, 0),
    jnp.pad(mask.q_index, (0, -q_len % block_q), mode="edge"),
    jnp.pad(mask.kv_index, (0, -kv_len % block_kv), mode="edge"),
    mask.sliding_window,
    mask.self_attention,
  )
  # [B, kv_heads, group, Tq, head_dim] and [B, kv_heads, Tkv, head_dim]: one KV head per batch
  # entry of the block matmuls, its query heads stacked with the block's queries.
  qg = _pad_to(q, 1, block_q, 0).reshape(batch, -1, kv_heads, heads // kv_heads, head_dim)
  qg = qg.transpose(0, 2, 3, 1, 4) * jnp.asarray(1 / math.sqrt(head_dim), q.dtype)
  kt = _pad_to(k, 1, block_kv, 0).transpose(0, 2, 1, 3)
  vt = _pad_to(v, 1, block_kv, 0).transpose(0, 2, 1, 3)
  pairs, count = _live_pairs(padded, block_q, block_kv)
  out = _flash(qg, kt, vt, padded, pairs, count, block_q, block_kv)
  out = out.transpose(0, 3, 1, 2, 4).reshape(batch, -1, heads, head_dim)[:, :q_len]
  return out.astype(q.dtype)


class _Pair:
  """One live `(row, q block, kv block)` pair: its slices of the operands and its mask."""

  def __init__(self, number, mask: AttentionMask, num_q_blocks: int, num_kv_blocks: int, block_q: int, block_kv: int):
    self.row = number // (num_q_blocks * num_kv_blocks)
    self.q_start = (number // num_kv_blocks) % num_q_blocks * block_q
    self.kv_start = number % num_kv_blocks * block_kv
    self.block_q, self.block_kv = block_q, block_kv
    q_seg = jax.lax.dynamic_slice(mask.q_segment_ids, (self.row, self.q_start), (1, block_q))[0]
    kv_seg = jax.lax.dynamic_slice(mask.kv_segment_ids, (self.row, self.kv_start), (1, block_kv))[0]
    q_index = jax.lax.dynamic_slice(mask.q_index, (self.q_start,), (block_q,))
    kv_index = jax.lax.dynamic_slice(mask.kv_index, (self.kv_start,), (block_kv,))
    allowed = (q_seg[:, None] == kv_seg[None, :]) & (q_seg[:, None] != 0) & (kv_index[None, :] <= q_index[:, None])
    if mask.sliding_window is not None:
      allowed &= q_index[:, None] - kv_index[None, :] < mask.sliding_window
    self.allowed = allowed  # [block_q, block_kv]

  def q_rows(self, x: jax.Array) -> jax.Array:
    """This pair's query rows of `x` `[B, kv_heads, group, Tq, ...]`."""
    start = (self.row, 0, 0, self.q_start) + (0,) * (x.ndim - 4)
    return jax.lax.dynamic_slice(x, start, (1,) + x.shape[1:3] + (self.block_q,) + x.shape[4:])[0]

  def put_q_rows(self, x: jax.Array, value: jax.Array) -> jax.Array:
    start = (self.row, 0, 0, self.q_start) + (0,) * (x.ndim - 4)
    return jax.lax.dynamic_update_slice(x, value[None], start)

  def kv_rows(self, x: jax.Array) -> jax.Array:
    """This pair's key rows of `x` `[B, kv_heads, Tkv, head_dim]`."""
    return jax.lax.dynamic_slice(x, (self.row, 0, self.kv_start, 0), (1, x.shape[1], self.block_kv, x.shape[3]))[0]

  def put_kv_rows(self, x: jax.Array, value: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_slice(x, value[None], (self.row, 0, self.kv_start, 0))


def _scores(q_block, k_block):
  return jnp.einsum("kgqd,kcd->kgqc", q_block, k_block, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _flash(q, k, v, mask, pairs, count, block_q, block_kv):
  return _flash_forward(q, k, v, mask, pairs, count, block_q, block_kv)[0]


def _flash_forward(q, k, v, mask, pairs, count, block_q, block_kv):
  """Online softmax over the live pairs; returns (normalised output, logsumexp), both float32."""
  num_q_blocks, num_kv_blocks = q.shape[3] // block_q, k.shape[2] // block_kv

  def body(n, carry):
    out, row_max, row_sum = carry
    pair = _Pair(pairs[n], mask, num_q_blocks, num_kv_blocks, block_q, block_kv)
    scores = jnp.where(pair.allowed, _scores(pair.q_rows(q), pair.kv_rows(k)), -jnp.inf)
    old_max = pair.q_rows(row_max)
    new_max = jnp.maximum(old_max, scores.max(-1))
    # A row with nothing allowed yet keeps max -inf; 0 stands in so exp() gives 0, not NaN.
    safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
    probs = jnp.exp(scores - safe_max[..., None])
    rescale = jnp.exp(old_max - safe_max)
    values = jnp.einsum("kgqc,kcd->kgqd", probs.astype(v.dtype), pair.kv_rows(v), preferred_element_type=jnp.float32)
    out = pair.put_q_rows(out, rescale[..., None] * pair.q_rows(out) + values)
    row_sum = pair.put_q_rows(row_sum, rescale * pair.q_rows(row_sum) + probs.sum(-1))
    return out, pair.put_q_rows(row_max, new_max), row_sum

  stats_shape = q.shape[:4]
  init = (
    jnp.zeros(q.shape, jnp.float32),
    jnp.full(stats_shape, -jnp.inf, jnp.float32),
    jnp.zeros(stats_shape, jnp.float32),
  )
  out, row_max, row_sum = jax.lax.fori_loop(0, count, body, init)
  seen = row_sum > 0
  out = jnp.where(seen[..., None], out / jnp.where(seen, row_sum, 1.0)[..., None], 0.0)
  logsumexp = jnp.where(seen, row_max + jnp.log(jnp.where(seen, row_sum, 1.0)), 0.0)
  return out, logsumexp


def _flash_fwd(q, k, v, mask, pairs, count, block_q, block_kv):
  out, logsumexp = _flash_forward(q, k, v, mask, pairs, count, block_q, block_kv)
  return out, (q, k, v, mask, pairs, count, out, logsumexp)


def _flash_bwd(block_q, block_kv, residuals, d_out):
  """Recomputes each live pair's probabilities from the logsumexp (FlashAttention-2 backward)."""
  q, k, v, mask, pairs, count, out, logsumexp = residuals
  num_q_blocks, num_kv_blocks = q.shape[3] // block_q, k.shape[2] // block_kv
  d_out = d_out.astype(jnp.float32)
  delta = jnp.sum(d_out * out, axis=-1)

  def body(n, carry):
    dq, dk, dv = carry
    pair = _Pair(pairs[n], mask, num_q_blocks, num_kv_blocks, block_q, block_kv)
    q_block, k_block, v_block = pair.q_rows(q), pair.kv_rows(k), pair.kv_rows(v)
    d_out_block = pair.q_rows(d_out)
    probs = jnp.where(pair.allowed, jnp.exp(_scores(q_block, k_block) - pair.q_rows(logsumexp)[..., None]), 0.0)
    dv = pair.put_kv_rows(dv, pair.kv_rows(dv) + jnp.einsum("kgqc,kgqd->kcd", probs, d_out_block))
    d_probs = jnp.einsum("kgqd,kcd->kgqc", d_out_block, v_block, preferred_element_type=jnp.float32)
    d_scores = probs * (d_probs - pair.q_rows(delta)[..., None])
    dq = pair.put_q_rows(
      dq, pair.q_rows(dq) + jnp.einsum("kgqc,kcd->kgqd", d_scores, k_block, preferred_element_type=jnp.float32)
    )
    dk = pair.put_kv_rows(
      dk, pair.kv_rows(dk) + jnp.einsum("kgqc,kgqd->kcd", d_scores, q_block, preferred_element_type=jnp.float32)
    )
    return dq, dk, dv

  init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  dq, dk, dv = jax.lax.fori_loop(0, count, body, init)
  no_grad = jax.tree.map(lambda x: np.zeros(x.shape, jax.dtypes.float0), (mask, pairs, count))
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)) + no_grad


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---------------------------------------------------------------- splash ----


def _splash(q, k, v, mask: AttentionMask, *, block_q: int, block_kv: int, interpret: bool) -> jax.Array:
  from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_kernel as splash,
  )
  from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_mask as splash_mask,
  )

  batch, length, heads, head_dim = q.shape
  # The kernel's tiles are multiples of 128 lanes: short rows are padded up to one tile.
  block_q, block_kv = (min(block, length + -length % 128) for block in (block_q, block_kv))
  block = math.lcm(block_q, block_kv)
  if mask.sliding_window is None:
    kernel_mask = splash_mask.CausalMask((length + -length % block,) * 2)
  else:
    # Keys from q - (window - 1) to q: the local mask spans causality and the window.
    kernel_mask = splash_mask.LocalMask((length + -length % block,) * 2, (mask.sliding_window - 1, 0), 0)
  kernel = splash.make_splash_mha(
    splash_mask.MultiHeadMask([kernel_mask] * heads),
    head_shards=1,
    q_seq_shards=1,
    interpret=interpret,
    # Every query tile of the forward and both backward kernels is block_q, every key tile block_kv.
    block_sizes=splash.BlockSizes(
      **dict.fromkeys(("block_q", "block_q_dkv", "block_q_dq"), block_q),
      **dict.fromkeys(
        ("block_kv", "block_kv_compute", "block_kv_dkv", "block_kv_dkv_compute", "block_kv_dq"), block_kv
      ),
    ),
  )
  # The kernel does not scale the scores; padded slots are segment 0 (they see only padding, and
  # the diagonal keeps their softmax defined).
  qt = (_pad_to(q, 1, block, 0) * jnp.asarray(1 / math.sqrt(head_dim), q.dtype)).transpose(0, 2, 1, 3)
  kt = _pad_to(k, 1, block, 0).transpose(0, 2, 1, 3)
  vt = _pad_to(v, 1, block, 0).transpose(0, 2, 1, 3)
  segment_ids = _pad_to(mask.q_segment_ids, 1, block, 0)
  out = jax.vmap(kernel)(qt, kt, vt, splash.SegmentIds(q=segment_ids, kv=segment_ids))
  return out.transpose(0, 2, 1, 3)[:, :length].astype(q.dtype)
