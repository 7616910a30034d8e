"""Tiny random HF (PyTorch) reference models, the ground truth for parity tests."""

from __future__ import annotations

import json
import os

import safetensors.torch
import torch
import transformers

TINY = dict(
  vocab_size=101,
  hidden_size=32,
  intermediate_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  max_position_embeddings=256,
)

CONFIGS = {
  "llama": lambda: transformers.LlamaConfig(
    **TINY,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    rope_scaling={
      "rope_type": "llama3",
      "factor": 8.0,
      "low_freq_factor": 1.0,
      "high_freq_factor": 4.0,
      "original_max_position_embeddings": 16,
    },
  ),
  "qwen2": lambda: transformers.Qwen2Config(**TINY, tie_word_embeddings=True, rope_theta=10000.0),
  "qwen3": lambda: transformers.Qwen3Config(**TINY, head_dim=16, rope_theta=10000.0, tie_word_embeddings=False),
  "mistral": lambda: transformers.MistralConfig(**TINY, sliding_window=5, head_dim=8),
}


def make_hf_model(arch: str, seed: int = 0) -> transformers.PreTrainedModel:
  """A tiny randomly initialised HF causal LM in float32, eval mode.

  Norm weights are randomised too (HF initialises them to ones, which would hide a swapped norm).
  """
  torch.manual_seed(seed)
  config = CONFIGS[arch]()
  config._attn_implementation = "eager"
  model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      elif name.endswith(".bias"):
        p.copy_(0.05 * torch.randn_like(p))
  return model


def padded_batch(vocab: int, lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
  """Right-padded random `input_ids` and `attention_mask` for the given row lengths."""
  g = torch.Generator().manual_seed(seed)
  width = max(lengths)
  ids = torch.randint(0, vocab, (len(lengths), width), generator=g)
  mask = torch.zeros_like(ids)
  for row, n in enumerate(lengths):
    mask[row, :n] = 1
  return ids, mask


# ---- InternLM2: not in transformers; a Llama checkpoint repacked into its layout is the reference.


def repack_as_internlm2(state: dict, config) -> dict:
  """InternLM2's layout, from its modeling code: wqkv rows are `(kv_heads, q_per_kv + 2, head_dim)`."""
  kv, heads, hd, d = (
    config.num_key_value_heads,
    config.num_attention_heads,
    config.hidden_size // config.num_attention_heads,
    config.hidden_size,
  )
  groups = heads // kv
  out = {
    "model.tok_embeddings.weight": state["model.embed_tokens.weight"],
    "model.norm.weight": state["model.norm.weight"],
    "output.weight": state["lm_head.weight"],
  }
  for i in range(config.num_hidden_layers):
    p = f"model.layers.{i}."
    q = state[p + "self_attn.q_proj.weight"].reshape(kv, groups, hd, d)
    k = state[p + "self_attn.k_proj.weight"].reshape(kv, 1, hd, d)
    v = state[p + "self_attn.v_proj.weight"].reshape(kv, 1, hd, d)
    out[p + "attention.wqkv.weight"] = torch.cat([q, k, v], dim=1).reshape(-1, d).contiguous()
    out[p + "attention.wo.weight"] = state[p + "self_attn.o_proj.weight"]
    out[p + "feed_forward.w1.weight"] = state[p + "mlp.gate_proj.weight"]
    out[p + "feed_forward.w3.weight"] = state[p + "mlp.up_proj.weight"]
    out[p + "feed_forward.w2.weight"] = state[p + "mlp.down_proj.weight"]
    out[p + "attention_norm.weight"] = state[p + "input_layernorm.weight"]
    out[p + "ffn_norm.weight"] = state[p + "post_attention_layernorm.weight"]
  return {k: v.contiguous() for k, v in out.items()}


def save_as_internlm2(llama, path, **config_fields) -> dict[str, torch.Tensor]:
  """Writes the Llama model `llama` as an InternLM2 checkpoint into `path` (its tensor layout and a
  config.json, plus `config_fields`); returns the tensors written."""
  config = llama.config
  tensors = repack_as_internlm2(dict(llama.state_dict()), config)
  safetensors.torch.save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
  hf_config = {
    "architectures": ["InternLM2ForCausalLM"],
    "model_type": "internlm2",
    "bias": False,
    "vocab_size": config.vocab_size,
    "hidden_size": config.hidden_size,
    "intermediate_size": config.intermediate_size,
    "num_hidden_layers": config.num_hidden_layers,
    "num_attention_heads": config.num_attention_heads,
    "num_key_value_heads": config.num_key_value_heads,
    "hidden_act": "silu",
    "max_position_embeddings": config.max_position_embeddings,
    "rms_norm_eps": config.rms_norm_eps,
    "rope_theta": config.rope_parameters["rope_theta"],
    "tie_word_embeddings": False,
    **config_fields,
  }
  with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
    json.dump(hf_config, f)
  return tensors
