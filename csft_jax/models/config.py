"""`ModelConfig`: one description for the Llama / Qwen2 / Qwen3 / Mistral / InternLM2 decoder family.

The family differs in a handful of switches (q/k/v bias, per-head q/k RMSNorm, tied embeddings,
head_dim, RoPE scaling, sliding window) and in checkpoint layout; the layout lives in
`csft_jax.convert`, the switches live here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import ml_collections
from ml_collections import config_dict

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "internlm2")
ROPE_TYPES = ("default", "linear", "llama3", "dynamic")
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "blockwise", "splash")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyper-parameters of one decoder; frozen so it can be a static jit argument.

  `rope_scaling` is a tuple of (key, value) pairs (hashable) such as
  `(("rope_type", "llama3"), ("factor", 8.0), ...)`; use `rope_scaling_dict` to read it.
  """

  arch: str = "llama"
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 32
  head_dim: int | None = None
  rope_theta: float = 10000.0
  rope_scaling: tuple[tuple[str, Any], ...] | None = None
  rms_norm_eps: float = 1e-6
  max_position_embeddings: int = 4096
  qkv_bias: bool = False
  out_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False
  tie_embeddings: bool = False
  sliding_window: int | None = None
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  initializer_range: float = 0.02
  param_dtype: str = "float32"
  dtype: str = "bfloat16"
  attention_impl: str = "xla"
  attention_block_q: int = 128  # tile sizes of the blockwise and splash kernels
  attention_block_kv: int = 128
  remat_policy: str = "none"
  scan_layers: bool = True
  # LoRA (csft_jax.models.lora): adapters of rank `lora_rank` (0: none) on the projections named
  # in `lora_targets` (our module paths, e.g. "attn.q_proj"), scaled by alpha / r (alpha / sqrt(r)
  # with `lora_rslora`); `lora_dropout` drops their input while training.
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = ()
  lora_rslora: bool = False
  lora_dropout: float = 0.0

  def __post_init__(self):
    if self.arch not in ARCHITECTURES:
      raise ValueError(f"ModelConfig.arch={self.arch!r} is not supported; supported: {ARCHITECTURES}.")
    if self.head_dim is None:
      if self.hidden_size % self.num_heads:
        raise ValueError(
          f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; set head_dim."
        )
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads} (GQA groups)."
      )
    if self.attention_impl not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"attention_impl={self.attention_impl!r}; choose one of {ATTENTION_IMPLEMENTATIONS}.")
    if self.attention_block_q <= 0 or self.attention_block_kv <= 0:
      raise ValueError(
        f"attention_block_q={self.attention_block_q}, attention_block_kv={self.attention_block_kv}: "
        "tile sizes must be positive (128 is a good start)."
      )
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy={self.remat_policy!r}; choose one of {REMAT_POLICIES}.")
    if isinstance(self.rope_scaling, dict):
      object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
    if isinstance(self.eos_token_id, list):
      object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
    if isinstance(self.lora_targets, (list, str)):
      object.__setattr__(
        self,
        "lora_targets",
        tuple(self.lora_targets.split(",") if isinstance(self.lora_targets, str) else self.lora_targets),
      )
    if self.lora_rank < 0 or not 0.0 <= self.lora_dropout < 1.0:
      raise ValueError(
        f"lora_rank={self.lora_rank}, lora_dropout={self.lora_dropout}: the rank must be >= 0 "
        "and the dropout in [0, 1)."
      )
    rope_type = self.rope_scaling_dict.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
      raise ValueError(f"rope_scaling type {rope_type!r} is not supported; supported: {ROPE_TYPES}.")

  @property
  def lora_scale(self) -> float:
    """The factor on the adapters' output: alpha / r, or alpha / sqrt(r) with rsLoRA (as PEFT)."""
    return self.lora_alpha / (math.sqrt(self.lora_rank) if self.lora_rslora else self.lora_rank)

  @property
  def rope_scaling_dict(self) -> dict[str, Any]:
    return dict(self.rope_scaling or ())

  def replace(self, **changes: Any) -> ModelConfig:
    return dataclasses.replace(self, **changes)

  def num_params(self) -> int:
    """Parameter count (embeddings included, lm_head counted once when tied)."""
    d, h, k, hd = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
    attn = d * (h + 2 * k) * hd + h * hd * d
    if self.qkv_bias:
      attn += (h + 2 * k) * hd
    if self.out_bias:
      attn += d
    if self.qk_norm:
      attn += 2 * hd
    mlp = 3 * d * self.intermediate_size + (2 * self.intermediate_size + d if self.mlp_bias else 0)
    per_layer = attn + mlp + 2 * d
    embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
    return self.num_layers * per_layer + embed + d


_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads")


def _sized(family: dict[str, Any], *sizes: int, **fields: Any) -> ModelConfig:
  """A member of `family`: its `_SIZES`, then the fields in which it departs from the family."""
  return ModelConfig(**{**family, **dict(zip(_SIZES, sizes, strict=True)), **fields})


