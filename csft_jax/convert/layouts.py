"""Checkpoint layouts: HF `config.json` <-> `ModelConfig`, and tensor-name/shape rules.

Two tensor layouts cover the family: `llama` (Llama, Mistral, Qwen2, Qwen3: separate q/k/v
projections under `self_attn`) and `internlm2` (one interleaved `wqkv` per KV group, `wo`,
`w1/w3/w2`, `attention_norm`, `ffn_norm`, `tok_embeddings`, `output`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from csft_jax.models.config import ModelConfig

# HF `architectures[0]` / `model_type` -> our arch name.
ARCHITECTURE_NAMES = {
  "LlamaForCausalLM": "llama",
  "MistralForCausalLM": "mistral",
  "Qwen2ForCausalLM": "qwen2",
  "Qwen3ForCausalLM": "qwen3",
  "InternLM2ForCausalLM": "internlm2",
}
MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "internlm2": "internlm2"}
_HF_CLASS = {v: k for k, v in ARCHITECTURE_NAMES.items()}

# Buffers some checkpoints carry that are not weights.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def model_config_from_hf(hf: dict[str, Any], source: str = "config.json", **overrides: Any) -> ModelConfig:
  """Reads an HF `config.json` dict (transformers 4 or 5 style) into a `ModelConfig`."""
  arch = None
  for name in hf.get("architectures") or []:
    arch = ARCHITECTURE_NAMES.get(name)
  arch = arch or MODEL_TYPES.get(hf.get("model_type", ""))
  if arch is None:
    raise ValueError(
      f"{source}: unsupported model (architectures={hf.get('architectures')}, "
      f"model_type={hf.get('model_type')!r}). Supported architectures: {sorted(ARCHITECTURE_NAMES)}; "
      f"model types: {sorted(MODEL_TYPES)}."
    )
  if hf.get("hidden_act", "silu") not in ("silu", "swish"):
    raise ValueError(f"{source}: hidden_act={hf['hidden_act']!r}; only silu (SwiGLU) is supported.")
  rope = dict(hf.get("rope_parameters") or {})
  legacy = dict(hf.get("rope_scaling") or {})
  rope.update(legacy)
  rope_theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
  rope_type = rope.pop("rope_type", rope.pop("type", "default"))
  scaling = None if rope_type == "default" else tuple(sorted({"rope_type": rope_type, **rope}.items()))
  attention_bias = bool(hf.get("attention_bias", False))
  heads = hf["num_attention_heads"]
  fields = dict(
    arch=arch,
    vocab_size=hf["vocab_size"],
    hidden_size=hf["hidden_size"],
    intermediate_size=hf["intermediate_size"],
    num_layers=hf["num_hidden_layers"],
    num_heads=heads,
    num_kv_heads=hf.get("num_key_value_heads") or heads,
    head_dim=hf.get("head_dim"),
    rope_theta=float(rope_theta),
    rope_scaling=scaling,
    rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
    max_position_embeddings=hf.get("max_position_embeddings", 4096),
    tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    bos_token_id=hf.get("bos_token_id"),
    eos_token_id=hf.get("eos_token_id"),
    initializer_range=hf.get("initializer_range", 0.02),
    mlp_bias=bool(hf.get("mlp_bias", False)),
  )
  if arch == "qwen2":
    fields.update(qkv_bias=True)
  elif arch == "internlm2":
    fields.update(qkv_bias=bool(hf.get("bias", False)), out_bias=bool(hf.get("bias", False)))
  else:
    fields.update(qkv_bias=attention_bias, out_bias=attention_bias)
  if arch == "qwen3":
    fields.update(qk_norm=True)
  if arch == "mistral" or (arch in ("qwen2", "qwen3") and hf.get("use_sliding_window")):
    fields.update(sliding_window=hf.get("sliding_window"))
  fields.update(overrides)
  return ModelConfig(**fields)


def hf_config_from_model(config: ModelConfig, layout: str, torch_dtype: str) -> dict[str, Any]:
  """An HF `config.json` dict for `config` written in `layout` ('llama' or the arch's own)."""
  arch = "llama" if layout == "llama" and config.arch == "internlm2" else config.arch
  rope_scaling = dict(config.rope_scaling_dict) or None
  hf: dict[str, Any] = {
    "architectures": [_HF_CLASS[arch]],
    "model_type": arch,
    "vocab_size": config.vocab_size,
    "hidden_size": config.hidden_size,
    "intermediate_size": config.intermediate_size,
    "num_hidden_layers": config.num_layers,
    "num_attention_heads": config.num_heads,
    "num_key_value_heads": config.num_kv_heads,
    "head_dim": config.head_dim,
    "hidden_act": "silu",
    "max_position_embeddings": config.max_position_embeddings,
    "rms_norm_eps": config.rms_norm_eps,
    "rope_theta": config.rope_theta,
    "rope_scaling": rope_scaling,
    "tie_word_embeddings": config.tie_embeddings,
    "initializer_range": config.initializer_range,
    "bos_token_id": config.bos_token_id,
    "eos_token_id": list(config.eos_token_id) if isinstance(config.eos_token_id, tuple) else config.eos_token_id,
    "torch_dtype": torch_dtype,
    "use_cache": True,
  }
  if arch == "internlm2":
    if config.qkv_bias != config.out_bias:
      raise ValueError("InternLM2 has one `bias` switch for wqkv and wo; this model differs.")
    hf.update(
      bias=config.qkv_bias,
      attn_implementation="eager",
      auto_map={
        "AutoConfig": "configuration_internlm2.InternLM2Config",
        "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
        "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
      },
    )
    if rope_scaling:
      # InternLM2's own config class reads the legacy `type` key.
      hf["rope_scaling"] = {"type" if k == "rope_type" else k: v for k, v in rope_scaling.items()}
    return hf
  if arch == "qwen2":
    if not config.qkv_bias or config.out_bias:
      raise ValueError(
        f"Qwen2 layout needs q/k/v bias and no o bias; got qkv_bias={config.qkv_bias}, out_bias={config.out_bias}."
      )
  elif config.qkv_bias != config.out_bias:
    raise ValueError(
      f"{arch}: HF `attention_bias` covers q/k/v/o together; got qkv_bias={config.qkv_bias}, "
      f"out_bias={config.out_bias}. Export with a layout that has this bias pattern."
    )
  else:
    hf["attention_bias"] = config.qkv_bias
  if arch in ("llama", "mistral"):
    hf["mlp_bias"] = config.mlp_bias
  elif config.mlp_bias:
    raise ValueError(f"{arch} has no MLP bias in HF; this model has mlp_bias=True.")
  if config.qk_norm != (arch == "qwen3"):
    raise ValueError(f"{arch} layout {'needs' if arch == 'qwen3' else 'cannot hold'} per-head q/k norms.")
  if arch == "mistral":
    hf["sliding_window"] = config.sliding_window
  elif arch in ("qwen2", "qwen3"):
    hf.update(use_sliding_window=config.sliding_window is not None, sliding_window=config.sliding_window)
  elif config.sliding_window is not None:
    raise ValueError(f"{arch} has no sliding window; export this model as mistral.")
  return hf


@dataclasses.dataclass(frozen=True)
class TensorRule:
  """One HF tensor and the parameter(s) of ours it holds.

  `ours` are dotted paths relative to a layer (for layer rules) or to the model; `to_ours` splits
  the HF array into our arrays, `to_hf` joins them back exactly (pure reshapes/transposes).
  """

  hf: str
  hf_shape: tuple[int, ...]
  ours: tuple[str, ...]
  to_ours: Callable[[np.ndarray], tuple[np.ndarray, ...]]
  to_hf: Callable[[tuple[np.ndarray, ...]], np.ndarray]


def _transpose_rule(hf: str, hf_shape, ours: str, our_shape) -> TensorRule:
  # HF stores Linear weights as [out, in]; ours are [in, ...out] (q/k/v, gate/up, lm_head) or
  # [..in, out] (o_proj, down_proj), so x @ kernel needs no transpose either way. to_ours returns
  # views where numpy can, so the loader copies each tensor exactly once.
  out_dim, in_dim = hf_shape
  return TensorRule(
    hf,
    hf_shape,
    (ours,),
    lambda w: (w.T.reshape(our_shape),),
    lambda a: np.ascontiguousarray(a[0].reshape(in_dim, out_dim).T),
  )


def _same_rule(hf: str, shape, ours: str, our_shape=None) -> TensorRule:
  our_shape = our_shape or shape
  return TensorRule(
    hf, tuple(shape), (ours,), lambda w: (np.asarray(w).reshape(our_shape),), lambda a: np.asarray(a[0]).reshape(shape)
  )


# Our module -> its HF tensor name (without `.weight`/`.bias`) in the `llama` and `internlm2`
# layouts, which differ only in these names and in InternLM2's fused q/k/v (`attention.wqkv`).
_HF_NAMES = {
  "embed": ("model.embed_tokens", "model.tok_embeddings"),
  "head": ("lm_head", "output"),
  "o_proj": ("self_attn.o_proj", "attention.wo"),
  "gate_proj": ("mlp.gate_proj", "feed_forward.w1"),
  "up_proj": ("mlp.up_proj", "feed_forward.w3"),
  "down_proj": ("mlp.down_proj", "feed_forward.w2"),
  "attn_norm": ("input_layernorm", "attention_norm"),
  "mlp_norm": ("post_attention_layernorm", "ffn_norm"),
}


def _hf_names(layout: str, prefix: str = "") -> dict[str, str]:
  return {ours: prefix + names[layout == "internlm2"] for ours, names in _HF_NAMES.items()}


def global_rules(config: ModelConfig, layout: str) -> list[TensorRule]:
  """Rules for the embedding, the final norm and (untied) lm_head."""
  v, d = config.vocab_size, config.hidden_size
  names = _hf_names(layout)
  rules = [
    _same_rule(names["embed"] + ".weight", (v, d), "embed.embedding"),
    _same_rule("model.norm.weight", (d,), "final_norm.scale"),
  ]
  if not config.tie_embeddings:
    rules.append(_transpose_rule(names["head"] + ".weight", (v, d), "lm_head.kernel", (d, v)))
  return rules


def layer_rules(config: ModelConfig, layout: str) -> list[TensorRule]:
  """Rules for one decoder layer; HF names contain `{i}` for the layer index."""
  d, h, k, hd, m = (
    config.hidden_size,
    config.num_heads,
    config.num_kv_heads,
    config.head_dim,
    config.intermediate_size,
  )
  p = "model.layers.{i}."
  names = _hf_names(layout, p)
  if layout == "internlm2":
    rules = [_wqkv_rule(p + "attention.wqkv.weight", config)]
    if config.qkv_bias:
      rules.append(_wqkv_bias_rule(p + "attention.wqkv.bias", config))
  else:
    rules = [
      _transpose_rule(p + "self_attn.q_proj.weight", (h * hd, d), "attn.q_proj.kernel", (d, h, hd)),
      _transpose_rule(p + "self_attn.k_proj.weight", (k * hd, d), "attn.k_proj.kernel", (d, k, hd)),
      _transpose_rule(p + "self_attn.v_proj.weight", (k * hd, d), "attn.v_proj.kernel", (d, k, hd)),
    ]
    if config.qkv_bias:
      rules += [
        _same_rule(p + "self_attn.q_proj.bias", (h * hd,), "attn.q_proj.bias", (h, hd)),
        _same_rule(p + "self_attn.k_proj.bias", (k * hd,), "attn.k_proj.bias", (k, hd)),
        _same_rule(p + "self_attn.v_proj.bias", (k * hd,), "attn.v_proj.bias", (k, hd)),
      ]
    if config.qk_norm:
      rules += [
        _same_rule(p + "self_attn.q_norm.weight", (hd,), "attn.q_norm.scale"),
        _same_rule(p + "self_attn.k_norm.weight", (hd,), "attn.k_norm.scale"),
      ]
  rules += [
    _transpose_rule(names["o_proj"] + ".weight", (d, h * hd), "attn.o_proj.kernel", (h, hd, d)),
    _transpose_rule(names["gate_proj"] + ".weight", (m, d), "mlp.gate_proj.kernel", (d, m)),
    _transpose_rule(names["up_proj"] + ".weight", (m, d), "mlp.up_proj.kernel", (d, m)),
    _transpose_rule(names["down_proj"] + ".weight", (d, m), "mlp.down_proj.kernel", (m, d)),
    _same_rule(names["attn_norm"] + ".weight", (d,), "attn_norm.scale"),
    _same_rule(names["mlp_norm"] + ".weight", (d,), "mlp_norm.scale"),
  ]
  if config.out_bias:
    rules.append(_same_rule(names["o_proj"] + ".bias", (d,), "attn.o_proj.bias"))
  if config.mlp_bias:
    rules += [
      _same_rule(names["gate_proj"] + ".bias", (m,), "mlp.gate_proj.bias"),
      _same_rule(names["up_proj"] + ".bias", (m,), "mlp.up_proj.bias"),
      _same_rule(names["down_proj"] + ".bias", (d,), "mlp.down_proj.bias"),
    ]
  return rules


def _wqkv_rule(name: str, config: ModelConfig) -> TensorRule:
  # InternLM2 interleaves per KV group: [q_0 .. q_{g-1}, k, v] x kv_heads, each head_dim rows.
  d, h, k, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
  g = h // k

  def to_ours(w):
    grouped = np.asarray(w).reshape(k, g + 2, hd, d)
    q = grouped[:, :g].reshape(h, hd, d).transpose(2, 0, 1)
    return q, grouped[:, g].transpose(2, 0, 1), grouped[:, g + 1].transpose(2, 0, 1)

  def to_hf(arrays):
    q, kk, vv = arrays
    grouped = np.concatenate(
      [q.transpose(1, 2, 0).reshape(k, g, hd, d), kk.transpose(1, 2, 0)[:, None], vv.transpose(1, 2, 0)[:, None]],
      axis=1,
    )
    return np.ascontiguousarray(grouped.reshape(k * (g + 2) * hd, d))

  return TensorRule(
    name, (k * (g + 2) * hd, d), ("attn.q_proj.kernel", "attn.k_proj.kernel", "attn.v_proj.kernel"), to_ours, to_hf
  )


def _wqkv_bias_rule(name: str, config: ModelConfig) -> TensorRule:
  h, k, hd = config.num_heads, config.num_kv_heads, config.head_dim
  g = h // k

  def to_ours(b):
    grouped = np.asarray(b).reshape(k, g + 2, hd)
    return grouped[:, :g].reshape(h, hd), grouped[:, g], grouped[:, g + 1]

  def to_hf(arrays):
    q, kk, vv = arrays
    return np.concatenate([q.reshape(k, g, hd), kk[:, None], vv[:, None]], axis=1).reshape(-1)

  return TensorRule(
    name, (k * (g + 2) * hd,), ("attn.q_proj.bias", "attn.k_proj.bias", "attn.v_proj.bias"), to_ours, to_hf
  )


def default_layout(config: ModelConfig) -> str:
  return "internlm2" if config.arch == "internlm2" else "llama"
