"""Data config: the project's own sample collection (csft_jax/assets/sample_collection).

Small and fast; the demo and unit tests use it. `configs/demo.py` can reuse
`csft_jax.data.config.sample_collection_config()`.
"""

import ml_collections

from csft_jax.data.config import sample_collection_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns a config whose `data` field is the sample collection."""
  del arg
  config = ml_collections.ConfigDict()
  config.data = sample_collection_config()
  return config
