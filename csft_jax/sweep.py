r"""Config sweeps in the big_vision style: one experiment file, one run directory per point.

  python -m csft_jax.sweep --sweep=experiments/mixture_ablation_tiny.py --workdir=W [--dry_run]
  python -m csft_jax.sweep --sweep=experiments/mixture_ablation.py --workdir=/mnt/shared/W \
      --launcher=tpu_pod --tpu_name=my-v5p-64 --zone=us-east5-a [--repo_dir=~/csft_jax]

An experiment file is plain Python with two functions:

  def get_experiment() -> ml_collections.ConfigDict:
    exp = ml_collections.ConfigDict()
    exp.config = "configs/mixture_tiny.py"  # trainer config file, relative to the current directory
    exp.evals = ("configs/eval/cmb.py",)    # optional: evaluator configs run after training
    return exp                              # optional: train_command, eval_command (below)

  def get_sweep() -> list[dict]:            # one override dict per run
    return product([sweep("arg.sources", ["collection"]),
                    sweep("data.mixing", ["proportional", "uniform"])])

An override key is a config field (`data.mixing` -> `--config.data.mixing=...`), `arg.<k>`
(a part `k=v` of the config arg: `--config=configs/mixture_tiny.py:sources=collection`), or
`config` (another config file, e.g. one per model size). Settings shared by every run belong
in the config file; the sweep holds only what varies, and a run's name is derived from its
overrides alone (`run_name`), so names stay stable when points are added or removed.

Local launcher: runs the points one after another from the current directory, each in `W/<name>/`
(a `csft_jax.workdir.RunDir`) with its output also in `W/<name>/sweep.log`; a point whose
`run_summary.json` says "finished" and whose eval results exist is skipped, an interrupted one is
resumed (the trainer restarts from its latest checkpoint), a finished one missing evals gets only
its evals. A failing point does not stop the
sweep; the exit status is 1 unless every point finished. `W/sweep.json` records the points,
names, commands and statuses, and `python -m csft_jax.report --workdir=W` summarizes them.

TPU pod launcher (`--launcher=tpu_pod`) prints, for each point, one command per step such as

  gcloud compute tpus tpu-vm ssh my-v5p-64 --zone=us-east5-a --worker=all \
      --command='cd ~/csft_jax && python -m csft_jax.train --config=... --workdir=/mnt/shared/W/<name> --distributed'

Every host of a multi-host TPU VM runs the same command (`--worker=all`); `--distributed` makes
the trainer call `jax.distributed.initialize()`, which reads the topology from the TPU
environment. The workdir must be a directory every host sees at the same path (NFS/Filestore, or a bucket
mounted with gcsfuse): the trainer and evaluator write it with ordinary file I/O. Nothing is run and no
statuses are checked; rerunning a printed command resumes or no-ops, as locally.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from absl import app, flags

from csft_jax import configuration
from csft_jax import workdir as workdir_lib
from csft_jax.console import run_cli
from csft_jax.files import read_json_if_exists, write_json_atomic
from csft_jax.workdir import RunDir

Overrides = dict[str, Any]

DEFAULT_TRAIN_COMMAND = "python -m csft_jax.train"
DEFAULT_EVAL_COMMAND = "python -m csft_jax.evaluate"
EXPERIMENT_FIELDS = ("config", "evals", "train_command", "eval_command")
MAX_NAME_LENGTH = 100
_KEY = re.compile(r"^(config|[A-Za-z_]\w*(\.[A-Za-z_]\w*)*)$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")


class SweepError(ValueError):
  """An experiment file, sweep point or workdir that cannot be run as asked."""


# Expansion: big_vision's `hyper.sweep/product/chain`, as plain functions over override dicts.


def sweep(key: str, values: Sequence[Any]) -> list[Overrides]:
  """One axis: `[{key: v} for v in values]`."""
  return [{key: value} for value in values]


def product(axes: Sequence[Sequence[Overrides]]) -> list[Overrides]:
  """Cartesian product of axes (each a list of override dicts); later axes vary fastest."""
  points = []
  for combo in itertools.product(*axes):
    point: Overrides = {}
    for part in combo:
      clash = set(point) & set(part)
      if clash:
        raise SweepError(f"product(): axes both set {sorted(clash)}; each key belongs to one axis.")
      point.update(part)
    points.append(point)
  return points


def chain(*axes: Sequence[Overrides]) -> list[Overrides]:
  """Concatenation of lists of points (e.g. a single-source arm, then a mixing product)."""
  return [dict(point) for axis in axes for point in axis]


# Naming.


def _name_value(value: Any) -> str:
  if isinstance(value, bool):
    return str(value).lower()
  if isinstance(value, float):
    text = repr(value)  # shortest text that round-trips: 2.0 -> "2", 2e-05 -> "2e-05"
    return text[:-2] if text.endswith(".0") else text
  if isinstance(value, (tuple, list)):
    return "x".join(_name_value(v) for v in value)
  return str(value)


def _name_key(key: str, keys: Sequence[str]) -> str:
  short = key.rsplit(".", 1)[-1]
  return key if sum(k.rsplit(".", 1)[-1] == short for k in keys) > 1 else short


def run_name(overrides: Mapping[str, Any]) -> str:
  """A filesystem-safe run name that is a pure function of `overrides`.

  `{"data.mixing": "temperature", "data.temperature": 2.0}` -> `mixing-temperature_temperature-2`:
  the last component of each key (the full key if two would clash), `-`, the value; `_` between
  pairs, in the order given; a `config` override shows as its file stem alone. Characters outside
  `[A-Za-z0-9._+-]` are dropped, and then, or when longer than MAX_NAME_LENGTH, a hash of the
  overrides is appended so that distinct overrides keep distinct names.
  """
  if not overrides:
    return "base"
  parts = []
  for key, value in overrides.items():
    if key == "config":
      parts.append(os.path.splitext(os.path.basename(str(value).split(":", 1)[0]))[0])
    else:
      parts.append(f"{_name_key(key, list(overrides))}-{_name_value(value)}")
  readable = "_".join(parts)
  safe = _UNSAFE.sub("", readable)
  if safe == readable and len(safe) <= MAX_NAME_LENGTH:
    return safe
  digest = hashlib.sha1(json.dumps(overrides, sort_keys=True, default=str).encode()).hexdigest()[:8]
  return f"{safe[: MAX_NAME_LENGTH - 9]}-{digest}"


# The experiment file.


@dataclasses.dataclass(frozen=True)
class Experiment:
  """What `get_experiment()` and `get_sweep()` of an experiment file say."""

  path: str
  config: str
  evals: tuple[str, ...]
  train_command: tuple[str, ...]
  eval_command: tuple[str, ...]
  points: tuple[Overrides, ...]


def _load_module(path: str, what: str):
  if not os.path.isfile(path):
    raise SweepError(f"{what} file {os.path.abspath(path)} does not exist.")
  spec = importlib.util.spec_from_file_location(f"_csft_{what}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _check_point(point: Any, index: int, where: str) -> None:
  if not isinstance(point, dict):
    raise SweepError(f"{where}: get_sweep() point {index} is {point!r}; expected a dict of overrides.")
  for key, value in point.items():
    if not isinstance(key, str) or not _KEY.match(key):
      raise SweepError(f"{where}: point {index} key {key!r} is not `config`, `arg.<name>` or a dotted config field.")
    if not isinstance(value, (str, int, float, bool, tuple, list)):
      raise SweepError(f"{where}: point {index} sets {key}={value!r}; values must be str, int, float, bool or tuple.")
    if key.startswith("arg.") and re.search(r"[,=:]", str(value)):
      raise SweepError(
        f"{where}: point {index} sets {key}={value!r}; config arg values cannot contain ',', '=' or ':'."
      )


def load_experiment(path: str) -> Experiment:
  """Loads an experiment file; every error names the file and what to change."""
  module = _load_module(path, "experiment")
  for function in ("get_experiment", "get_sweep"):
    if not callable(getattr(module, function, None)):
      raise SweepError(f"{path}: defines no {function}(); see the docstring of csft_jax/sweep.py.")
  exp = module.get_experiment()
  unknown = sorted(set(exp.keys()) - set(EXPERIMENT_FIELDS))
  if unknown:
    raise SweepError(f"{path}: get_experiment() has unknown fields {unknown}; the fields are {EXPERIMENT_FIELDS}.")
  if not exp.get("config"):
    raise SweepError(f"{path}: get_experiment() sets no `config` (the trainer config file).")
  points = module.get_sweep()
  if not isinstance(points, list) or not points:
    raise SweepError(f"{path}: get_sweep() returned {points!r}; expected a non-empty list of override dicts.")
  for i, point in enumerate(points):
    _check_point(point, i, path)
  names: dict[str, int] = {}
  for i, point in enumerate(points):
    name = run_name(point)
    if name in names:
      raise SweepError(
        f"{path}: points {names[name]} and {i} are both named {name!r} "
        f"({points[names[name]]} vs {point}); remove the duplicate."
      )
    names[name] = i
  return Experiment(
    path=path,
    config=exp.config,
    evals=tuple(exp.get("evals", ())),
    train_command=tuple(shlex.split(exp.get("train_command", DEFAULT_TRAIN_COMMAND))),
    eval_command=tuple(shlex.split(exp.get("eval_command", DEFAULT_EVAL_COMMAND))),
    points=tuple(points),
  )


# Runs: commands and status.


@dataclasses.dataclass(frozen=True)
class Run:
  """One sweep point: its name, overrides, directory and commands (argv lists)."""

  name: str
  overrides: Overrides
  config: str  # file[:arg] as passed to --config
  run_dir: str
  train: tuple[str, ...]
  evals: tuple[tuple[str, ...], ...]
  eval_names: tuple[str, ...]  # the result name of each eval, same order (`W/eval/<name>/step_<N>/`)

  def eval_results(self, name: str) -> str:
    """Where the eval `name` of the run's final step writes results.json (once the run finished)."""
    run_dir = RunDir(self.run_dir)
    return run_dir.eval_results(name, workdir_lib.model_tag((run_dir.read_summary() or {}).get("step", "final")))


