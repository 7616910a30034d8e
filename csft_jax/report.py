"""Summarizes the runs of a sweep workdir: summary.csv, summary.md and PNG plots.

  python -m csft_jax.report --workdir=W

A run is a directory of W with trainer outputs (`metrics.jsonl`, `run_summary.json`) or a point
of `W/sweep.json` (listed even before it starts); runs come in sweep order, then the others by
name. One row per run:

  run, <one column per swept override>, status, steps, final_train_loss, eval_loss,
  eval_loss/<source>..., cmb_micro, cmb_macro, cmb/<exam_type>...,
  meds/<category>/<metric>...

Losses are the last logged values (eval: the last evaluation). CMB accuracies come from
`eval/cmb/results.json` and are shown in percent (micro: all items; macro: mean of exam types);
MedS-Bench metrics (already in percent) from `eval/meds_bench/results.json`, per category.
Metric columns nobody has are left out. The CSV holds full-precision numbers, the markdown
rounds them. Plots: `loss_curves.png` (train and eval loss vs step, a line per run) and
`eval_loss_per_source.png` (final eval loss per source, a bar per run).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

from absl import app, flags

from csft_jax.eval.reporting import markdown_table, write_csv_atomic, write_text_atomic

TRAINER_OUTPUTS = ("metrics.jsonl", "run_summary.json", "config.json")


class ReportError(ValueError):
  """A run directory whose files cannot be read as the trainer/evaluator write them."""


@dataclasses.dataclass
class RunRecord:
  """What the report knows about one run."""
  name: str
  overrides: dict[str, Any]
  status: str  # run_summary status, "incomplete" (outputs but no summary) or "not started"
  steps: int | None
  final_train_loss: float | None
  train_curve: list[tuple[int, float]]
  eval_curve: list[tuple[int, float]]
  eval_loss_per_source: dict[str, float]
  cmb: dict[str, Any] | None
  meds: dict[str, Any] | None


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


def _read_json(path: str) -> dict[str, Any] | None:
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ReportError(f"{path}: not valid JSON ({e}); rerun the step that writes it.") from e


def load_run(run_dir: str, name: str, overrides: dict[str, Any]) -> RunRecord:
  """Reads one run directory (any of its files may be missing)."""
  records = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
  summary = _read_json(os.path.join(run_dir, "run_summary.json"))
  train_curve = _curve(records, "loss")
  eval_curve = _curve(records, "eval_loss")
  last_eval = max((r for r in records if "eval_loss" in r), key=lambda r: r["step"], default={})
  if summary is not None:
    status, steps, final_loss = summary["status"], summary["step"], summary["final_loss"]
  else:
    started = any(os.path.exists(os.path.join(run_dir, f)) for f in TRAINER_OUTPUTS)
    status = "incomplete" if started else "not started"
    steps = train_curve[-1][0] if train_curve else None
    final_loss = train_curve[-1][1] if train_curve else None
  return RunRecord(
      name=name, overrides=overrides, status=status, steps=steps, final_train_loss=final_loss,
      train_curve=train_curve, eval_curve=eval_curve,
      eval_loss_per_source={k[len("eval_loss/"):]: float(v) for k, v in last_eval.items()
                            if k.startswith("eval_loss/")},
      cmb=_read_json(os.path.join(run_dir, "eval", "cmb", "results.json")),
      meds=_read_json(os.path.join(run_dir, "eval", "meds_bench", "results.json")))


def find_runs(workdir: str) -> list[RunRecord]:
  """The runs of `workdir`: `sweep.json` points in order, then other run directories by name."""
  points = (_read_json(os.path.join(workdir, "sweep.json")) or {}).get("points", [])
  named = [(p["name"], p.get("overrides", {})) for p in points]
  known = {name for name, _ in named}
  for entry in sorted(os.listdir(workdir)):
    run_dir = os.path.join(workdir, entry)
    if entry not in known and any(os.path.exists(os.path.join(run_dir, f)) for f in TRAINER_OUTPUTS):
      named.append((entry, {}))
  return [load_run(os.path.join(workdir, name), name, overrides) for name, overrides in named]


def _union(keys_per_run: Sequence[Sequence[str]]) -> list[str]:
  seen: dict[str, None] = {}
  for keys in keys_per_run:
    seen.update(dict.fromkeys(keys))
  return list(seen)


def _cmb_cells(cmb: dict[str, Any] | None) -> dict[str, float]:
  if cmb is None:
    return {}
  cells = {"cmb_micro": 100 * cmb["overall"]["micro"], "cmb_macro": 100 * cmb["overall"]["macro"]}
  cells.update({f"cmb/{t}": 100 * acc for t, acc in cmb["accuracy_per_category"].items()})
  return cells


def _meds_cells(meds: dict[str, Any] | None) -> dict[str, float]:
  if meds is None:
    return {}
  return {f"meds/{category}/{metric}": value
          for category, metrics in meds["categories"].items()
          for metric, value in metrics.items() if metric not in ("tasks", "n")}


def _override_text(value: Any) -> str | None:
  """Overrides are shown as given (2.0 stays "2.0"), not rounded like metrics."""
  return None if value is None else str(value)


def summary_rows(runs: Sequence[RunRecord]) -> tuple[list[str], list[list[Any]]]:
  """Header and rows of the summary (None where a run has no value)."""
  override_keys = _union([list(r.overrides) for r in runs])
  sources = sorted(_union([list(r.eval_loss_per_source) for r in runs]))
  cells = [{
      "status": r.status, "steps": r.steps, "final_train_loss": r.final_train_loss,
      "eval_loss": r.eval_curve[-1][1] if r.eval_curve else None,
      **{f"eval_loss/{s}": v for s, v in r.eval_loss_per_source.items()},
      **_cmb_cells(r.cmb), **_meds_cells(r.meds),
  } for r in runs]
  metric_keys = ["status", "steps", "final_train_loss"]
  metric_keys += [k for k in ["eval_loss", *(f"eval_loss/{s}" for s in sources)]
                  if any(c.get(k) is not None for c in cells)]
  metric_keys += [k for k in _union([list(c) for c in cells]) if k.startswith(("cmb", "meds"))]
  header = ["run", *override_keys, *metric_keys]
  rows = [[r.name, *(_override_text(r.overrides.get(k)) for k in override_keys), *(c.get(k) for k in metric_keys)]
          for r, c in zip(runs, cells)]
  return header, rows


def _markdown_cell(column: str, value: Any) -> str:
  if value is None:
    return ""
  if isinstance(value, float) and not isinstance(value, bool):
    if math.isnan(value):
      return "nan"
    return f"{value:.2f}" if column.startswith(("cmb", "meds")) else f"{value:.4f}"
  return str(value)


def markdown_summary(workdir: str, header: Sequence[str], rows: Sequence[Sequence[Any]],
                     plots: Sequence[str]) -> str:
  """`summary.md`: a short legend, the table, and the plots."""
  table = markdown_table(header, [[_markdown_cell(h, v) for h, v in zip(header, row)] for row in rows])
  lines = [f"# Sweep summary: {os.path.basename(os.path.abspath(workdir))}", "",
           f"{len(rows)} runs. final_train_loss: last logged train loss; eval_loss: last evaluation over the "
           "run's own held-out sources, eval_loss/<source> per source (same held-out items in every run). "
           "CMB and MedS-Bench columns in percent.", "", table]
  lines += [f"![{os.path.splitext(p)[0]}]({p})\n" for p in plots]
  return "\n".join(lines)


def plot_loss_curves(runs: Sequence[RunRecord], path: str) -> None:
  """Train loss and eval loss vs step, one line per run."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, (train_ax, eval_ax) = plt.subplots(1, 2, figsize=(15, 4.5))
  for run in runs:
    if run.train_curve:
      train_ax.plot(*zip(*run.train_curve), label=run.name)
    if run.eval_curve:
      eval_ax.plot(*zip(*run.eval_curve), marker="o", label=run.name)
  for ax, title in ((train_ax, "train loss"), (eval_ax, "eval loss (the run's held-out sources)")):
    ax.set(title=title, xlabel="step", ylabel="loss")
    ax.grid(alpha=0.3)
  eval_ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1))
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_eval_loss_per_source(runs: Sequence[RunRecord], path: str) -> None:
  """Final eval loss per source, one bar per run (runs are named by their mixing scheme)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel

  sources = sorted(_union([list(r.eval_loss_per_source) for r in runs]))
  with_eval = [r for r in runs if r.eval_loss_per_source]
  width = 0.8 / len(with_eval)
  fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(sources)) + 4, 4.5))
  for i, run in enumerate(with_eval):
    xs = [j + (i - (len(with_eval) - 1) / 2) * width for j, s in enumerate(sources) if s in run.eval_loss_per_source]
    ys = [run.eval_loss_per_source[s] for s in sources if s in run.eval_loss_per_source]
    ax.bar(xs, ys, width=width, label=run.name)
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
    raise ReportError(f"{workdir} has no sweep.json and no run directories (with {TRAINER_OUTPUTS}).")
  header, rows = summary_rows(runs)
  plots = []
  if any(r.train_curve or r.eval_curve for r in runs):
    plot_loss_curves(runs, os.path.join(workdir, "loss_curves.png"))
    plots.append("loss_curves.png")
  if any(r.eval_loss_per_source for r in runs):
    plot_eval_loss_per_source(runs, os.path.join(workdir, "eval_loss_per_source.png"))
    plots.append("eval_loss_per_source.png")
  csv_rows = [["" if v is None else v for v in row] for row in rows]
  written = [str(write_csv_atomic(os.path.join(workdir, "summary.csv"), header, csv_rows)),
             str(write_text_atomic(os.path.join(workdir, "summary.md"), markdown_summary(workdir, header, rows, plots)))]
  return written + [os.path.join(workdir, p) for p in plots]


def define_flags() -> None:
  """Command-line flags, defined only when run as a program (so modules can import each other)."""
  flags.DEFINE_string("workdir", None, "Sweep workdir (parent of the run directories).")


def main(argv: Sequence[str]) -> None:
  del argv
  if not flags.FLAGS.workdir:
    raise app.UsageError("--workdir is required.")
  try:
    written = write_report(flags.FLAGS.workdir)
  except ReportError as e:
    sys.exit(f"error: {e}")
  with open(written[1], encoding="utf-8") as f:
    print(f.read())
  print("wrote " + ", ".join(written))


if __name__ == "__main__":
  define_flags()
  app.run(main)
