"""Tiny random HF (PyTorch) reference models, the ground truth for parity tests."""

from __future__ import annotations

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
