"""csft_jax tests; run from the repository root (`make test`)."""

import os

# The checkout's root: tests run subprocesses from it and read files the repository ships.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
