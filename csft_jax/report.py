"""Summarizes the runs of a sweep workdir: summary.csv, summary.md and PNG plots.

  python -m csft_jax.report --workdir=W

A run is a directory of W with trainer outputs (`metrics.jsonl`, `run_summary.json`) or a point
of `W/sweep.json` (listed even before it starts); runs come in sweep order, then the others by
name. One row per run:

  run, <one column per swept override>, status, steps, final_train_loss, eval_loss,
  eval_loss/<source>..., <evaluation>/<column>...

Losses are the last logged values (eval: the last evaluation). Every evaluation a run holds
(`W/eval/<name>/results.json`, see `csft_jax.workdir`) adds its benchmark's columns in percent,
prefixed with the evaluation's name: `cmb-answer/micro`, `cmb-answer/<exam_type>`,
`meds_bench/<category>/<metric>`, `cmb_clin/rougeL`; the benchmark's own `report_cells` says
which (`csft_jax.eval.runner.Benchmark`). Status is the run's (`csft_jax.workdir.STATUSES`).
Metric columns nobody has are left out. The CSV holds full-precision numbers, the markdown
rounds them. Plots: `loss_curves.png` (train and eval loss vs step, a line per run) and
`eval_loss_per_source.png` (final eval loss per source, a bar per run).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import Any

from absl import app, flags

from csft_jax import files
from csft_jax.console import run_cli
from csft_jax.eval import runner
from csft_jax.eval.reporting import markdown_table
from csft_jax.files import write_csv_atomic, write_text_atomic
from csft_jax.workdir import RunDir, RunDirError

# Not a percent: shown with four decimals in the markdown.
_LOSS_COLUMNS = ("final_train_loss", "eval_loss")


class ReportError(ValueError):
  """A run directory whose files cannot be read as the trainer/evaluator write them."""


@dataclasses.dataclass
class RunRecord:
  """What the report knows about one run."""

  name: str
  overrides: dict[str, Any]
  status: str  # one of csft_jax.workdir.STATUSES
  steps: int | None
  final_train_loss: float | None
  train_curve: list[tuple[int, float]]
  eval_curve: list[tuple[int, float]]
  eval_loss_per_source: dict[str, float]
  evals: dict[str, dict[str, Any]]  # evaluation name -> `step` and the report cells of its newest full evaluation
  partial_evals: list[str]  # `<name>/<model>` of evaluations with config.limit (not in the columns)


def read_metrics(path: str) -> list[dict[str, Any]]:
  """Lines of `metrics.jsonl`; a cut-off last line (the run was killed mid-write) is ignored."""
  if not os.path.isfile(path):
    return []
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  records = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      if number == len(lines):
        break
      raise ReportError(f"{path}:{number}: not a JSON object ({e}); fix or delete the line.") from e
  return records


def _curve(records: Sequence[dict[str, Any]], key: str) -> list[tuple[int, float]]:
  """(step, value) sorted by step; a step logged twice (replayed after a resume) keeps its last value."""
  by_step = {int(r["step"]): float(r[key]) for r in records if key in r and "step" in r}
  return sorted(by_step.items())


def _eval_cells(run_dir: RunDir) -> tuple[dict[str, dict[str, Any]], list[str]]:
  """Per evaluation name, the cells of its newest full evaluation (with its `step`); and the
  partial (`limit`) evaluations, named, which stay out of the columns."""
  cells, partial = {}, []
  for evaluation in run_dir.evaluations():  # sorted by step: a later step replaces an earlier one
    if evaluation.limit:
      partial.append(f"{evaluation.name}/{evaluation.model}")
      continue
    results = files.read_json(run_dir.eval_results(evaluation.name, evaluation.model), error=ReportError)
    try:
      report = runner.benchmark_of_result(evaluation.name).report_cells(results)
    except runner.EvalConfigError:
      continue  # written by a benchmark this installation does not have
    cells[evaluation.name] = {"step": evaluation.step if evaluation.step is not None else evaluation.model, **report}
  return cells, partial


def load_run(run_dir: str, name: str, overrides: dict[str, Any]) -> RunRecord:
  """Reads one run directory (any of its files may be missing)."""
  run = RunDir(run_dir)
  records = read_metrics(run.metrics)
  try:
    summary, status = run.read_summary(), run.status()
  except RunDirError as e:
    raise ReportError(str(e)) from e
  evals, partial = _eval_cells(run)
  train_curve = _curve(records, "loss")
  eval_curve = _curve(records, "eval_loss")
  last_eval = max((r for r in records if "eval_loss" in r), key=lambda r: r["step"], default={})
  if summary is not None:
    steps, final_loss = summary["step"], summary["final_loss"]
  else:
    steps = train_curve[-1][0] if train_curve else None
    final_loss = train_curve[-1][1] if train_curve else None
  return RunRecord(
    name=name,
    overrides=overrides,
    status=status,
    steps=steps,
    final_train_loss=final_loss,
    train_curve=train_curve,
    eval_curve=eval_curve,
    eval_loss_per_source={k[len("eval_loss/") :]: float(v) for k, v in last_eval.items() if k.startswith("eval_loss/")},
    evals=evals,
    partial_evals=partial,
  )


def find_runs(workdir: str) -> list[RunRecord]:
  """The runs of `workdir`: `sweep.json` points in order, then other run directories by name."""
  points = (files.read_json_if_exists(os.path.join(workdir, "sweep.json"), error=ReportError) or {}).get("points", [])
  named = [(p["name"], p.get("overrides", {})) for p in points]
  known = {name for name, _ in named}
  for entry in sorted(os.listdir(workdir)):
    if entry not in known and RunDir(os.path.join(workdir, entry)).exists():
      named.append((entry, {}))
  return [load_run(os.path.join(workdir, name), name, overrides) for name, overrides in named]


def _union(keys_per_run: Sequence[Sequence[str]]) -> list[str]:
  seen: dict[str, None] = {}
  for keys in keys_per_run:
    seen.update(dict.fromkeys(keys))
  return list(seen)


def _override_text(value: Any) -> str | None:
  """Overrides are shown as given (2.0 stays "2.0"), not rounded like metrics."""
  return None if value is None else str(value)


def summary_rows(runs: Sequence[RunRecord]) -> tuple[list[str], list[list[Any]]]:
  """Header and rows of the summary (None where a run has no value)."""
  override_keys = _union([list(r.overrides) for r in runs])
  sources = sorted(_union([list(r.eval_loss_per_source) for r in runs]))
  cells = [
    {
      "status": r.status,
      "steps": r.steps,
      "final_train_loss": r.final_train_loss,
      "eval_loss": r.eval_curve[-1][1] if r.eval_curve else None,
      **{f"eval_loss/{s}": v for s, v in r.eval_loss_per_source.items()},
      **{f"{name}/{column}": value for name, cells in r.evals.items() for column, value in cells.items()},
    }
    for r in runs
  ]
  metric_keys = ["status", "steps", "final_train_loss"]
  metric_keys += [
    k for k in ["eval_loss", *(f"eval_loss/{s}" for s in sources)] if any(c.get(k) is not None for c in cells)
  ]
  eval_columns = [f"{name}/{column}" for r in runs for name, cells in r.evals.items() for column in cells]
  metric_keys += list(dict.fromkeys(eval_columns))
  header = ["run", *override_keys, *metric_keys]
  rows = [
    [r.name, *(_override_text(r.overrides.get(k)) for k in override_keys), *(c.get(k) for k in metric_keys)]
    for r, c in zip(runs, cells)
  ]
  return header, rows


def _markdown_cell(column: str, value: Any) -> str:
  if value is None:
    return ""
  if isinstance(value, float) and not isinstance(value, bool):
    if math.isnan(value):
      return "nan"
    return f"{value:.4f}" if column.startswith(_LOSS_COLUMNS) else f"{value:.2f}"
  return str(value)


def markdown_summary(
  workdir: str,
  header: Sequence[str],
  rows: Sequence[Sequence[Any]],
  plots: Sequence[str],
  runs: Sequence[RunRecord] = (),
) -> str:
  """`summary.md`: a short legend, the table, the partial evaluations of `runs`, and the plots."""
  table = markdown_table(header, [[_markdown_cell(h, v) for h, v in zip(header, row)] for row in rows])
  lines = [
    f"# Sweep summary: {os.path.basename(os.path.abspath(workdir))}",
    "",
    f"{len(rows)} runs. final_train_loss: last logged train loss; eval_loss: last evaluation over the "
    "run's own held-out sources, eval_loss/<source> per source (same held-out items in every run). "
    "Evaluation columns (<evaluation>/<column>) in percent, from the newest full evaluation of each run; "
    "<evaluation>/step is the training step it evaluated.",
    "",
    table,
  ]
  partial = [f"{r.name}: {', '.join(r.partial_evals)}" for r in runs if r.partial_evals]
  if partial:
    lines += ["Partial evaluations (config.limit: the first items only), not in the table: " + "; ".join(partial), ""]
  lines += [f"![{os.path.splitext(p)[0]}]({p})\n" for p in plots]
  return "\n".join(lines)


def plot_loss_curves(runs: Sequence[RunRecord], path: str) -> None:
  """Train loss and eval loss vs step, one line per run."""
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  fig, (train_ax, eval_ax) = plt.subplots(1, 2, figsize=(15, 4.5))
  for index, run in enumerate(runs):
    color = f"C{index % 10}"  # one colour per run in both panels
    if run.train_curve:
      train_ax.plot(*zip(*run.train_curve), color=color, label=run.name)
    if run.eval_curve:
      eval_ax.plot(*zip(*run.eval_curve), color=color, marker="o", label=run.name)
  for ax, title in ((train_ax, "train loss"), (eval_ax, "eval loss (the run's held-out sources)")):
    ax.set(title=title, xlabel="step", ylabel="loss")
    ax.grid(alpha=0.3)
    if ax.get_lines():
      ax.legend(fontsize="small", loc="upper right")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_eval_loss_per_source(runs: Sequence[RunRecord], path: str) -> None:
  """Final eval loss per source, one bar per run (runs are named by their mixing scheme)."""
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  sources = sorted(_union([list(r.eval_loss_per_source) for r in runs]))
  with_eval = [r for r in runs if r.eval_loss_per_source]
  width = 0.8 / len(with_eval)
  fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(sources)) + 4, 4.5))
  for i, run in enumerate(with_eval):
    xs = [j + (i - (len(with_eval) - 1) / 2) * width for j, s in enumerate(sources) if s in run.eval_loss_per_source]
    ys = [run.eval_loss_per_source[s] for s in sources if s in run.eval_loss_per_source]
    ax.bar(xs, ys, width=width, label=run.name, color=f"C{runs.index(run) % 10}")  # as in loss_curves.png
  ax.set_xticks(range(len(sources)), sources, rotation=20, ha="right")
  ax.set(title="eval loss per source (last evaluation)", ylabel="loss")
  ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write_report(workdir: str) -> list[str]:
  """Writes summary.csv, summary.md and the plots into `workdir`; returns the paths written."""
  if not os.path.isdir(workdir):
    raise ReportError(f"--workdir={workdir} is not a directory.")
  runs = find_runs(workdir)
  if not runs:
    raise ReportError(
      f"{workdir} has no sweep.json and no run directories (with a config.json, metrics.jsonl, "
      "run_summary.json or checkpoints/)."
    )
  header, rows = summary_rows(runs)
  plots = []
  if any(r.train_curve or r.eval_curve for r in runs):
    plot_loss_curves(runs, os.path.join(workdir, "loss_curves.png"))
    plots.append("loss_curves.png")
  if any(r.eval_loss_per_source for r in runs):
    plot_eval_loss_per_source(runs, os.path.join(workdir, "eval_loss_per_source.png"))
    plots.append("eval_loss_per_source.png")
  csv_rows = [["" if v is None else v for v in row] for row in rows]
  written = [
    str(write_csv_atomic(os.path.join(workdir, "summary.csv"), header, csv_rows)),
    str(write_text_atomic(os.path.join(workdir, "summary.md"), markdown_summary(workdir, header, rows, plots, runs))),
  ]
  return written + [os.path.join(workdir, p) for p in plots]


def define_flags() -> None:
  """Command-line flags, defined only when run as a program (so modules can import each other)."""
  flags.DEFINE_string("workdir", None, "Sweep workdir (parent of the run directories).")


def main(argv: Sequence[str]) -> None:
  del argv
  if not flags.FLAGS.workdir:
    raise app.UsageError("--workdir is required.")
  written = write_report(flags.FLAGS.workdir)
  with open(written[1], encoding="utf-8") as f:
    print(f.read())
  print("wrote " + ", ".join(written))


if __name__ == "__main__":
  define_flags()
  run_cli(main)
