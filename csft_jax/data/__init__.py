"""Collective-instruction data pipeline: sources -> conversations -> tokens -> mixture -> packed batches."""

import importlib.abc
import importlib.util
import os
import sys

# Modules that register chat templates or source formats of their own: imported with the package, so
# their names are known wherever a name is looked up.
from csft_jax.data import (
  llamafactory,  # noqa: F401  (registers the llamafactory_intern2 template)
  meds_ins,  # noqa: F401  (registers the meds_ins format)
)


class _InspectAlias(importlib.abc.MetaPathFinder):
  """Finds `csft_jax.data.inspect` (the documented `python -m csft_jax.data.inspect` CLI) in
  `inspection.py`: a file named inspect.py here would shadow the standard library's `inspect` for any
  script run from this folder. An import of the alias runs that file as a module of its own."""

  def find_spec(self, fullname, path=None, target=None):
    del path, target
    if fullname != __name__ + ".inspect":
      return None
    return importlib.util.spec_from_file_location(fullname, os.path.join(os.path.dirname(__file__), "inspection.py"))


sys.meta_path.append(_InspectAlias())
