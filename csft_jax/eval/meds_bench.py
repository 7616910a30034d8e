"""MedS-Bench: task files, the official 3-shot prompt, results CSV, metrics per category, CLI.

Follows MAGIC-AI4Med/MedS-Ins: prompt from `Evaluation/EvalDataset.py` with the
evaluation settings of `Evaluation/eval.py` (3-shot, original definition, greedy,
200 new tokens), metrics from `Metrics/*.py` (see `text_metrics`).

Prompt: the system turn is three solved cases `Input:\\n{x}\\n\\nOutput:\\n{y}\\n`
joined by blank lines, then the task definition and a fixed sentence; the user
turn is `Input:\\n{x}\\nOutput:\\n`. As in the official code, the three cases are
drawn from the task's `Instances` (any of them, the asked one included), not from
`Positive Examples`; our draw is seeded so runs repeat.

CLI:
    python -m csft_jax.eval.meds_bench score --results=R.csv --out=R.json [--task_dir=D]
"""

from __future__ import annotations

import csv
import os
import random
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from csft_jax import files
from csft_jax.eval import reporting, runner, text_metrics

NUM_SHOTS = 3
MAX_NEW_TOKENS = 200
RESULTS_HEADER = ("task_id", "input", "GT", "output")

SHOT_TEMPLATE = "Input:\n{input}\n\nOutput:\n{output}\n"
QUERY_TEMPLATE = "Input:\n{input}\nOutput:\n"
# Spelt as in the prompts of the official published results (the shared
# MMedS-Llama3 CSV); later repository code corrects "ouput".
SHOT_INSTRUCTION_SUFFIX = "Please learn from the few-shot cases to see what content you have to ouput."

# Metric families (the official Metrics/*.py scripts).
MCQA = "mcqa"
TEXT_GENERATION = "text_generation"  # rationale, explanation, summarization, NLI generation
NER = "ner"
TEXT_CLASSIFICATION = "text_classification"
INFORMATION_EXTRACTION = "information_extraction"
DIAGNOSIS = "diagnosis"
TREATMENT_PLANNING = "treatment_planning"
NLI = "nli"
CLINICAL_OUTCOME = "clinical_outcome"
FACT_VERIFICATION = "fact_verification"
FACT_VERIFICATION_GENERATION = "fact_verification_generation"
CATEGORIES = (
    MCQA, TEXT_GENERATION, NER, TEXT_CLASSIFICATION, INFORMATION_EXTRACTION, DIAGNOSIS,
    TREATMENT_PLANNING, NLI, CLINICAL_OUTCOME, FACT_VERIFICATION, FACT_VERIFICATION_GENERATION,
)


def _tasks(*numbers: int) -> list[str]:
  return [f"task{n}" for n in numbers]


# Task ids named in the official metric scripts' defaults. Diagnosis has no ids
# there; such tasks need a task file with `Categories` or an explicit mapping.
OFFICIAL_TASK_CATEGORIES: dict[str, str] = {
    **{t: MCQA for t in _tasks(4, 5, 6, 8, 9, 57, 58, 59, 60, 61, 122, 123, 129)},
    **{t: TEXT_GENERATION for t in _tasks(51, 52, 53, 54, 55, 56)},  # Rationale.py
    **{t: TEXT_GENERATION for t in _tasks(18, 46, 50)},  # ConceptExplanation.py
    **{t: TEXT_GENERATION for t in _tasks(78, 114, 112, 110, *range(83, 95))},  # TextSummarization.py
    "task42": TEXT_GENERATION,  # NatureLanguageInference.py, generation part
    "task41": NLI,
    **{t: NER for t in _tasks(125, 126, 127, 128)},
    "task106": TEXT_CLASSIFICATION,
    **{t: INFORMATION_EXTRACTION for t in _tasks(1, 2, 3, 29, 74)},
    "task131": TREATMENT_PLANNING,
    **{t: CLINICAL_OUTCOME for t in _tasks(117, 118, 119)},
    **{t: FACT_VERIFICATION for t in _tasks(12, 16)},
    "task100": FACT_VERIFICATION_GENERATION,
}
# Rationale.py's language table; every other official BLEU/ROUGE task uses English.
OFFICIAL_TASK_LANGUAGES = {
    "task51": "zh", "task52": "en", "task53": "fr", "task54": "ja", "task55": "ru", "task56": "es",
}
YES_NO_MCQA_TASKS = frozenset({"task123"})
# TextClassification.py's label list for task106 (hallmarks of cancer).
OFFICIAL_TASK_CLASSES = {
    "task106": (
        "sustaining proliferative signaling", "evading growth suppressors", "resisting cell death",
        "enabling replicative immortality", "inducing angiogenesis",
        "activating invasion and metastasis", "genomic instability and mutation",
        "tumor promoting inflammation", "cellular energetics", "avoiding immune destruction",
    ),
}
# Task-file `Categories` names we map to a metric family (lower-cased).
CATEGORY_NAMES = {
    "multiple choice question answering": MCQA, "multiple-choice question answering": MCQA, "mcqa": MCQA,
    "rationale": TEXT_GENERATION, "explanation": TEXT_GENERATION, "concept explanation": TEXT_GENERATION,
    "text summarization": TEXT_GENERATION, "text generation": TEXT_GENERATION,
    "named entity recognition": NER, "text classification": TEXT_CLASSIFICATION,
    "information extraction": INFORMATION_EXTRACTION, "diagnosis": DIAGNOSIS,
    "treatment planning": TREATMENT_PLANNING, "natural language inference": NLI,
    "clinical outcome prediction": CLINICAL_OUTCOME, "fact verification": FACT_VERIFICATION,
}


