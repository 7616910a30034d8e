"""Flax NNX causal decoder for the Llama / Qwen2 / Qwen3 / Mistral / InternLM2 family.

One implementation, switched by `ModelConfig`. Parameters are stored in float32 (or
`param_dtype`) and cast to `dtype` for compute; every parameter and the main activations carry
logical axis names that `csft_jax.sharding.LOGICAL_RULES` maps onto the mesh.

Inputs follow the packing convention of the data pipeline: `segment_ids` (0 = padding) keep
packed sequences from attending to each other and `positions` restart in each segment.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from csft_jax.models.attention import AttentionMask, attend, decode_attention
from csft_jax.models.config import ModelConfig
from csft_jax.models.rope import apply_rope, inverse_frequencies
from csft_jax.sharding import constrain, target_platform

_REMAT_POLICIES: dict[str, Callable | None] = {
  "full": None,
  "dots_saveable": jax.checkpoint_policies.dots_saveable,
  "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _param(
  rngs: nnx.Rngs | None, shape: tuple[int, ...], axes: tuple[str, ...], dtype, *, init: str, stddev: float = 0.02
) -> nnx.Param:
  if init == "normal":
    value = stddev * jax.random.normal(rngs.params(), shape, dtype)
  elif init == "ones":
    value = jnp.ones(shape, dtype)
  else:
    value = jnp.zeros(shape, dtype)
  # Logical names only: placement happens in the trainer (abstract init + jit out_shardings),
  # so variables are never eagerly sharded here.
  return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class RMSNorm(nnx.Module):
  """RMSNorm with the statistics in float32 (as HF does), scaled by a learned `scale`."""

  def __init__(self, dim: int, eps: float, config: ModelConfig, axes: tuple[str, ...] = ("norm",)):
    self.eps = eps
    self.scale = _param(None, (dim,), axes, jnp.dtype(config.param_dtype), init="ones")

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(x.dtype) * normed.astype(x.dtype)


class Projection(nnx.Module):
  """A dense map whose kernel keeps the heads on their own axis (for tensor parallelism).

  `equation` names the axes, einsum style (`"btd,dhk->bthk"`): the kernel's leading axes are
  contracted with the input's trailing ones.

  With `lora=True` (and `config.lora_rank = r > 0`) it carries a LoRA adapter: A `[*in, r]`
  (uniform in +-1/sqrt(in), as PEFT's Kaiming init) and B `[r, *out]` (zeros, so the adapted map
  starts equal to the base), both `nnx.LoRAParam` on the kernel's logical axes, adding
  `scale * B(A(x))`. `shared_a=True` leaves A to the caller (InternLM2's fused `wqkv` has one A
  for q, k and v): `__call__` then takes A's output.
  """

  def __init__(
    self,
    equation: str,
    kernel_shape: tuple[int, ...],
    kernel_axes: tuple[str, ...],
    bias_shape: tuple[int, ...] | None,
    bias_axes: tuple[str, ...],
    config: ModelConfig,
    rngs: nnx.Rngs,
    lora: bool = False,
    shared_a: bool = False,
  ):
    dtype = jnp.dtype(config.param_dtype)
    inputs, kernel = equation.split("->", maxsplit=1)[0].split(",")
    self.contracted = sum(axis in inputs for axis in kernel)
    if inputs[-self.contracted :] != kernel[: self.contracted]:
      raise ValueError(f"Projection {equation!r}: the kernel's leading axes must be the input's trailing ones.")
    self.kernel = _param(rngs, kernel_shape, kernel_axes, dtype, init="normal", stddev=config.initializer_range)
    self.bias = _param(None, bias_shape, bias_axes, dtype, init="zeros") if bias_shape else None
    adapted = lora and config.lora_rank > 0
    c, r = self.contracted, config.lora_rank
    self.lora_a = lora_down_param(rngs, kernel_shape[:c], kernel_axes[:c], config) if adapted and not shared_a else None
    self.lora_b = (
      nnx.LoRAParam(
        jnp.zeros((r, *kernel_shape[c:]), dtype), out_sharding=("lora_rank", *kernel_axes[c:]), eager_sharding=False
      )
      if adapted
      else None
    )
    self.lora_scale, self.lora_dropout = config.lora_scale if adapted else 0.0, config.lora_dropout

  def __call__(self, x: jax.Array, lora_x: jax.Array | None = None, dropout_key: jax.Array | None = None) -> jax.Array:
    """`x` mapped; `lora_x` is A's output where A is shared, `dropout_key` drops A's input."""
    y = contract(x, self.kernel[...].astype(x.dtype), self.contracted)
    if self.bias is not None:
      y = y + self.bias[...].astype(x.dtype)
    if self.lora_b is not None:
      if lora_x is None:
        lora_x = lora_down(self.lora_a, x, self.contracted, self.lora_dropout, dropout_key)
      y = y + contract(lora_x * self.lora_scale, self.lora_b[...].astype(x.dtype), 1)
    return y


def lora_down_param(
  rngs: nnx.Rngs, in_shape: tuple[int, ...], in_axes: tuple[str, ...], config: ModelConfig
) -> nnx.LoRAParam:
  bound = 1.0 / math.sqrt(math.prod(in_shape))
  value = jax.random.uniform(rngs.params(), (*in_shape, config.lora_rank), jnp.dtype(config.param_dtype), -bound, bound)
  return nnx.LoRAParam(value, out_sharding=(*in_axes, "lora_rank"), eager_sharding=False)


def lora_down(
  a: nnx.LoRAParam, x: jax.Array, contracted: int, dropout: float, dropout_key: jax.Array | None
) -> jax.Array:
  """A's output `[..., r]`; with `dropout_key` (training) its input is dropped at rate `dropout`."""
  if dropout > 0 and dropout_key is not None:
    keep = jax.random.bernoulli(dropout_key, 1.0 - dropout, x.shape)
    x = jnp.where(keep, x / (1.0 - dropout), 0).astype(x.dtype)
  return contract(x, a[...].astype(x.dtype), contracted)