def _join(workdir: str, name: str) -> str:
  return f"{workdir.rstrip('/')}/{name}" if "://" in workdir else os.path.join(workdir, name)


def config_with_arg(base: str, overrides: Mapping[str, Any]) -> str:
  """`config` file[:arg] of a point: its `config` override (or `base`) plus its `arg.*` parts."""
  config = str(overrides.get("config", base))
  parts = [f"{k[len('arg.') :]}={v}" for k, v in overrides.items() if k.startswith("arg.")]
  if not parts:
    return config
  return f"{config},{','.join(parts)}" if ":" in config else f"{config}:{','.join(parts)}"


def config_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
  """The overrides that are config fields (not `config` or `arg.*`)."""
  return {k: v for k, v in overrides.items() if k != "config" and not k.startswith("arg.")}


def _flag_value(value: Any) -> str:
  return str(tuple(value)) if isinstance(value, list) else str(value)


def plan_run(experiment: Experiment, overrides: Overrides, workdir: str) -> Run:
  """The run of one point: train command, then one command per eval config."""
  name = run_name(overrides)
  run_dir = _join(workdir, name)
  config = config_with_arg(experiment.config, overrides)
  train = (
    *experiment.train_command,
    f"--config={config}",
    f"--workdir={run_dir}",
    *(f"--config.{k}={_flag_value(v)}" for k, v in config_overrides(overrides).items()),
  )
  evals, results = [], []
  for eval_config in experiment.evals:
    evals.append((*experiment.eval_command, f"--config={eval_config}", f"--config.checkpoint={run_dir}"))
    results.append(eval_result_name(eval_config))
  return Run(name, dict(overrides), config, run_dir, train, tuple(evals), tuple(results))