class MedSInputError(ValueError):
  """A MedS-Bench task file, results CSV or category mapping that cannot be used."""


# -------------------------------------------------------- task files ----


def task_id_from_path(path: str | Path) -> str:
  """`task51_rationale_zh.json` -> `task51` (the official rule: text before the first '_')."""
  return Path(path).name.split("_")[0].removesuffix(".json")


def load_task(path: str | Path) -> dict[str, Any]:
  """Reads and validates a MedS-Bench task file; adds `task_id` from the file name."""
  task = files.read_json(path, expect=dict, what="'Definition', 'Instances', ...", error=MedSInputError)
  definition = task.get("Definition")
  if not isinstance(definition, list) or not definition or not isinstance(definition[0], str):
    raise MedSInputError(f"{path}: 'Definition' must be a non-empty list of strings.")
  instances = task.get("Instances")
  if not isinstance(instances, list) or not instances:
    raise MedSInputError(f"{path}: 'Instances' must be a non-empty list.")
  for index, instance in enumerate(instances):
    if not isinstance(instance, Mapping) or "input" not in instance or "output" not in instance:
      raise MedSInputError(f"{path}: Instances[{index}] needs 'input' and 'output'.")
    output = instance["output"]
    if not (isinstance(output, str) or (isinstance(output, list) and output and isinstance(output[0], str))):
      raise MedSInputError(f"{path}: Instances[{index}].output must be a string or a non-empty list of strings.")
  return {**task, "task_id": task_id_from_path(path)}


def load_task_dir(directory: str | Path) -> dict[str, dict[str, Any]]:
  """All `task*.json` files of a folder, keyed by task id."""
  paths = sorted(Path(directory).glob("task*.json"))
  if not paths:
    raise MedSInputError(f"{directory}: no task*.json files found.")
  return {task["task_id"]: task for task in map(load_task, paths)}


def gold_output(instance: Mapping[str, Any]) -> str:
  """The reference answer: the first entry of `output` when it is a list."""
  output = instance["output"]
  return output if isinstance(output, str) else output[0]


def select_shots(
    task: Mapping[str, Any], instance: Mapping[str, Any], k: int = NUM_SHOTS, *, seed: int = 0
) -> list[Mapping[str, Any]]:
  """k cases sampled from the task's Instances (the official source), seeded per instance."""
  instances = task["Instances"]
  rng = random.Random(f"{seed}|{task['task_id']}|{instance.get('id', '')}|{instance['input']}")
  return rng.sample(instances, min(len(instances), k))


def build_messages(
    task: Mapping[str, Any], instance: Mapping[str, Any], *, shots: Sequence[Mapping[str, Any]]
) -> list[dict[str, str]]:
  """[system: shots + definition, user: query] as in the official 3-shot prompt.

  Contents are not stripped here; the official Llama-3 formatter strips each
  message, which the chat template does too.
  """
  cases = [SHOT_TEMPLATE.format(input=s["input"], output=gold_output(s)) for s in shots]
  system = "\n\n".join(cases) + "\n\n" + task["Definition"][0] + SHOT_INSTRUCTION_SUFFIX
  return [
      {"role": "system", "content": system},
      {"role": "user", "content": QUERY_TEMPLATE.format(input=instance["input"])},
  ]


# ------------------------------------------------------- results CSV ----


