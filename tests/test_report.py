"""Report: aggregation of synthetic run directories into summary.csv / summary.md / PNGs."""

import csv
import json
import os

import pytest

from csft_jax import report
from csft_jax.eval import cmb, meds_bench

ANSWER_KEY = [
  {
    "id": 1,
    "exam_type": "医师考试",
    "exam_class": "执业医师",
    "exam_subject": "临床",
    "question_type": "单项选择题",
    "answer": "A",
  },
  {
    "id": 2,
    "exam_type": "医师考试",
    "exam_class": "规培结业",
    "exam_subject": "内科",
    "question_type": "单项选择题",
    "answer": "B",
  },
  {
    "id": 3,
    "exam_type": "护理考试",
    "exam_class": "护士",
    "exam_subject": "护理",
    "question_type": "单项选择题",
    "answer": "C",
  },
  {
    "id": 4,
    "exam_type": "护理考试",
    "exam_class": "护士",
    "exam_subject": "护理",
    "question_type": "单项选择题",
    "answer": "D",
  },
]


def _write(path, text: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)


def _jsonl(*records) -> str:
  return "".join(json.dumps(r) + "\n" for r in records)


@pytest.fixture
def workdir(tmp_path):
  """A sweep workdir: a finished run with CMB + MedS-Bench results, an interrupted one, a pending
  point, and a run directory the sweep does not know."""
  w = tmp_path / "mix"
  points = [
    {"name": "sources-cmb_only", "overrides": {"arg.sources": "cmb_only"}},
    {"name": "mixing-uniform", "overrides": {"data.mixing": "uniform"}},
    {"name": "mixing-temperature_temperature-2", "overrides": {"data.mixing": "temperature", "data.temperature": 2.0}},
  ]
  _write(w / "sweep.json", json.dumps({"experiment": "x.py", "points": points}))
  run = w / "sources-cmb_only"
  _write(
    run / "metrics.jsonl",
    _jsonl(
      {"step": 10, "loss": 5.0, "loss/cmb": 5.0, "lr": 1e-3},
      {"step": 20, "loss": 4.0},
      {"step": 20, "eval_loss": 4.5, "eval_loss/cmb": 4.25},
      {"step": 20, "loss": 3.5},  # step 20 replayed after a resume: the later value wins
      {"step": 30, "loss": 3.0},
      {"step": 30, "eval_loss": 3.75, "eval_loss/cmb": 3.5},
    )
    + '{"step": 40, "lo',
  )  # cut off by a kill
  _write(run / "run_summary.json", json.dumps({"status": "finished", "step": 30, "num_steps": 30, "final_loss": 2.875}))
  submission = [
    {"id": 1, "model_answer": "A"},
    {"id": 2, "model_answer": "C"},
    {"id": 3, "model_answer": "C"},
    {"id": 4, "model_answer": "D"},
  ]
  _write(
    run / "eval" / "cmb-answer" / "step_30" / "results.json", json.dumps(cmb.score_submission(submission, ANSWER_KEY))
  )
  # An earlier step's evaluation and a partial one (config.limit) of the last step: not in the columns.
  wrong = [{"id": i, "model_answer": "G"} for i in range(1, 5)]
  _write(run / "eval" / "cmb-answer" / "step_20" / "results.json", json.dumps(cmb.score_submission(wrong, ANSWER_KEY)))
  _write(
    run / "eval" / "cmb-answer" / "step_30-limit_2" / "results.json",
    json.dumps(cmb.score_submission(wrong[:2], ANSWER_KEY[:2])),
  )
  rows = [
    {"task_id": "task901", "input": "q1", "GT": "A", "output": "A"},
    {"task_id": "task901", "input": "q2", "GT": "B", "output": "C"},
  ]
  meds = meds_bench.score_rows(rows, task_categories={"task901": meds_bench.MCQA})
  _write(run / "eval" / "meds_bench" / "step_30" / "results.json", json.dumps(meds))
  judgments = {
    "judge": "gpt-4 @ http://127.0.0.1:1/v1",
    "n_judged": 4,
    "n_unparsed": 1,
    "fluency": 4.5,
    "relevance": 4.0,
    "completeness": 3.5,
    "proficiency": 3.0,
    "avg": 3.75,
  }
  _write(
    run / "eval" / "cmb_clin" / "step_30" / "results.json",
    json.dumps({"summary": {"rougeL": 12.5, "bleu1": 25.0, "judgments": judgments}, "records": []}),
  )

  run = w / "mixing-uniform"
  _write(
    run / "metrics.jsonl",
    _jsonl(
      {"step": 10, "loss": 6.0},
      {"step": 10, "eval_loss": 5.5, "eval_loss/cmb": 5.25, "eval_loss/dialogue": 6.0},
    ),
  )
  _write(
    run / "run_summary.json", json.dumps({"status": "interrupted", "step": 10, "num_steps": 30, "final_loss": 6.0})
  )
  _write(w / "manual" / "metrics.jsonl", _jsonl({"step": 5, "loss": 7.25}))
  _write(w / "not_a_run" / "notes.txt", "unrelated")
  return str(w)