def eval_result_name(eval_config: str) -> str:
  """The name the evaluator writes results under for an eval config file[:arg] (e.g. `cmb-answer`)."""
  from csft_jax.eval import runner

  config = configuration.load(eval_config)
  return runner.get_benchmark(config.benchmark).evaluation_name(config)


def plan_runs(experiment: Experiment, workdir: str) -> list[Run]:
  """All runs of the experiment, in `get_sweep()` order."""
  return [plan_run(experiment, point, workdir) for point in experiment.points]


def _field_exists(config: ml_collections.ConfigDict, key: str) -> bool:
  node = config
  for part in key.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False
    node = node[part]
  return True


def check_overrides(runs: Sequence[Run], *, strict: bool = True) -> None:
  """Builds each distinct config[:arg] and checks that every overridden field exists in it.

  Catches a misspelt field before hours of runs rather than in the last one. With
  `strict=False` (dry runs) a config that cannot be built is reported on stderr and skipped.
  """
  built: dict[str, ml_collections.ConfigDict | None] = {}
  for run in runs:
    if run.config not in built:
      built[run.config] = _build_config(run.config, strict)
    if built[run.config] is None:
      continue
    missing = [k for k in config_overrides(run.overrides) if not _field_exists(built[run.config], k)]
    if missing:
      raise SweepError(
        f"run {run.name}: {run.config} has no field {missing}; "
        f"its top-level fields are {sorted(built[run.config].keys())}."
      )


