"""The run directory: every path of one run, and the one vocabulary of run statuses.

  W/config.json            the run's config as trained (paths absolute: see csft_jax.configuration)
  W/tokenizer/             the run's own copy of its tokenizer (resume, export and evaluation use it)
  W/metrics.jsonl          one JSON object per logged step
  W/tensorboard/           TensorBoard events
  W/checkpoints/<step>/    Orbax checkpoints (csft_jax.checkpointing)
  W/checkpoints_unreadable/<step>/   checkpoints moved aside because they could not be restored
  W/base/0/                a LoRA run's frozen base (written once; step checkpoints hold the adapters)
  W/run_summary.json       status, steps and final loss, written when the trainer stops
  W/hf_export/             the finished model as an HF directory (config.train.export_hf; merged for LoRA)
  W/<export_peft>/         a LoRA run's adapters as a PEFT directory (config.train.export_peft)
  W/eval/<name>/<model>/   one evaluation: `results.json` (what reports read), its other files and
                           `progress.jsonl` (finished generations, for resuming); the name carries
                           the benchmark and its mode (cmb-answer, cmb-cot, meds_bench), the model
                           the step evaluated (`step_150`; `step_150-limit_4` for a partial run of
                           the first 4 items), so evaluations of different steps never overwrite
  W/sweep.log              the output of every command a sweep ran for this run
  W/.lock                  held by the one trainer writing this run (`RunLock`): pid, host, start time

Train, evaluate, sweep, report and the tools find these paths here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import socket
from typing import Any

from csft_jax import files

# Statuses of a run. The trainer writes the last three into run_summary.json; a run without a
# summary is NEW (nothing written yet) or INTERRUPTED (it wrote outputs but did not stop cleanly).
NEW = "new"
INTERRUPTED = "interrupted"
DIVERGED = "diverged"
FINISHED = "finished"
STATUSES = (NEW, INTERRUPTED, DIVERGED, FINISHED)

TOKENIZER_DIR = "tokenizer"
HF_EXPORT_DIR = "hf_export"


def model_tag(model: int | str, limit: int = 0) -> str:
  """The directory an evaluation writes under `W/eval/<name>/`: `step_<N>` for step N (an int), else
  the model's own name (e.g. an HF directory of the run that is not its latest export); `-limit_K`
  marks a partial evaluation of the first K items."""
  return (f"step_{model}" if isinstance(model, int) else model) + (f"-limit_{limit}" if limit else "")


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """One evaluation of a run: `W/eval/<name>/<model>/`."""

  name: str
  model: str
  step: int | None  # None: a model without a step (named by its directory)
  limit: int  # > 0: only the first `limit` items (partial)

  @classmethod
  def parse(cls, name: str, model: str) -> Evaluation:
    match = re.fullmatch(r"(?:step_(\d+)|.+?)(?:-limit_(\d+))?", model)
    return cls(name, model, int(match.group(1)) if match.group(1) else None, int(match.group(2) or 0))


class RunDirError(ValueError):
  """A run directory whose files cannot be read as the trainer and evaluator write them."""


class _Entry:
  """A fixed path under the run's root, read as an attribute: `RunDir(w).metrics` is `w/metrics.jsonl`."""

  def __init__(self, name: str):
    self.name = name

  def __get__(self, run_dir: RunDir | None, owner=None):
    return self if run_dir is None else run_dir.path(self.name)


