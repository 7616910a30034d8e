"""HF <-> csft_jax checkpoint conversion: `load_hf`, `save_hf`."""

from csft_jax.convert.hf import load_hf, read_hf_config, save_hf

__all__ = ["load_hf", "save_hf", "read_hf_config"]
