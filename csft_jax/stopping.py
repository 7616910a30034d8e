"""SIGTERM/SIGINT as a request to stop at the next safe point (a finished step or batch).

The trainer checks it after each step (save, exit 0) and the evaluator after each batch (keep the
finished generations, exit 0); rerunning the same command continues. A second signal stops at
once (KeyboardInterrupt), for a person who does not want to wait.
"""

from __future__ import annotations

import signal

import jax
import numpy as np


class StopRequest:
  """Turns SIGTERM/SIGINT into a flag that the caller polls with `requested()`."""

  def __init__(self):
    self.signal_name = None
    self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

  def close(self) -> None:
    """Puts the previous handlers back."""
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, _frame):
    if self.signal_name is not None:
      self.close()
      raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping now")
    self.signal_name = signal.Signals(signum).name

  def requested(self) -> bool:
    flag = np.asarray(self.signal_name is not None)
    if jax.process_count() > 1:
      # Every process must stop at the same point, or the collectives would hang.
      from jax.experimental import multihost_utils

      flag = multihost_utils.process_allgather(flag).any()
    return bool(flag)
