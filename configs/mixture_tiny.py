"""The mixture ablation at CPU scale: the demo model on CMB-style items alone or on the collection.

  python -m csft_jax.train --config=configs/mixture_tiny.py:sources=cmb_only --workdir=W/cmb_only
  python -m csft_jax.train --config=configs/mixture_tiny.py:sources=collection --workdir=W/collection \
      --config.data.mixing=uniform

Model, optimizer and trainer settings are `configs/demo.py`'s; only the data and the run length
change. `sources=cmb_only` stands in for "CMB-train only" with the project's sample CMB-style
items; `sources=collection` adds the five real sources of `configs/collection_shared.py`. The
CMB source sorts first in both, so its held-out split (a function of seed, source index and
size) is the same items in every run and its eval loss is comparable across the ablation.
`experiments/mixture_ablation_tiny.py` sweeps this config.
"""

import ml_collections

from configs import base, collection_shared, demo
from csft_jax.data.config import sample_collection_config

SOURCES = ("cmb_only", "collection")
CMB_SOURCE = "cmb_style_mcq"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the demo config training on the chosen sources for 80 steps."""
  sources = base.parse_arg(
    arg, {"sources": "collection"}, where="configs/mixture_tiny.py", choices={"sources": SOURCES}
  )["sources"]
  config = demo.get_config()
  cmb = sample_collection_config().sources[CMB_SOURCE]
  if sources == "cmb_only":
    config.data.sources = ml_collections.ConfigDict({CMB_SOURCE: cmb})
  else:
    collection = collection_shared.get_data_config().sources
    config.data.sources = ml_collections.ConfigDict({CMB_SOURCE: cmb, **collection})
  # 10% of 80 CMB items: 8 held out, enough for a per-source eval loss.
  config.data.val_fraction = 0.1
  config.train.num_steps = 80
  config.train.eval_every = 40
  config.train.log_every = 10
  config.checkpoint.every_steps = 40
  config.optim.lr = 3e-3
  config.train.export_hf = ""
  return config
