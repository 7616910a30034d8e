"""Decoder models: `ModelConfig`, presets, and the NNX `Decoder`."""

from csft_jax.models.config import ModelConfig, PRESETS, get_preset
from csft_jax.models.decoder import Decoder, KVCache

__all__ = ["ModelConfig", "PRESETS", "get_preset", "Decoder", "KVCache"]