def write_results_csv(rows: Sequence[Mapping[str, str]], path: str | Path) -> Path:
  """Writes `task_id,input,GT,output` rows (dicts with those keys) atomically."""
  table = []
  for index, row in enumerate(rows):
    missing = [k for k in RESULTS_HEADER if k not in row]
    if missing:
      raise MedSInputError(f"results row {index}: missing {missing}; rows need {list(RESULTS_HEADER)}.")
    table.append([row[k] for k in RESULTS_HEADER])
  return files.write_csv_atomic(path, RESULTS_HEADER, table)


def read_results_csv(path: str | Path) -> list[dict[str, str]]:
  """Reads a results CSV; every row must have task_id, GT and output (input may be anything)."""
  try:
    handle = open(path, encoding="utf-8", newline="")
  except FileNotFoundError:
    raise MedSInputError(f"{path}: results CSV not found.") from None
  with handle:
    reader = csv.DictReader(handle)
    missing = [k for k in RESULTS_HEADER if k not in (reader.fieldnames or [])]
    if missing:
      raise MedSInputError(
          f"{path}:1: header {reader.fieldnames} lacks {missing}; expected {','.join(RESULTS_HEADER)}."
      )
    rows = []
    for row in reader:
      if any(row[k] is None for k in RESULTS_HEADER) or not row["task_id"]:
        raise MedSInputError(f"{path}:{reader.line_num}: row has missing fields or no task_id.")
      rows.append({k: row[k] for k in RESULTS_HEADER})
  if not rows:
    raise MedSInputError(f"{path}: no result rows.")
  return rows


# ------------------------------------------------------------ scoring ----


def resolve_categories(
    task_ids: Sequence[str],
    *,
    task_categories: Mapping[str, str] | None = None,
    tasks: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, str]:
  """Metric family per task: explicit mapping, then the official table, then task-file Categories."""
  resolved, unknown = {}, []
  for task_id in task_ids:
    category = (task_categories or {}).get(task_id) or OFFICIAL_TASK_CATEGORIES.get(task_id)
    if category is None and tasks and task_id in tasks:
      names = [str(c).strip().lower() for c in tasks[task_id].get("Categories", [])]
      category = next((CATEGORY_NAMES[n] for n in names if n in CATEGORY_NAMES), None)
    if category is None:
      unknown.append(task_id)
    elif category not in CATEGORIES:
      raise MedSInputError(f"{task_id}: unknown category {category!r}; expected one of {CATEGORIES}.")
    else:
      resolved[task_id] = category
  if unknown:
    raise MedSInputError(
        f"No metric category for {unknown}: not in the official metric scripts and no task file "
        f"with a known 'Categories' entry. Pass --task_dir or --category TASK={'|'.join(CATEGORIES)}."
    )
  return resolved


def task_language(task_id: str, tasks: Mapping[str, Mapping[str, Any]] | None = None) -> str:
  """Official table for task51..56, else the task file's Output_language, else English."""
  if task_id in OFFICIAL_TASK_LANGUAGES:
    return OFFICIAL_TASK_LANGUAGES[task_id]
  language = (tasks or {}).get(task_id, {}).get("Output_language")
  if language:
    return text_metrics.normalize_language(language[0] if isinstance(language, list) else language)
  return "en"


def score_task(
    task_id: str, category: str, language: str, rows: Sequence[Mapping[str, str]]
) -> dict[str, Any]:
  """Metrics for one task's rows, in percent; `n` rows scored, `n_empty` empty outputs."""
  empty = sum(not r["output"].strip() for r in rows)
  result: dict[str, Any] = {"category": category, "language": language}
  if category == TEXT_GENERATION:
      # Official Rationale/Explanation skip empty outputs (they are not averaged in).
    scored = [r for r in rows if r["output"].strip() and r["GT"].strip()]
    n = len(scored)
    result["bleu1"] = _mean_percent(
        [text_metrics.bleu1(r["output"].strip(), r["GT"].strip(), language) for r in scored]
    )
    result["rougeL"] = _mean_percent(
        [text_metrics.rouge_l(r["output"].strip(), r["GT"].strip(), language) for r in scored]
    )
  elif category == FACT_VERIFICATION_GENERATION:
      # Official: lower-cased, periods dropped from GT, empty outputs count as 0 in the mean.
    n = len(rows)
    pairs = [(r["output"].strip().lower(), r["GT"].replace(".", "").strip().lower()) for r in rows]
    result["bleu1"] = _mean_percent([text_metrics.bleu1(o, g, "en") if o else 0.0 for o, g in pairs])
    result["rougeL"] = _mean_percent([text_metrics.rouge_l(o, g, "en") if o else 0.0 for o, g in pairs])
  elif category == NER:
    n = len(rows)
    counts = [text_metrics.ner_counts(r["output"], r["GT"]) for r in rows]
    result["f1"] = 100 * text_metrics.f1_from_counts(*(sum(c[i] for c in counts) for i in range(3)))
  elif category == TEXT_CLASSIFICATION:
    n = len(rows)
    classes = OFFICIAL_TASK_CLASSES.get(task_id) or sorted(
        {r["GT"].lower().strip().rstrip(".") for r in rows}
    )
    gold = [text_metrics.labels_in_text(r["GT"], classes) for r in rows]
    predicted = [text_metrics.labels_in_text(r["output"], classes) for r in rows]
    p, rec, f1 = text_metrics.macro_prf1(gold, predicted, classes)
    result.update(precision=100 * p, recall=100 * rec, f1=100 * f1)
  elif category == MCQA:
    n = len(rows)
    yes_no = task_id in YES_NO_MCQA_TASKS
    hits = [text_metrics.mcqa_correct(r["output"], r["GT"], yes_no=yes_no) for r in rows]
    result["accuracy"] = _mean_percent([float(h) for h in hits])
  else:
    n = len(rows)
    match = _ACCURACY_RULES[category]
    result["accuracy"] = _mean_percent([float(match(r["output"], r["GT"])) for r in rows])
  result.update(n=n, n_empty=empty)
  return result


