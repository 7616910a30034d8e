"""What the entry points show on the console: our progress lines, not the libraries' chatter."""

import logging as std_logging

from absl import logging

# Libraries that log every checkpoint save/restore at INFO level.
_CHATTY_PACKAGES = ("/orbax/", "/grain/")


def quiet_library_info_logs() -> None:
  """Hides INFO records from Orbax and Grain (their warnings and errors still show).

  Entry points call this unless `--verbosity` was given, so `--verbosity=0` shows everything.
  """
  def keep(record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or not any(p in record.pathname for p in _CHATTY_PACKAGES)

  logging.get_absl_handler().addFilter(keep)