def _build_config(config: str, strict: bool) -> ml_collections.ConfigDict | None:
  try:
    return configuration.load(config)
  except Exception as e:
    message = f"cannot build config {config} to check the overrides: {e}"
    if strict:
      raise SweepError(message) from e
    print(f"warning: {message}", file=sys.stderr)
    return None


# A point's state: a run status (csft_jax.workdir), or NEEDS_EVAL (trained, evals missing); the
# sweep record adds PENDING (not reached yet) and FAILED (a command failed).
NEEDS_EVAL = "needs_eval"
PENDING = "pending"
FAILED = "failed"


def run_state(run: Run) -> str:
  """`new`, `interrupted`, `diverged`, `needs_eval` or `finished`."""
  status = RunDir(run.run_dir).status()
  if status != workdir_lib.FINISHED:
    return status
  return workdir_lib.FINISHED if all(os.path.isfile(run.eval_results(n)) for n in run.eval_names) else NEEDS_EVAL


# Launchers.


def _command_text(argv: Sequence[str]) -> str:
  return shlex.join(argv)


def tpu_pod_command(argv: Sequence[str], *, tpu_name: str, zone: str, repo_dir: str) -> str:
  """The `gcloud ... tpu-vm ssh --worker=all` line that runs `argv` on every host of a TPU VM."""
  inner = f"cd {repo_dir} && {_command_text(argv)}"  # repo_dir unquoted: `~` expands on the host
  return (
    f"gcloud compute tpus tpu-vm ssh {shlex.quote(tpu_name)} --zone={shlex.quote(zone)} --worker=all "
    f"--command={shlex.quote(inner)}"
  )


def tpu_pod_script(runs: Sequence[Run], *, tpu_name: str, zone: str, repo_dir: str) -> str:
  """All runs as gcloud commands; each gets `--distributed` (multi-host initialization)."""
  lines = []
  for run in runs:
    lines.append(f"# {run.name}")
    lines.append(tpu_pod_command((*run.train, "--distributed"), tpu_name=tpu_name, zone=zone, repo_dir=repo_dir))
    lines += [
      tpu_pod_command((*e, "--distributed"), tpu_name=tpu_name, zone=zone, repo_dir=repo_dir) for e in run.evals
    ]
  return "\n".join(lines) + "\n"


