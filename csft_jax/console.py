"""What the entry points show on the console: our progress lines, not the libraries' chatter."""

import difflib
import logging as std_logging
import sys
from collections.abc import Callable, Sequence
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
  from csft_jax.checkpointing import CheckpointError

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
    except KeyboardInterrupt as interrupt:
      # Ctrl-C outside the loops that stop cleanly at a step or batch (e.g. while a model loads),
      # or a second Ctrl-C: one line, exit status 130 as a shell gives, not a traceback.
      if verbose:
        raise
      print(f"interrupted{': ' + str(interrupt) if str(interrupt) else ''}", file=sys.stderr)
      sys.exit(130)

  app.run(wrapped, flags_parser=_parse_flags)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a `--config.FIELD=VALUE` that names no field as one `error:` line."""
  try:
    return app.parse_flags_with_usage(argv)
  except (KeyError, AttributeError) as error:
    if any(arg.startswith("--verbosity") for arg in argv):
      raise
    sys.exit(f"error: {_unknown_override(argv) or error}")


def _unknown_override(argv: Sequence[str]) -> str | None:
  """Which `--config.a.b.c=...` of `argv` names a field the config file does not have, and what it has."""
  from csft_jax import configuration

  spec = next((arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")), None)
  if spec is None:
    return None
  path, _, arg = spec.partition(":")
  try:
    module = configuration.load_module(path)
    config = module.get_config(arg) if arg else module.get_config()
  except Exception:  # noqa: BLE001  any error in the config file: the original error speaks for it
    return None
  for flag in argv:
    if not flag.startswith("--config."):
      continue
    dotted = flag[len("--config.") :].split("=", 1)[0]
    node, walked = config, "config"
    for part in dotted.split("."):
      if not hasattr(node, "keys"):
        break
      if part not in node:
        fields = sorted(node.keys())
        close = difflib.get_close_matches(part, fields, n=1)
        hint = f" Did you mean {walked}.{close[0]}?" if close else ""
        return (
          f"{flag.split('=', 1)[0]}: {walked} has no field {part!r}; its fields are "
          f"{', '.join(fields) or '(none)'}.{hint}"
        )
      node, walked = node[part], f"{walked}.{part}"
  return None
