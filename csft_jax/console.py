"""What the entry points show on the console: our progress lines, not the libraries' chatter."""

import logging as std_logging
import sys
from collections.abc import Callable
from typing import Any

from absl import app, flags, logging

# Libraries that log every checkpoint save/restore at INFO level.
_CHATTY_PACKAGES = ("/orbax/", "/grain/")


def quiet_library_info_logs() -> None:
  """Hides INFO records from Orbax and Grain (their warnings and errors still show).

  Entry points call this unless `--verbosity` was given, so `--verbosity=0` shows everything.
  """
  def keep(record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or not any(p in record.pathname for p in _CHATTY_PACKAGES)

  logging.get_absl_handler().addFilter(keep)


# What a person can fix from the message alone: bad configs, data, paths, checkpoints, permissions.
# Every such error in csft_jax subclasses ValueError (or is an OSError, or a CheckpointError).
def _expected_errors() -> tuple[type[BaseException], ...]:
  from csft_jax.checkpointing import CheckpointError  # pylint: disable=import-outside-toplevel
  return (ValueError, OSError, CheckpointError)


def run_cli(main: Callable[[list[str]], Any]) -> None:
  """`absl.app.run(main)` for every entry point: library INFO chatter hidden unless `--verbosity`
  is given, and expected errors shown as one `error: ...` line (exit status 1), not a traceback.
  With `--verbosity` the traceback is shown too."""

  def wrapped(argv: list[str]) -> Any:
    verbose = flags.FLAGS["verbosity"].present
    if not verbose:
      quiet_library_info_logs()
    try:
      return main(argv)
    except _expected_errors() as error:
      if verbose:
        raise
      sys.exit(f"error: {error}\n(rerun with --verbosity=0 to see the traceback)")

  app.run(wrapped)