def dry_run_script(runs: Sequence[Run]) -> str:
  """Each run's state and the commands the local launcher would run for it."""
  lines = []
  for run in runs:
    state = run_state(run)
    action = {
      workdir_lib.FINISHED: "skip",
      workdir_lib.DIVERGED: "skip",
      NEEDS_EVAL: "evals only",
      workdir_lib.INTERRUPTED: "resume",
      workdir_lib.NEW: "train",
    }[state]
    lines.append(f"# {run.name}: {state} -> {action}")
    if state in (workdir_lib.NEW, workdir_lib.INTERRUPTED):
      lines.append(_command_text(run.train))
    if state in (workdir_lib.NEW, workdir_lib.INTERRUPTED, NEEDS_EVAL):
      lines += [_command_text(e) for e in run.evals]
  return "\n".join(lines) + "\n"


def _tee(lines, log) -> None:
  for line in lines:
    sys.stdout.write(line)
    log.write(line)


def _execute(argv: Sequence[str], log_path: str) -> int:
  """Runs `argv` (from the current directory), teeing its output to the console and `log_path`."""
  argv = [sys.executable if i == 0 and a == "python" else a for i, a in enumerate(argv)]
  with open(log_path, "a", encoding="utf-8") as log:
    log.write(f"\n[{time.strftime('%Y-%m-%d %H:%M:%S')}] $ {_command_text(argv)}\n")
    log.flush()
    process = subprocess.Popen(
      argv,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      env={**os.environ, "PYTHONUNBUFFERED": "1"},
      text=True,
      errors="replace",
    )
    try:
      _tee(process.stdout, log)
    except KeyboardInterrupt:
      # The child got the same SIGINT and is saving a checkpoint: keep reading its output so that
      # it never writes into a closed pipe, and let it finish.
      _tee(process.stdout, log)
      process.wait()
      raise
    returncode = process.wait()
    log.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] exit status {returncode}\n")
  return returncode


def execute_run(run: Run) -> tuple[str, str]:
  """Trains (or resumes) and evaluates one run as needed; returns (status, error message or "")."""
  state = run_state(run)
  if state in (workdir_lib.FINISHED, workdir_lib.DIVERGED):
    return state, ""
  run_dir = RunDir(run.run_dir)
  os.makedirs(run_dir.root, exist_ok=True)
  log_path = run_dir.sweep_log
  if state != NEEDS_EVAL:
    returncode = _execute(run.train, log_path)
    summary = run_dir.read_summary() or {}
    if summary.get("status") == workdir_lib.DIVERGED:
      return workdir_lib.DIVERGED, f"training diverged at step {summary.get('step')}"
    if summary.get("status") != workdir_lib.FINISHED:
      return FAILED, (
        f"trainer exited with status {returncode} and run_summary.json status "
        f"{summary.get('status')!r}; see {log_path}, then rerun the sweep to resume"
      )
  for argv, name in zip(run.evals, run.eval_names):
    results = run.eval_results(name)
    if os.path.isfile(results):
      continue
    returncode = _execute(argv, log_path)
    if not os.path.isfile(results):
      return FAILED, f"evaluator exited with status {returncode} without writing {results}; see {log_path}"
  return workdir_lib.FINISHED, ""


def _sweep_record(
  experiment: Experiment, workdir: str, runs: Sequence[Run], statuses: Mapping[str, tuple[str, str]]
) -> dict[str, Any]:
  return {
    "experiment": os.path.abspath(experiment.path),
    "workdir": workdir,
    "points": [
      {
        "name": r.name,
        "overrides": r.overrides,
        "run_dir": r.run_dir,
        "commands": [_command_text(r.train), *(_command_text(e) for e in r.evals)],
        "status": statuses[r.name][0],
        "error": statuses[r.name][1],
      }
      for r in runs
    ],
  }