# fmt: off
# What the checkpoints of one family share (their config.json); each preset below adds its sizes.
_INTERNLM2 = dict(arch="internlm2", rope_theta=1e6, max_position_embeddings=32768, rms_norm_eps=1e-5,
                  rope_scaling=dict(rope_type="dynamic", factor=2.0), bos_token_id=1, eos_token_id=2)
_QWEN = dict(arch="qwen2", qkv_bias=True, rope_theta=1e6, max_position_embeddings=32768, rms_norm_eps=1e-6,
             bos_token_id=151643, eos_token_id=151645)
_LLAMA31 = dict(arch="llama", rope_theta=5e5, max_position_embeddings=131072, rms_norm_eps=1e-5,
                rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                  original_max_position_embeddings=8192))
_LLAMA2 = dict(arch="llama", max_position_embeddings=2048, rms_norm_eps=1e-5)
_TINY = dict(arch="llama", max_position_embeddings=512, rms_norm_eps=1e-5, dtype="float32")  # for tests

PRESETS: dict[str, ModelConfig] = {
  #                        family      vocab   hidden ffn    layers heads kv_heads
  "internlm2_5_7b": _sized(_INTERNLM2, 92544,  4096,  14336, 32,    32,   8),
  "qwen2_5_7b":     _sized(_QWEN,      152064, 3584,  18944, 28,    28,   4),
  "qwen2_5_0_5b":   _sized(_QWEN,      151936, 896,   4864,  24,    14,   2, tie_embeddings=True),
  "qwen3_8b":       _sized(_QWEN,      151936, 4096,  12288, 36,    32,   8, arch="qwen3", qkv_bias=False,
                           qk_norm=True, head_dim=128, max_position_embeddings=40960),
  "llama3_1_8b":    _sized(_LLAMA31,   128256, 4096,  14336, 32,    32,   8, bos_token_id=128000,
                           eos_token_id=(128001, 128008, 128009)),
  "llama_1b":       _sized(_LLAMA31,   128256, 2048,  8192,  16,    32,   8, tie_embeddings=True),
  "llama_100m":     _sized(_LLAMA2,    32000,  768,   2048,  12,    12,   4),
  "tiny":           _sized(_TINY,      512,    64,    128,   2,     4,    2),
  "tiny_internlm2": _sized(_TINY,      512,    64,    128,   2,     4,    2, arch="internlm2"),
  "tiny_qwen3":     _sized(_TINY,      512,    64,    128,   2,     4,    2, arch="qwen3", head_dim=32, qk_norm=True,
                           rms_norm_eps=1e-6),
}
# fmt: on


def get_preset(name: str, **overrides: Any) -> ModelConfig:
  """Returns the named preset with `overrides` applied (e.g. `vocab_size=`, `dtype=`)."""
  if name not in PRESETS:
    raise KeyError(f"Unknown model preset {name!r}; known presets: {sorted(PRESETS)}.")
  return PRESETS[name].replace(**overrides)


# Architecture fields a config may override on top of its preset (None: the preset's value).
ARCHITECTURE_FIELDS = {
  "hidden_size": int,
  "intermediate_size": int,
  "num_layers": int,
  "num_heads": int,
  "num_kv_heads": int,
  "head_dim": int,
  "rope_theta": float,
  "rms_norm_eps": float,
  "max_position_embeddings": int,
  "tie_embeddings": bool,
  "sliding_window": int,
}
# Fields that may differ between a checkpoint and the run that loads it (how it runs, not what it is).
RUNTIME_FIELDS = (
  "dtype",
  "param_dtype",
  "remat_policy",
  "scan_layers",
  "attention_impl",
  "attention_block_q",
  "attention_block_kv",
)


def default_config() -> ml_collections.ConfigDict:
  """`config.model`: a preset, architecture overrides (typed placeholders) and runtime choices.

  With `config.init.from_hf` / `from_checkpoint` the architecture comes from the checkpoint, and
  only the runtime fields apply.
  """
  return ml_collections.ConfigDict(
    dict(
      preset="tiny",
      vocab_size=-1,  # <= 0: the tokenizer's size rounded up to a multiple of 128.
      **{name: config_dict.placeholder(kind) for name, kind in ARCHITECTURE_FIELDS.items()},
      dtype="bfloat16",  # compute dtype
      param_dtype="float32",  # master weights
      remat_policy="none",  # one of REMAT_POLICIES
      scan_layers=True,
      attention_impl="xla",  # one of ATTENTION_IMPLEMENTATIONS
      attention_block_q=128,  # blockwise / splash tile sizes
      attention_block_kv=128,
    )
  )


def model_config_from(fields: Mapping[str, Any], tokenizer_size: int) -> ModelConfig:
  """`config.model` (a `preset` name + field overrides) -> `ModelConfig`.

  `vocab_size <= 0` takes the tokenizer's size, rounded up to a multiple of 128 so the vocab axis
  shards evenly. Fields left None keep the preset's value.
  """
  fields = {k: v for k, v in dict(fields).items() if v is not None}
  preset = fields.pop("preset")
  if fields.get("vocab_size", 0) <= 0:
    fields["vocab_size"] = -(-tokenizer_size // 128) * 128
  return get_preset(preset, **fields)