_ACCURACY_RULES = {
    INFORMATION_EXTRACTION: text_metrics.information_extraction_match,
    DIAGNOSIS: text_metrics.diagnosis_match,
    TREATMENT_PLANNING: text_metrics.treatment_planning_match,
    NLI: text_metrics.nli_match,
    CLINICAL_OUTCOME: text_metrics.clinical_outcome_match,
    FACT_VERIFICATION: text_metrics.fact_verification_match,
}


def _task_number(task_id: str) -> tuple[int, str]:
  digits = task_id.removeprefix("task")
  return (int(digits), "") if digits.isdigit() else (sys.maxsize, task_id)


def _mean_percent(values: Sequence[float]) -> float:
  return 100 * sum(values) / len(values) if values else 0.0


def score_rows(
    rows: Sequence[Mapping[str, str]],
    *,
    task_categories: Mapping[str, str] | None = None,
    tasks: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
  """Scores result rows: `{"tasks": {id: metrics}, "categories": {family: mean metrics}}`."""
  by_task: dict[str, list[Mapping[str, str]]] = {}
  for row in rows:
    by_task.setdefault(row["task_id"], []).append(row)
  task_ids = sorted(by_task, key=_task_number)
  categories = resolve_categories(task_ids, task_categories=task_categories, tasks=tasks)
  per_task = {
      task_id: score_task(task_id, categories[task_id], task_language(task_id, tasks), by_task[task_id])
      for task_id in task_ids
  }
  per_category: dict[str, dict[str, Any]] = {}
  for task_id, metrics in per_task.items():
    entry = per_category.setdefault(metrics["category"], {"tasks": []})
    entry["tasks"].append(task_id)
  for category, entry in per_category.items():
    members = [per_task[t] for t in entry["tasks"]]
    for name in ("accuracy", "bleu1", "rougeL", "f1", "precision", "recall"):
      if name in members[0]:
        entry[name] = sum(m[name] for m in members) / len(members)
    entry["n"] = sum(m["n"] for m in members)
  return {"tasks": per_task, "categories": per_category, "n_rows": len(rows)}


def score_results(
    csv_path: str | Path,
    *,
    task_categories: Mapping[str, str] | None = None,
    task_dir: str | Path | None = None,
) -> dict[str, Any]:
  """Reads a results CSV (and optional task folder for Categories/languages) and scores it."""
  tasks = load_task_dir(task_dir) if task_dir else None
  return score_rows(read_results_csv(csv_path), task_categories=task_categories, tasks=tasks)


def summary_table(results: Mapping[str, Any]) -> str:
  """Markdown: one line per task, then one per category (metrics in percent)."""
  metric_names = ("accuracy", "bleu1", "rougeL", "f1", "precision", "recall")

  def cells(metrics: Mapping[str, Any]) -> list[str]:
    return [f"{metrics[m]:.2f}" if m in metrics else "" for m in metric_names]

  rows = [
      [task_id, m["category"], m["language"], m["n"], m["n_empty"], *cells(m)]
      for task_id, m in results["tasks"].items()
  ]
  rows += [
      [f"**{category}**", f"{len(m['tasks'])} tasks", "", m["n"], "", *cells(m)]
      for category, m in results["categories"].items()
  ]
  return reporting.markdown_table(["task", "category", "lang", "n", "empty", *metric_names], rows)


def _parse_category_flags(values: Sequence[str]) -> dict[str, str]:
  mapping = {}
  for value in values:
    task_id, sep, category = value.partition("=")
    if not sep or not task_id or category not in CATEGORIES:
      raise MedSInputError(f"--category {value!r}: expected TASK=CATEGORY with CATEGORY in {CATEGORIES}.")
    mapping[task_id] = category
  return mapping



# -------------------------------------------------------------- the run ----

def run(chat: runner.ChatModel, config: ml_collections.ConfigDict, out_dir: str) -> tuple[dict, str]:
  """MedS-Bench: 3-shot greedy generation per instance, `results.csv`, then scoring.

  Writes `results.csv` (task_id,input,GT,output), `results.json` (`score_rows` plus
  generation counts) and `results.md`. Returns `(results, summary text)`.
  """
  tasks = load_task_dir(config.task_dir)
  pairs = [(task, instance) for task in tasks.values() for instance in task["Instances"]]
  if config.limit:
    pairs = pairs[:config.limit]
  conversations = [build_messages(
      task, instance, shots=select_shots(task, instance, config.shots, seed=config.seed))
                   for task, instance in pairs]
  texts, counts = chat.generate(conversations, max_new_tokens=config.max_new_tokens, desc="MedS-Bench")
  rows = [{"task_id": task["task_id"], "input": chat.template.render_prompt(messages),
           "GT": gold_output(instance), "output": samples[0]}
          for (task, instance), messages, samples in zip(pairs, conversations, texts)]
  write_results_csv(rows, os.path.join(out_dir, "results.csv"))
  results = score_rows(rows, tasks=tasks)
  results["counts"] = counts
  results["settings"] = runner.settings(config, ("shots", "max_new_tokens", "task_dir"))
  files.write_json_atomic(os.path.join(out_dir, "results.json"), results)
  files.write_text_atomic(os.path.join(out_dir, "results.md"), summary_table(results))
  return results, _meds_summary(results)


def _meds_summary(results: Mapping[str, Any]) -> str:
  metrics = ("accuracy", "bleu1", "rougeL", "f1")
  rows = [[category, len(m["tasks"]), m["n"], *(f"{m[k]:.2f}" if k in m else "" for k in metrics)]
          for category, m in results["categories"].items()]
  counts = ", ".join(f"{k}={v}" for k, v in results["counts"].items())
  return ("MedS-Bench (3-shot, greedy)\n" + reporting.markdown_table(["category", "tasks", "n", *metrics], rows)
          + f"counts: {counts}\n")


def _report_cells(results: Mapping[str, Any]) -> dict[str, float]:
  return {f"{category}/{metric}": value for category, metrics in results["categories"].items()
          for metric, value in metrics.items() if metric not in ("tasks", "n")}


BENCHMARK = runner.Benchmark(
    name="meds_bench", inputs=(("task_dir", lambda c: True),), result_name=lambda config: "meds_bench",
    run=run, report_cells=_report_cells)

def score_command(results_csv: str, out: str, task_dir: str | None = None,
                  category: Sequence[str] = ()) -> int:
  """`score`: scores a results CSV, writes results JSON (+ markdown beside it); exit code."""
  try:
    results = score_results(results_csv, task_categories=_parse_category_flags(category), task_dir=task_dir)
  except MedSInputError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  table = summary_table(results)
  files.write_json_atomic(out, results)
  files.write_text_atomic(Path(out).with_suffix(".md"), table)
  print(table)
  print(f"wrote {out} and {Path(out).with_suffix('.md')}")
  return 0


def define_flags() -> None:
  """Command-line flags, defined only when run as a program."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string("results", None, "Results CSV (task_id,input,GT,output).", required=True)
  flags.DEFINE_string("out", None, "Results JSON path (markdown written beside it).", required=True)
  flags.DEFINE_string("task_dir", None, "Folder of task*.json files (Categories, languages).")
  flags.DEFINE_multi_string("category", [], "TASK=CATEGORY override, repeatable.")


def main(argv: Sequence[str]) -> int:
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  if argv[1:] != ["score"]:
    raise app.UsageError(f"usage: python -m csft_jax.eval.meds_bench score --results=R.csv --out=R.json "
                         f"[--task_dir=D] (got {argv[1:]})")
  f = flags.FLAGS
  return score_command(f.results, f.out, f.task_dir, f.category)


if __name__ == "__main__":
  from csft_jax.console import run_cli  # pylint: disable=g-import-not-at-top
  define_flags()
  run_cli(main)