def _key(key: jax.Array | None, index: int) -> jax.Array | None:
  return None if key is None else jax.random.fold_in(key, index)


class Attention(nnx.Module):
  """Grouped-query self-attention with RoPE, optional q/k/v bias and per-head q/k RMSNorm."""

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    d, h, k, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    self.config = config
    qkv_bias = config.qkv_bias
    targets = config.lora_targets if config.lora_rank else ()
    # InternLM2's adapters sit on its fused wqkv: one A for q, k and v, a B for each.
    self.shared_qkv_a = (
      lora_down_param(rngs, (d,), ("embed",), config)
      if config.arch == "internlm2" and "attn.q_proj" in targets
      else None
    )
    shared = self.shared_qkv_a is not None

    def head_projection(heads: int, axis: str, name: str) -> Projection:  # x -> [B, T, heads, head_dim]
      return Projection(
        "btd,dhk->bthk",
        (d, heads, hd),
        ("embed", axis, "head_dim"),
        (heads, hd) if qkv_bias else None,
        (axis, "head_dim"),
        config,
        rngs,
        lora=f"attn.{name}" in targets,
        shared_a=shared,
      )

    self.q_proj = head_projection(h, "heads", "q_proj")
    self.k_proj = head_projection(k, "kv_heads", "k_proj")
    self.v_proj = head_projection(k, "kv_heads", "v_proj")
    self.o_proj = Projection(
      "bthk,hkd->btd",
      (h, hd, d),
      ("heads", "head_dim", "embed"),
      (d,) if config.out_bias else None,
      ("norm",),
      config,
      rngs,
      lora="attn.o_proj" in targets,
    )
    if config.qk_norm:
      self.q_norm = RMSNorm(hd, config.rms_norm_eps, config, axes=("head_dim",))
      self.k_norm = RMSNorm(hd, config.rms_norm_eps, config, axes=("head_dim",))
    else:
      self.q_norm = self.k_norm = None

  def __call__(
    self,
    x: jax.Array,
    positions: jax.Array,
    mask: AttentionMask,
    cache_k: jax.Array | None,
    cache_v: jax.Array | None,
    cache_end: jax.Array | None,
    dropout_key: jax.Array | None = None,
  ):
    """Returns (output, keys, values): this call's `[B, kv_heads, T, head_dim]` without a cache, else
    this layer's cache `[B, kv_heads, S, head_dim]` with them written at `cache_end`."""
    shared = None
    if self.shared_qkv_a is not None:
      shared = lora_down(self.shared_qkv_a, x, 1, self.config.lora_dropout, _key(dropout_key, 4))
    q, k, v = (proj(x, shared, _key(dropout_key, i)) for i, proj in enumerate((self.q_proj, self.k_proj, self.v_proj)))
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    inv_freq = inverse_frequencies(self.config)
    q = constrain(apply_rope(q, positions, inv_freq), ("batch", "length", "heads", "head_dim"))
    k = apply_rope(k, positions, inv_freq)
    new_k, new_v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # the cache's layout
    if cache_k is None:
      return self.o_proj(self._attend(q, k, v, mask), dropout_key=_key(dropout_key, 3)), new_k, new_v
    # The cache with this call's keys in place (rows are left-padded, so every row writes at the
    # same slot); with one buffer per layer the write happens in place.
    k = jax.lax.dynamic_update_slice(cache_k, new_k.astype(cache_k.dtype), (0, 0, cache_end, 0))
    v = jax.lax.dynamic_update_slice(cache_v, new_v.astype(cache_v.dtype), (0, 0, cache_end, 0))
    if x.shape[1] == 1:
      out = decode_attention(q, k, v, mask)
    else:
      out = self._attend(q, k.transpose(0, 2, 1, 3).astype(q.dtype), v.transpose(0, 2, 1, 3).astype(q.dtype), mask)
    return self.o_proj(out, dropout_key=_key(dropout_key, 3)), k, v

  def _attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask) -> jax.Array:
    """Self-attention of `q` over `k`/`v` ([B, T, heads, head_dim]) with the configured implementation."""
    config = self.config
    return attend(
      q,
      k,
      v,
      mask,
      implementation=config.attention_impl,
      block_q=config.attention_block_q,
      block_kv=config.attention_block_kv,
    )