def test_summary_csv_and_markdown_cell_by_cell(workdir):
  written = report.write_report(workdir)
  assert [os.path.basename(p) for p in written] == [
    "summary.csv",
    "summary.md",
    "loss_curves.png",
    "eval_loss_per_source.png",
  ]
  with open(os.path.join(workdir, "summary.csv"), encoding="utf-8") as f:
    table = list(csv.reader(f))
  assert table[0] == [
    "run",
    "arg.sources",
    "data.mixing",
    "data.temperature",
    "status",
    "steps",
    "final_train_loss",
    "eval_loss",
    "eval_loss/cmb",
    "eval_loss/dialogue",
    "cmb-answer/step",
    "cmb-answer/micro",
    "cmb-answer/macro",
    "cmb-answer/医师考试",
    "cmb-answer/护理考试",
    "cmb_clin/step",
    "cmb_clin/rougeL",
    "cmb_clin/bleu1",
    "cmb_clin/judge/fluency",
    "cmb_clin/judge/relevance",
    "cmb_clin/judge/completeness",
    "cmb_clin/judge/proficiency",
    "cmb_clin/judge/avg",
    "cmb_clin/judge/n_unparsed",
    "meds_bench/step",
    f"meds_bench/{meds_bench.MCQA}/accuracy",
  ]
  assert table[1] == [
    "sources-cmb_only",
    "cmb_only",
    "",
    "",
    "finished",
    "30",
    "2.875",
    "3.75",
    "3.5",
    "",
    "30",
    "75.0",
    "75.0",
    "50.0",
    "100.0",
    "30",
    "12.5",
    "25.0",
    "4.5",
    "4.0",
    "3.5",
    "3.0",
    "3.75",
    "1",
    "30",
    "50.0",
  ]
  empty = [""] * 16
  assert table[2] == ["mixing-uniform", "", "uniform", "", "interrupted", "10", "6.0", "5.5", "5.25", "6.0", *empty]
  assert table[3] == ["mixing-temperature_temperature-2", "", "temperature", "2.0", "new", "", "", "", "", "", *empty]
  assert table[4] == ["manual", "", "", "", "interrupted", "5", "7.25", "", "", "", *empty]
  assert len(table) == 5

  with open(os.path.join(workdir, "summary.md"), encoding="utf-8") as f:
    markdown = f.read().splitlines()
  assert markdown[0] == "# Sweep summary: mix"
  rows = [line for line in markdown if line.startswith("| ")]
  assert rows[1] == (
    "| sources-cmb_only | cmb_only |  |  | finished | 30 | 2.8750 | 3.7500 | 3.5000 |  | "
    "30 | 75.00 | 75.00 | 50.00 | 100.00 | 30 | 12.50 | 25.00 | 4.50 | 4.00 | 3.50 | 3.00 | 3.75 | "
    "1 | 30 | 50.00 |"
  )
  assert rows[3] == ("| mixing-temperature_temperature-2 |  | temperature | 2.0 | new |  |  |  |  |  |" + "  |" * 16)
  assert (
    "Partial evaluations (config.limit: the first items only), not in the table: "
    "sources-cmb_only: cmb-answer/step_30-limit_2"
  ) in markdown
  assert "![loss_curves](loss_curves.png)" in markdown
  assert "![eval_loss_per_source](eval_loss_per_source.png)" in markdown


def test_plots_are_pngs(workdir):
  for path in report.write_report(workdir)[2:]:
    with open(path, "rb") as f:
      data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_curves_keep_the_last_value_of_a_replayed_step(workdir):
  run = report.load_run(os.path.join(workdir, "sources-cmb_only"), "sources-cmb_only", {})
  assert run.train_curve == [(10, 5.0), (20, 3.5), (30, 3.0)]
  assert run.eval_curve == [(20, 4.5), (30, 3.75)]
  assert run.eval_loss_per_source == {"cmb": 3.5}


def test_errors_point_at_the_bad_line(tmp_path):
  path = tmp_path / "run" / "metrics.jsonl"
  _write(path, '{"step": 1, "loss": 2.0}\nnot json\n{"step": 2, "loss": 1.0}\n')
  with pytest.raises(report.ReportError, match=rf"{path}:2: not a JSON object"):
    report.read_metrics(str(path))
  (tmp_path / "empty").mkdir()
  with pytest.raises(report.ReportError, match="has no sweep.json and no run directories"):
    report.write_report(str(tmp_path / "empty"))
