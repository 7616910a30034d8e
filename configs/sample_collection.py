"""Data config: the project's own sample collection (csft_jax/assets/sample_collection).

Small and fast; the demo and unit tests use it. `configs/demo.py` reuses
`csft_jax.data.config.sample_collection_config()`.
"""

import ml_collections

from configs import base
from csft_jax.data.config import sample_collection_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the base config with the sample collection as `data`."""
  del arg
  config = base.get_config()
  config.data = sample_collection_config()
  return config