class MLP(nnx.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    d, m = config.hidden_size, config.intermediate_size
    bias = config.mlp_bias
    targets = config.lora_targets if config.lora_rank else ()

    def up_projection(name: str) -> Projection:  # x -> [B, T, intermediate]
      return Projection(
        "btd,dm->btm", (d, m), ("embed", "mlp"), (m,) if bias else None, ("mlp",), config, rngs,
        lora=f"mlp.{name}" in targets,
      )  # fmt: skip

    self.gate_proj = up_projection("gate_proj")
    self.up_proj = up_projection("up_proj")
    self.down_proj = Projection(
      "btm,md->btd",
      (m, d),
      ("mlp", "embed"),
      (d,) if bias else None,
      ("norm",),
      config,
      rngs,
      lora="mlp.down_proj" in targets,
    )

  def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
    hidden = jax.nn.silu(self.gate_proj(x, dropout_key=_key(dropout_key, 0))) * self.up_proj(
      x, dropout_key=_key(dropout_key, 1)
    )
    return self.down_proj(constrain(hidden, ("batch", "length", "mlp")), dropout_key=_key(dropout_key, 2))


class Block(nnx.Module):
  """Pre-norm decoder layer: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config)
    self.attn = Attention(config, rngs)
    self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config)
    self.mlp = MLP(config, rngs)

  def __call__(self, x, positions, mask, cache_k=None, cache_v=None, cache_end=None, dropout_key=None):
    attn_out, new_k, new_v = self.attn(
      self.attn_norm(x), positions, mask, cache_k, cache_v, cache_end, _key(dropout_key, 0)
    )
    x = x + attn_out
    x = x + self.mlp(self.mlp_norm(x), _key(dropout_key, 1))
    return constrain(x, ("batch", "length", "embed")), new_k, new_v


@flax.struct.dataclass
class KVCache:
  """Decode cache: keys/values `[B, kv_heads, S, head_dim]` per layer, slot segments `[B, S]`.

  `k` and `v` are one array `[layers, B, kv_heads, S, head_dim]` for a model with scanned layers
  (the scan's input), else a tuple of one array per layer: each layer then reads and writes its own
  buffer in place, where slicing a stacked cache copies every layer's slots at every decode step.
  Each KV head's slots are
  contiguous, so a decode step's attention reads them in place (`decode_attention`). Batch is axis
  -4 and length axis -2 of every array, whichever the form.

  `segment_ids` is 0 for empty (or padding) slots, which are never attended; `end` is the next
  slot to write, shared by all rows because prompts are left-padded to one length.
  """

  k: jax.Array | tuple[jax.Array, ...]
  v: jax.Array | tuple[jax.Array, ...]
  segment_ids: jax.Array
  end: jax.Array

  @classmethod
  def empty(cls, config: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
    dtype = jnp.dtype(dtype or config.dtype)
    shape = (batch, config.num_kv_heads, max_len, config.head_dim)
    if config.scan_layers:
      k, v = jnp.zeros((config.num_layers, *shape), dtype), jnp.zeros((config.num_layers, *shape), dtype)
    else:
      k = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
      v = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
    return cls(k, v, jnp.zeros((batch, max_len), jnp.int32), jnp.zeros((), jnp.int32))

  @property
  def length(self) -> int:
    """Slots per row."""
    return self.segment_ids.shape[1]


def contract(
  x: jax.Array, kernel: jax.Array, axes: int, kernel_axes: tuple[int, ...] | None = None, preferred_element_type=None
) -> jax.Array:
  """`x`'s last `axes` axes contracted with `kernel`'s `kernel_axes` (default: its leading ones).

  On CPU the product runs as one 2-D matmul over the flattened tokens: there, the gradient of a
  multi-axis einsum pays transposing copies of the activations for the weight gradient. Elsewhere
  it stays one `dot_general`, which the TPU compiler lays out best (the 2-D form costs the 7B recipe
  more HBM per chip, as `--compile_for` shows).
  """
  kernel_axes = tuple(range(axes)) if kernel_axes is None else kernel_axes
  x_axes = tuple(range(x.ndim - axes, x.ndim))
  if target_platform() != "cpu":
    return jax.lax.dot_general(
      x, kernel, ((x_axes, kernel_axes), ((), ())), preferred_element_type=preferred_element_type
    )
  free = [a for a in range(kernel.ndim) if a not in kernel_axes]
  lead, out = x.shape[: x.ndim - axes], tuple(kernel.shape[a] for a in free)
  matrix = kernel.transpose(*kernel_axes, *free).reshape(-1, math.prod(out))
  y = jnp.matmul(x.reshape(math.prod(lead), -1), matrix, preferred_element_type=preferred_element_type)
  return y.reshape(*lead, *out)


def lm_head_logits(x: jax.Array, head: jax.Array, layout: str) -> jax.Array:
  """float32 logits `[..., V]` of hidden states `x` `[..., D]`.

  `layout` is "dv" (a kernel `[D, V]`) or "vd" (a tied embedding `[V, D]`).
  """
  return contract(x, head.astype(x.dtype), 1, (0,) if layout == "dv" else (1,), preferred_element_type=jnp.float32)


class Decoder(nnx.Module):
  """Token embedding, `num_layers` blocks (scanned or unrolled), final norm, LM head."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    pdtype = jnp.dtype(config.param_dtype)
    self.embed = nnx.Module()
    std = config.initializer_range
    self.embed.embedding = _param(rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"), pdtype,
                                  init="normal", stddev=std)  # fmt: skip
    if config.scan_layers:

      @nnx.split_rngs(splits=config.num_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def make_layers(layer_rngs: nnx.Rngs) -> Block:
        return Block(config, layer_rngs)

      self.layers = make_layers(rngs)
    else:
      self.layers = nnx.List([Block(config, rngs) for _ in range(config.num_layers)])
    self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config)
    if config.tie_embeddings:
      self.lm_head = None
    else:
      self.lm_head = nnx.Module()
      self.lm_head.kernel = _param(rngs, (config.hidden_size, config.vocab_size), ("embed", "vocab"), pdtype,
                                   init="normal", stddev=std)  # fmt: skip

  def __call__(
    self,
    input_ids: jax.Array,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    cache: KVCache | None = None,
    prefill: bool = False,
    last_logits_only: bool = False,
    hidden_only: bool = False,
    dropout_key: jax.Array | None = None,
  ):
    """Runs the decoder.

    Args:
      input_ids: `[B, T]` int.
      positions: `[B, T]` RoPE positions; default `0..T-1` (packed rows must pass them).
      segment_ids: `[B, T]`, 0 = padding; default all ones.
      cache: a `KVCache` to extend (prefill or decode); then `(logits, new_cache)` is returned.
      prefill: the tokens attend to each other only, never to `cache`'s contents (a fresh cache, or
        one whose rows hold nothing of theirs): self-attention through the model's attention
        implementation (blockwise or splash: only the causal blocks of each row are computed),
        and their keys/values are written at `cache.end`.
      last_logits_only: compute logits for the last position only (`[B, 1, vocab]`): a prefill
        for generation needs no others, and the LM head is a large share of its FLOPs.
      hidden_only: return the final hidden states `[B, T, D]` (after the final norm) instead of
        logits, for a loss that applies the head chunk by chunk (`lm_head_weights`).
      dropout_key: training only: the key of LoRA dropout (`lora_dropout > 0`; no cache).

    Returns:
      float32 logits `[B, T, vocab]` (and the updated cache when one was given).
    """
    config = self.config
    batch, length = input_ids.shape
    if segment_ids is None:
      segment_ids = jnp.ones((batch, length), jnp.int32)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    cache_k = cache_v = cache_end = None
    if cache is not None:
      kv_segments = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids.astype(jnp.int32), (0, cache.end))
    if cache is None or prefill:
      mask = AttentionMask.causal(segment_ids, config.sliding_window)
    else:
      kv_index = jnp.arange(cache.segment_ids.shape[1], dtype=jnp.int32)
      q_index = cache.end + jnp.arange(length, dtype=jnp.int32)
      mask = AttentionMask(segment_ids, kv_segments, q_index, kv_index, config.sliding_window)
      cache_k, cache_v, cache_end = cache.k, cache.v, cache.end

    x = jnp.take(self.embed.embedding[...], input_ids, axis=0).astype(jnp.dtype(config.dtype))
    x = constrain(x, ("batch", "length", "embed"))
    if cache is not None or not (self.config.lora_rank and self.config.lora_dropout > 0):
      dropout_key = None
    x, new_k, new_v = self._run_layers(
      x, positions, mask, cache_k, cache_v, cache_end, dropout_key, collect_kv=cache is not None
    )
    if last_logits_only:
      x = x[:, -1:]
    x = self.final_norm(x)
    if hidden_only and cache is None:
      return x
    logits = lm_head_logits(x, *self.lm_head_weights())
    logits = constrain(logits, ("batch", "length", "vocab"))
    if cache is None:
      return logits
    if cache_k is not None and not config.scan_layers:
      return logits, KVCache(new_k, new_v, kv_segments, cache.end + length)  # each layer wrote its own

    def write(cached, new):  # one in-place write of this call's keys/values
      return jax.lax.dynamic_update_slice(cached, new.astype(cached.dtype), (0,) * (cached.ndim - 2) + (cache.end, 0))

    return logits, KVCache(
      jax.tree.map(write, cache.k, new_k), jax.tree.map(write, cache.v, new_v), kv_segments, cache.end + length
    )

  def lm_head_weights(self) -> tuple[jax.Array, str]:
    """The LM head and its layout: the tied embedding `[V, D]` ("vd") or the kernel `[D, V]` ("dv")."""
    if self.config.tie_embeddings:
      return self.embed.embedding[...], "vd"
    return self.lm_head.kernel[...], "dv"

  def _run_layers(self, x, positions, mask, cache_k, cache_v, cache_end, dropout_key=None, collect_kv=False):
    """Runs the blocks; returns (x, keys, values), the last two None unless `collect_kv`: scanned,
    this call's `[layers, B, kv_heads, T, head_dim]`; unrolled, a tuple per layer of this call's
    (no cache) or of the layer's updated cache."""
    policy = self.config.remat_policy

    def run_block(block: Block, x, ck, cv, key=None):
      return block(x, positions, mask, ck, cv, cache_end, key)

    if policy != "none":
      run_block = nnx.remat(run_block, policy=_REMAT_POLICIES[policy], prevent_cse=not self.config.scan_layers)

    if self.config.scan_layers:
      # One traced layer body: compile time stays flat as depth grows.
      if cache_k is None and dropout_key is not None:

        @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=nnx.Carry, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def scan_layers_dropout(x, block, key):
          return run_block(block, x, None, None, key)[0]

        keys = jax.random.split(dropout_key, self.config.num_layers)
        return scan_layers_dropout(x, self.layers, keys), None, None
      if cache_k is None and not collect_kv:

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def scan_layers(x, block):
          return run_block(block, x, None, None)[0]

        return scan_layers(x, self.layers), None, None
      if cache_k is None:

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0, 0), transform_metadata={nnx.PARTITION_NAME: "layers"})
        def scan_layers_prefill(x, block):
          return run_block(block, x, None, None)

        return scan_layers_prefill(x, self.layers)

      # Each step reads its layer of the cache and emits only this call's keys/values.
      @nnx.scan(
        in_axes=(nnx.Carry, 0, 0, 0), out_axes=(nnx.Carry, 0, 0), transform_metadata={nnx.PARTITION_NAME: "layers"}
      )
      def scan_layers_with_cache(x, block, ck, cv):
        x, k, v = run_block(block, x, ck, cv)
        own = (*k.shape[:2], x.shape[1], k.shape[3])
        return (
          x,
          jax.lax.dynamic_slice(k, (0, 0, cache_end, 0), own),
          jax.lax.dynamic_slice(v, (0, 0, cache_end, 0), own),
        )

      return scan_layers_with_cache(x, self.layers, cache_k, cache_v)

    if cache_k is None and not collect_kv:
      keys = (
        jax.random.split(dropout_key, self.config.num_layers)
        if dropout_key is not None
        else [None] * self.config.num_layers
      )
      for block, key in zip(self.layers, keys):
        x = run_block(block, x, None, None, key)[0]
      return x, None, None
    new_k, new_v = [], []
    for i, block in enumerate(self.layers):
      x, k, v = run_block(block, x, None if cache_k is None else cache_k[i], None if cache_v is None else cache_v[i])
      new_k.append(k)
      new_v.append(v)
    return x, tuple(new_k), tuple(new_v)


def with_runtime(model: Decoder, **fields) -> Decoder:
  """`model` with other runtime settings (`ModelConfig` fields that change no parameter's shape or
  layout, such as `attention_impl`), sharing its arrays; `model` itself when nothing changes."""
  config = model.config.replace(**fields)
  if config == model.config:
    return model
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))))
  return rebuilt_from(model, nnx.merge(graphdef, nnx.state(model)))


def rebuilt_from(original: Decoder, rebuilt: Decoder) -> Decoder:
  """`rebuilt` (a model made from `original`'s arrays) with `original`'s note of the HF directory its
  weights came from (`hf_source_dir`, set by the loader; `save_hf` copies that tokenizer)."""
  if hasattr(original, "hf_source_dir"):
    rebuilt.hf_source_dir = original.hf_source_dir
  return rebuilt


def generation_attention(implementation: str, platform: str) -> str:
  """The attention implementation generation uses for `implementation` ('auto': splash on TPU,
  blockwise elsewhere) on `platform`."""
  if implementation == "auto":
    return "splash" if platform == "tpu" else "blockwise"
  return implementation
