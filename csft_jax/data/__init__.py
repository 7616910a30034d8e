"""Collective-instruction data pipeline: sources -> conversations -> tokens -> mixture -> packed batches."""

import importlib.util
import os
import sys
import warnings

# Modules that register chat templates or source formats of their own: imported with the package, so
# their names are known wherever a name is looked up.
from csft_jax.data import (
  llamafactory,  # noqa: F401  (registers the llamafactory_intern2 template)
  meds_ins,  # noqa: F401  (registers the meds_ins format)
)

# `python -m csft_jax.data.inspect` (the documented CLI) runs `inspection.py`: a file named inspect.py
# here would shadow the standard library's `inspect` for any script run from this folder. runpy finds
# the alias below after importing this package and reports that as a RuntimeWarning, expected here.
warnings.filterwarnings("ignore", message=r"'csft_jax\.data\.inspect' found in sys\.modules", category=RuntimeWarning)
sys.modules.setdefault(
  __name__ + ".inspect",
  importlib.util.module_from_spec(
    importlib.util.spec_from_file_location(
      __name__ + ".inspect", os.path.join(os.path.dirname(__file__), "inspection.py")
    )
  ),
)