def run_sweep(experiment: Experiment, workdir: str) -> int:
  """Runs every point in order (see the module doc); returns 0 iff all finished."""
  workdir = os.path.abspath(workdir)
  record_path = os.path.join(workdir, "sweep.json")
  if os.path.isfile(record_path):
    previous = read_json_if_exists(record_path, error=SweepError).get("experiment")
    if previous != os.path.abspath(experiment.path):
      raise SweepError(f"{workdir} holds a sweep of {previous}, not {experiment.path}; use another --workdir.")
  runs = plan_runs(experiment, workdir)
  check_overrides(runs)
  statuses = {r.name: (PENDING, "") for r in runs}
  write_json_atomic(record_path, _sweep_record(experiment, workdir, runs, statuses))
  for i, run in enumerate(runs):
    print(f"[sweep] {i + 1}/{len(runs)} {run.name}: {run_state(run)}", flush=True)
    try:
      statuses[run.name] = execute_run(run)
    except KeyboardInterrupt:
      statuses[run.name] = (workdir_lib.INTERRUPTED, "stopped by the user; rerun the sweep to resume")
      write_json_atomic(record_path, _sweep_record(experiment, workdir, runs, statuses))
      raise
    write_json_atomic(record_path, _sweep_record(experiment, workdir, runs, statuses))
  print(f"[sweep] done: {record_path}")
  for run in runs:
    status, error = statuses[run.name]
    print(f"  {run.name}: {status}{f' ({error})' if error else ''}")
  return 0 if all(s == workdir_lib.FINISHED for s, _ in statuses.values()) else 1


def define_flags() -> None:
  """The command's flags; defined only when run as a program, since experiment files import this module."""
  flags.DEFINE_string("sweep", None, "Experiment file (get_experiment + get_sweep).")
  flags.DEFINE_string("workdir", None, "Parent of the run directories.")
  flags.DEFINE_bool("dry_run", False, "Print each run's state and commands; run nothing.")
  flags.DEFINE_enum(
    "launcher", "local", ["local", "tpu_pod"], "local: run here, in order. tpu_pod: print gcloud commands for a TPU VM."
  )
  flags.DEFINE_string("tpu_name", None, "TPU VM name (--launcher=tpu_pod).")
  flags.DEFINE_string("zone", None, "TPU VM zone (--launcher=tpu_pod).")
  flags.DEFINE_string("repo_dir", "~/csft_jax", "Repository checkout on the TPU hosts (--launcher=tpu_pod).")


def main(argv: Sequence[str]) -> int:
  del argv
  FLAGS = flags.FLAGS
  if not FLAGS.sweep or not FLAGS.workdir:
    raise app.UsageError("--sweep and --workdir are required.")
  experiment = load_experiment(FLAGS.sweep)
  if FLAGS.launcher == "tpu_pod":
    if not FLAGS.tpu_name or not FLAGS.zone:
      raise app.UsageError("--launcher=tpu_pod needs --tpu_name and --zone.")
    print(
      tpu_pod_script(
        plan_runs(experiment, FLAGS.workdir), tpu_name=FLAGS.tpu_name, zone=FLAGS.zone, repo_dir=FLAGS.repo_dir
      ),
      end="",
    )
    return 0
  if "://" in FLAGS.workdir:
    raise SweepError(f"--workdir={FLAGS.workdir} is remote; the local launcher needs a local directory.")
  runs = plan_runs(experiment, os.path.abspath(FLAGS.workdir))
  if FLAGS.dry_run:
    check_overrides(runs, strict=False)
    print(dry_run_script(runs), end="")
    return 0
  return run_sweep(experiment, FLAGS.workdir)


if __name__ == "__main__":
  define_flags()
  run_cli(main)
