"""Decoder models: `ModelConfig`, presets, and the NNX `Decoder`."""

from csft_jax.models.config import PRESETS, ModelConfig, get_preset, model_config_from
from csft_jax.models.decoder import Decoder, KVCache, generation_attention, with_runtime

__all__ = [
  "ModelConfig",
  "PRESETS",
  "get_preset",
  "model_config_from",
  "Decoder",
  "KVCache",
  "generation_attention",
  "with_runtime",
]