class RunDir:
  """The paths of one run rooted at `root` (nothing is created until something is written)."""

  def __init__(self, root: str | os.PathLike):
    self.root = os.path.abspath(os.fspath(root))

  def __repr__(self) -> str:
    return f"RunDir({self.root!r})"

  def path(self, *parts: str) -> str:
    return os.path.join(self.root, *parts)

  config = _Entry("config.json")
  tokenizer = _Entry(TOKENIZER_DIR)
  metrics = _Entry("metrics.jsonl")
  tensorboard = _Entry("tensorboard")
  checkpoints = _Entry("checkpoints")
  base = _Entry("base")
  unreadable_checkpoints = _Entry("checkpoints_unreadable")
  lock = _Entry(".lock")
  summary = _Entry("run_summary.json")
  sweep_log = _Entry("sweep.log")

  def hf_export(self, name: str = HF_EXPORT_DIR) -> str:
    return self.path(name)

  def eval_dir(self, name: str, model: str) -> str:
    return self.path("eval", name, model)

  def eval_results(self, name: str, model: str) -> str:
    return os.path.join(self.eval_dir(name, model), "results.json")

  def evaluations(self) -> list[Evaluation]:
    """The evaluations that wrote results, by name, then step."""
    root = self.path("eval")
    found = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
      models = os.listdir(os.path.join(root, name)) if os.path.isdir(os.path.join(root, name)) else []
      found += [Evaluation.parse(name, m) for m in models if os.path.isfile(self.eval_results(name, m))]
    return sorted(found, key=lambda e: (e.name, e.step if e.step is not None else -1, e.limit))

  def exists(self) -> bool:
    """Whether the trainer has written anything here."""
    return any(os.path.exists(p) for p in (self.config, self.metrics, self.summary, self.checkpoints))

  def read_config(self) -> dict[str, Any] | None:
    """The run's stored config (a JSON dict), or None before the trainer wrote it."""
    return files.read_json_if_exists(self.config, error=RunDirError)

  def read_summary(self) -> dict[str, Any] | None:
    return files.read_json_if_exists(self.summary, error=RunDirError)

  def write_summary(self, summary: dict[str, Any]) -> None:
    files.write_json_atomic(self.summary, summary)

  def status(self) -> str:
    """One of STATUSES."""
    summary = self.read_summary()
    if summary is None:
      return INTERRUPTED if self.exists() else NEW
    status = summary.get("status")
    if status not in STATUSES:
      raise RunDirError(f"{self.summary}: status {status!r} is not one of {STATUSES}.")
    return status

  def data_settings(self) -> tuple[str | None, str | None]:
    """(tokenizer directory, chat template) the run trained with: its own tokenizer copy if present."""
    data = (self.read_config() or {}).get("data", {})
    tokenizer = self.tokenizer if os.path.isdir(self.tokenizer) else (data.get("tokenizer") or None)
    return tokenizer, data.get("chat_template") or None

  @classmethod
  def containing(cls, path: str | os.PathLike) -> RunDir | None:
    """The run that `path` belongs to: W itself, W/checkpoints, W/checkpoints/<step> or W/hf_export."""
    candidate = os.path.abspath(os.fspath(path))
    for _ in range(3):
      if os.path.isfile(os.path.join(candidate, "config.json")) and (
        os.path.isdir(os.path.join(candidate, "checkpoints"))
        or os.path.isfile(os.path.join(candidate, "run_summary.json"))
      ):
        return cls(candidate)
      candidate = os.path.dirname(candidate)
    return None


class RunLockedError(RunDirError):
  """Another trainer holds the run directory."""


class RunLock:
  """One writer per run directory: `W/.lock` holds the owner's pid, host and start time.

  Guarantee: while one trainer holds it, a second one on the same run stops before it reads,
  writes or deletes anything there. The lock is released on exit (also on errors and signals); one
  left by a process that no longer runs on this host (kill -9, a crash) is broken with a note.
  A lock from another host cannot be checked from here: the error says whose it is and how to
  remove it. Only the process that takes it (process 0 on a slice) touches the file.
  """

  def __init__(self, run_dir: RunDir):
    self.path = run_dir.lock
    self.held = False

  def acquire(self, say=print) -> None:
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        owner = self._owner()
        if owner is None or not self._alive(owner):
          say(f"note: removed the stale lock {self.path} of {self._describe(owner)}, which is no longer running.")
          _remove(self.path)
          continue
        raise RunLockedError(
          f"{os.path.dirname(self.path)} is in use by {self._describe(owner)}: one trainer per workdir. Wait for "
          f"it to finish or stop it; if it is gone (another host crashed), delete {self.path}."
        ) from None
      with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(
          {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
          },
          handle,
        )
      self.held = True
      return
    raise RunLockedError(f"{self.path}: could not take the lock (another trainer is starting); try again.")

  def release(self) -> None:
    if self.held:
      _remove(self.path)
      self.held = False

  def _owner(self) -> dict[str, Any] | None:
    try:
      with open(self.path, encoding="utf-8") as handle:
        owner = json.load(handle)
    except (OSError, ValueError):
      return None  # unreadable or half-written: its writer died while writing it
    return owner if isinstance(owner, dict) else None

  @staticmethod
  def _alive(owner: dict[str, Any]) -> bool:
    if owner.get("host") != socket.gethostname():
      return True  # cannot be checked from here
    try:
      os.kill(int(owner.get("pid", -1)), 0)
    except ProcessLookupError:
      return False
    except (PermissionError, ValueError, TypeError):
      return True
    return True

  @staticmethod
  def _describe(owner: dict[str, Any] | None) -> str:
    if not owner:
      return "an unknown process (unreadable lock file)"
    return f"process {owner.get('pid')} on {owner.get('host')} (since {owner.get('started')})"


def _remove(path: str) -> None:
  try:
    os.remove(path)
  except FileNotFoundError:
    pass
