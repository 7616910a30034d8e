"""MedS-Bench: task files, the official 3-shot prompt, results CSV, the official metric scripts, CLI.

Follows MAGIC-AI4Med/MedS-Ins:
  * prompt: `Evaluation/EvalDataset.py` with the settings of `Evaluation/eval.py` (3-shot,
    original definition, greedy, 200 new tokens, `model_max_length=2048` with the tokenizer's
    right-side truncation). The system turn is three solved cases `Input:\\n{x}\\n\\nOutput:\\n{y}\\n`
    joined by blank lines, then the task definition and a fixed sentence; the user turn is
    `Input:\\n{x}\\nOutput:\\n`. The three cases are drawn from the task's `Instances` (any of
    them, the asked one included), not from `Positive Examples`; our draw is seeded. The
    per-model rules (Llama-3 strips every message, InternLM2 does not, Mistral folds the
    system turn into the user turn) live in the chat templates (`csft_jax.data.templates`).
    Prompt ids: eval.py calls `tokenizer(prompt, ...)` with `add_special_tokens` at its default,
    True. Its Llama-3 prompts already begin with `<|begin_of_text|>`, so a Llama-3 model sees two
    BOS tokens (`eval_py_ids`; `config.llama3_double_bos=False` gives one); its InternLM2 and
    default builders leave the BOS out of the text when the tokenizer adds one, so every other
    family sees one BOS, as our templates render it.
  * scoring: each `Metrics/<Script>.py`. A results CSV is read as they read it (pandas
    defaults: `""`, `NA`, `N/A`, `None`, `null`, ... become NaN, which `str()` makes "nan");
    each task is scored by the rule of the script whose task list names it, and `official`
    holds, per script, the numbers that script writes under its own keys (percent).
    Where a script would crash (an empty output in Rationale or TextSummarization, a blank
    MCQA answer, a NaN in a string method), we keep a defined behaviour, stated per family
    below, and count such outputs in `n_empty`.

CLI:
    python -m csft_jax.score meds_bench --results=R.csv --out=R.json [--task_dir=D] [--category=T=C]
"""

from __future__ import annotations

import io
import math
import random
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from csft_jax import files
from csft_jax.data import meds_ins
from csft_jax.eval import reporting, runner, text_metrics

# The task files, task ids and the 3-shot prompt are MedS-Ins's, shared with training.
NUM_SHOTS = meds_ins.NUM_SHOTS
MAX_NEW_TOKENS = 200
MODEL_MAX_LENGTH = 2048  # eval.py: AutoTokenizer(model_max_length=2048), truncation=True.
RESULTS_HEADER = ("task_id", "input", "GT", "output")

# Metric families: one per rule of the official scripts, plus TEXT_GENERATION (ours).
MCQA = "mcqa"  # MCQA.py
RATIONALE = "rationale"  # Rationale.py
CONCEPT_EXPLANATION = "concept_explanation"  # ConceptExplanation.py
TEXT_SUMMARIZATION = "text_summarization"  # TextSummarization.py
NLI = "nli"  # NatureLanguageInference.py, evaluate_nli
NLI_GENERATION = "nli_generation"  # NatureLanguageInference.py, evaluate_nli_gen
NER = "ner"  # NamedEntityRecognition.py
TEXT_CLASSIFICATION = "text_classification"  # TextClassification.py
INFORMATION_EXTRACTION = "information_extraction"  # InformationExtraction.py
DIAGNOSIS = "diagnosis"  # Diagnosis.py
TREATMENT_PLANNING = "treatment_planning"  # TreatmentPlanning.py
CLINICAL_OUTCOME = "clinical_outcome"  # ClinicalOutcomePrediction.py
FACT_VERIFICATION = "fact_verification"  # FactVerification.py, accuracy tasks
FACT_VERIFICATION_GENERATION = "fact_verification_generation"  # FactVerification.py, BLEU tasks
# Ours, not official: BLEU-1/ROUGE-L for generation tasks outside every official list (by a
# task file's `Categories` or --category), scored with ConceptExplanation.py's rule.
TEXT_GENERATION = "text_generation"
CATEGORIES = (
  MCQA,
  RATIONALE,
  CONCEPT_EXPLANATION,
  TEXT_SUMMARIZATION,
  NLI,
  NLI_GENERATION,
  NER,
  TEXT_CLASSIFICATION,
  INFORMATION_EXTRACTION,
  DIAGNOSIS,
  TREATMENT_PLANNING,
  CLINICAL_OUTCOME,
  FACT_VERIFICATION,
  FACT_VERIFICATION_GENERATION,
  TEXT_GENERATION,
)
GENERATION_CATEGORIES = frozenset(
  {RATIONALE, CONCEPT_EXPLANATION, TEXT_SUMMARIZATION, NLI_GENERATION, FACT_VERIFICATION_GENERATION, TEXT_GENERATION}
)


def _tasks(*numbers: int) -> tuple[str, ...]:
  return tuple(f"task{n}" for n in numbers)


# The default task lists of the official scripts, in their order: script -> family -> tasks.
# Diagnosis.py has no list (it pools every row of its file).
OFFICIAL_SCRIPTS: dict[str, dict[str, tuple[str, ...]]] = {
  "MCQA.py": {MCQA: _tasks(4, 5, 6, 8, 9, 57, 58, 59, 60, 61, 122, 123, 129)},
  "Rationale.py": {RATIONALE: _tasks(51, 52, 53, 54, 55, 56)},
  "ConceptExplanation.py": {CONCEPT_EXPLANATION: _tasks(18, 46, 50)},
  "TextSummarization.py": {TEXT_SUMMARIZATION: _tasks(78, 114, 112, 110, *range(83, 95))},
  "NatureLanguageInference.py": {NLI: _tasks(41), NLI_GENERATION: _tasks(42)},
  "NamedEntityRecognition.py": {NER: _tasks(125, 126, 127, 128)},
  "TextClassification.py": {TEXT_CLASSIFICATION: _tasks(106)},
  "InformationExtraction.py": {INFORMATION_EXTRACTION: _tasks(1, 2, 3, 29, 74)},
  "Diagnosis.py": {DIAGNOSIS: ()},
  "TreatmentPlanning.py": {TREATMENT_PLANNING: _tasks(131)},
  "ClinicalOutcomePrediction.py": {CLINICAL_OUTCOME: _tasks(117, 118, 119)},
  "FactVerification.py": {FACT_VERIFICATION: _tasks(12, 16), FACT_VERIFICATION_GENERATION: _tasks(100)},
}
OFFICIAL_TASK_CATEGORIES: dict[str, str] = {
  task: family for lists in OFFICIAL_SCRIPTS.values() for family, tasks in lists.items() for task in tasks
}
FAMILY_SCRIPT = {family: script for script, lists in OFFICIAL_SCRIPTS.items() for family in lists}
# TextSummarization.py: its own table lists these four and averages over them; the CT and MRI
# report tasks are pooled row by row into one number each.
SUMMARIZATION_PRIMARY = _tasks(78, 114, 112, 110)
SUMMARIZATION_POOLS = {"CT": _tasks(*range(83, 89)), "MRI": _tasks(*range(89, 95))}
# Rationale.py's TASKID2LANG; every other official BLEU/ROUGE call passes lang='en'.
OFFICIAL_TASK_LANGUAGES = {
  "task51": "zh",
  "task52": "en",
  "task53": "fr",
  "task54": "ja",
  "task55": "ru",
  "task56": "es",
}
YES_NO_MCQA_TASKS = frozenset({"task123"})
# TextClassification.py's label list for task106 (hallmarks of cancer).
OFFICIAL_TASK_CLASSES = {
  "task106": (
    "sustaining proliferative signaling",
    "evading growth suppressors",
    "resisting cell death",
    "enabling replicative immortality",
    "inducing angiogenesis",
    "activating invasion and metastasis",
    "genomic instability and mutation",
    "tumor promoting inflammation",
    "cellular energetics",
    "avoiding immune destruction",
  ),
}
# Task-file `Categories` names (lower-cased) -> family, for tasks outside the official lists.
CATEGORY_NAMES = {
  "multiple choice question answering": MCQA,
  "multiple-choice question answering": MCQA,
  "mcqa": MCQA,
  "rationale": RATIONALE,
  "explanation": CONCEPT_EXPLANATION,
  "concept explanation": CONCEPT_EXPLANATION,
  "text summarization": TEXT_SUMMARIZATION,
  "text generation": TEXT_GENERATION,
  "named entity recognition": NER,
  "text classification": TEXT_CLASSIFICATION,
  "information extraction": INFORMATION_EXTRACTION,
  "diagnosis": DIAGNOSIS,
  "treatment planning": TREATMENT_PLANNING,
  "natural language inference": NLI,
  "clinical outcome prediction": CLINICAL_OUTCOME,
  "fact verification": FACT_VERIFICATION,
}


class MedSInputError(ValueError):
  """A MedS-Bench task file, results CSV or category mapping that cannot be used."""


# -------------------------------------------------------- task files ----


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
  return {**task, "task_id": meds_ins.task_id_from_path(path)}


def load_task_dir(directory: str | Path) -> dict[str, dict[str, Any]]:
  """All `task*.json` files of a folder, keyed by task id."""
  paths = sorted(Path(directory).glob("task*.json"))
  if not paths:
    raise MedSInputError(f"{directory}: no task*.json files found.")
  return {task["task_id"]: task for task in map(load_task, paths)}


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

  Contents are not stripped here: stripping is a per-model rule of the official
  builder (Llama-3 strips, InternLM2 does not), which the chat templates apply.
  """
  system, user = meds_ins.few_shot_prompt(task["Definition"][0], shots, instance["input"])
  return [{"role": "system", "content": system}, {"role": "user", "content": user}]


# ------------------------------------------------------- results CSV ----

# One cell of a results CSV as pandas reads it: a string, a number where a whole column is
# numeric, or None where pandas gives NaN (an empty cell, "NA", "N/A", "None", "null", ...).
Cell = str | int | float | bool | None


def write_results_csv(rows: Sequence[Mapping[str, str]], path: str | Path) -> Path:
  """Writes `task_id,input,GT,output` rows (dicts with those keys) atomically."""
  table = []
  for index, row in enumerate(rows):
    missing = [k for k in RESULTS_HEADER if k not in row]
    if missing:
      raise MedSInputError(f"results row {index}: missing {missing}; rows need {list(RESULTS_HEADER)}.")
    table.append([row[k] for k in RESULTS_HEADER])
  return files.write_csv_atomic(path, RESULTS_HEADER, table)


def read_results_csv(path: str | Path) -> list[dict[str, Cell]]:
  """Reads a results CSV as every official metric script does: `pandas.read_csv` defaults.

  Cells that pandas reads as NaN are None; what a script does with them is its rule (see
  `score_task`). The first four columns must be task_id,input,GT,output: scripts read them by
  name and (`utils.csv_to_list`) by position.
  """
  import pandas as pd

  try:
    frame = pd.read_csv(path)
  except FileNotFoundError:
    raise MedSInputError(f"{path}: results CSV not found.") from None
  except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
    raise MedSInputError(
      f"{path}: not a readable results CSV ({error}); expected the header "
      f"{','.join(RESULTS_HEADER)} and one row per instance."
    ) from None
  header = [str(c) for c in frame.columns]
  if header[:4] != list(RESULTS_HEADER):
    missing = [k for k in RESULTS_HEADER if k not in header]
    raise MedSInputError(
      f"{path}:1: header {header} lacks {missing or 'nothing, but is out of order'}; "
      f"expected {','.join(RESULTS_HEADER)} as the first four columns."
    )
  if frame.empty:
    raise MedSInputError(f"{path}: no result rows.")
  columns = [[None if _is_nan(v) else v for v in frame[k].tolist()] for k in RESULTS_HEADER]
  rows = [dict(zip(RESULTS_HEADER, values)) for values in zip(*columns)]
  for index, row in enumerate(rows):
    if not isinstance(row["task_id"], str):
      raise MedSInputError(f"{path}: data row {index + 1} has no task_id (found {row['task_id']!r}).")
  return rows


def _is_nan(value: Any) -> bool:
  return isinstance(value, float) and math.isnan(value)


# ------------------------------------------------------------ scoring ----


def resolve_categories(
  task_ids: Sequence[str],
  *,
  task_categories: Mapping[str, str] | None = None,
  tasks: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, str]:
  """Family per task: the official scripts' task lists, else `task_categories`, else Categories."""
  resolved, unknown = {}, []
  for task_id in task_ids:
    official = OFFICIAL_TASK_CATEGORIES.get(task_id)
    explicit = (task_categories or {}).get(task_id)
    if official and explicit and explicit != official:
      raise MedSInputError(
        f"--category {task_id}={explicit}: {task_id} is in the task list of the official "
        f"{FAMILY_SCRIPT[official]} ({official}); --category is only for tasks outside the official lists."
      )
    category = official or explicit
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
      f"No metric category for {unknown}: not in the official metric scripts' task lists and no task "
      f"file with a known 'Categories' entry. Pass --task_dir or --category TASK={'|'.join(CATEGORIES)}."
    )
  return resolved


def task_language(task_id: str, tasks: Mapping[str, Mapping[str, Any]] | None = None) -> str:
  """Official tasks: Rationale.py's table, else English (every other script passes lang='en').

  Tasks outside the official lists (ours): the task file's Output_language, else English.
  """
  if task_id in OFFICIAL_TASK_CATEGORIES:
    return OFFICIAL_TASK_LANGUAGES.get(task_id, "en")
  language = (tasks or {}).get(task_id, {}).get("Output_language")
  if language:
    return text_metrics.normalize_language(language[0] if isinstance(language, list) else language)
  return "en"


def _cast(value: Cell) -> str:
  """`str(cell)` as the scripts call it on a pandas cell: NaN becomes "nan"."""
  return "nan" if value is None else str(value)


def _is_blank(value: Cell) -> bool:
  return value is None or (isinstance(value, str) and not value.strip())


def generation_scores(category: str, language: str, rows: Sequence[Mapping[str, Cell]]) -> list[tuple[float, float]]:
  """(BLEU-1, ROUGE-L) in [0, 1] of each row that enters the family's mean, by its script's rule."""
  scores = []
  for row in rows:
    output, gold = row["output"], row["GT"]
    both_text = isinstance(output, str) and isinstance(gold, str)
    if category == RATIONALE:
      # Rationale.py strips both and skips empty ones. Its .strip() crashes on NaN (an empty
      # cell): skipped here too.
      if not both_text or not output.strip() or not gold.strip():
        continue
      output, gold = output.strip(), gold.strip()
    elif category in (CONCEPT_EXPLANATION, TEXT_GENERATION):
      # ConceptExplanation.py skips non-strings (NaN) and scores the raw text.
      if not both_text:
        continue
    elif category == FACT_VERIFICATION_GENERATION:
      # FactVerification.py: output stripped and lower-cased, GT without '.'; an empty output
      # counts as 0 in the mean. Its string methods crash on NaN: 0 here too.
      if not both_text or not output.strip():
        scores.append((0.0, 0.0))
        continue
      output, gold = output.strip().lower(), gold.replace(".", "").strip().lower()
    # TextSummarization.py, evaluate_nli_gen: every row counts, raw text. word_tokenize
    # crashes on NaN: 0 here.
    elif not both_text:
      scores.append((0.0, 0.0))
      continue
    scores.append((text_metrics.bleu1(output, gold, language), text_metrics.rouge_l(output, gold, language)))
  return scores


def accuracy_hits(task_id: str, category: str, rows: Sequence[Mapping[str, Cell]]) -> list[bool]:
  """Right or wrong per row, by the family's script."""
  if category == MCQA:
    yes_no = task_id in YES_NO_MCQA_TASKS
    return [text_metrics.mcqa_correct(_cast(r["output"]), _cast(r["GT"]), yes_no=yes_no) for r in rows]
  if category in _CAST_RULES:  # these scripts call str() on both cells first
    match = _CAST_RULES[category]
    return [match(_cast(r["output"]), _cast(r["GT"])) for r in rows]
  # Diagnosis.py, TreatmentPlanning.py, FactVerification.py call string methods on the raw
  # cells and crash on NaN: such a row is wrong here.
  match = _RAW_RULES[category]
  return [r["output"] is not None and r["GT"] is not None and match(str(r["output"]), str(r["GT"])) for r in rows]


_CAST_RULES = {
  NLI: text_metrics.nli_match,
  INFORMATION_EXTRACTION: text_metrics.information_extraction_match,
  CLINICAL_OUTCOME: text_metrics.clinical_outcome_match,
}
_RAW_RULES = {
  DIAGNOSIS: text_metrics.diagnosis_match,
  TREATMENT_PLANNING: text_metrics.treatment_planning_match,
  FACT_VERIFICATION: text_metrics.fact_verification_match,
}


def score_task(task_id: str, category: str, language: str, rows: Sequence[Mapping[str, Cell]]) -> dict[str, Any]:
  """Metrics of one task's rows by its family's script, in percent.

  `n`: rows in the mean; `n_empty`: outputs that are blank or NaN as read (empty
  generations), which the scripts skip, score as wrong, or crash on (see the rules above).
  """
  official = task_id in OFFICIAL_TASK_CATEGORIES or category == DIAGNOSIS  # Diagnosis.py lists no ids
  result: dict[str, Any] = {
    "category": category,
    "language": language,
    "script": FAMILY_SCRIPT[category] if official else "ours",
  }
  if category in GENERATION_CATEGORIES:
    scores = generation_scores(category, language, rows)
    n = len(scores)
    result["bleu1"] = _mean_percent([b for b, _ in scores])
    result["rougeL"] = _mean_percent([r for _, r in scores])
  elif category == NER:
    # NamedEntityRecognition.py skips rows whose output is not a string (NaN); its .replace
    # crashes on a NaN GT: skipped here too. Counts are pooled over the task's rows.
    kept = [r for r in rows if isinstance(r["output"], str) and isinstance(r["GT"], str)]
    n = len(kept)
    counts = [text_metrics.ner_counts(r["output"], r["GT"]) for r in kept]
    result["f1"] = 100 * text_metrics.f1_from_counts(*(sum(c[i] for c in counts) for i in range(3)))
  elif category == TEXT_CLASSIFICATION:
    n = len(rows)
    gold_texts, output_texts = [_cast(r["GT"]) for r in rows], [_cast(r["output"]) for r in rows]
    # Tasks outside TextClassification.py's list (ours): the labels are the GT values seen.
    classes = OFFICIAL_TASK_CLASSES.get(task_id) or sorted({g.lower().strip().rstrip(".") for g in gold_texts})
    gold = [text_metrics.labels_in_text(g, classes) for g in gold_texts]
    predicted = [text_metrics.labels_in_text(o, classes) for o in output_texts]
    p, rec, f1 = text_metrics.macro_prf1(gold, predicted, classes)
    result.update(precision=100 * p, recall=100 * rec, f1=100 * f1)
  else:
    hits = accuracy_hits(task_id, category, rows)
    n = len(hits)
    result["accuracy"] = _mean_percent([float(h) for h in hits])
  result.update(n=n, n_empty=sum(_is_blank(r["output"]) for r in rows))
  return result


def _task_number(task_id: str) -> tuple[int, str]:
  digits = task_id.removeprefix("task")
  return (int(digits), "") if digits.isdigit() else (sys.maxsize, task_id)


def _mean_percent(values: Sequence[float]) -> float:
  return 100 * sum(values) / len(values) if values else 0.0


def _pair(metrics: Mapping[str, Any] | None, missing: float) -> dict[str, float]:
  if metrics is None:
    return {"bleu1": missing, "rougeL": missing}
  return {"bleu1": metrics["bleu1"], "rougeL": metrics["rougeL"]}


def _table(
  task_ids: Sequence[str],
  per_task: Mapping[str, Mapping[str, Any]],
  metric: str | None,
  *,
  missing: float = 0.0,
  average: bool = True,
) -> dict[str, Any]:
  """A script's row: each listed task (its placeholder when absent) and its "Avg." over them."""
  if metric is None:  # a BLEU/ROUGE pair
    table: dict[str, Any] = {t: _pair(per_task.get(t), missing) for t in task_ids}
    if average:
      table["Avg."] = {k: sum(table[t][k] for t in task_ids) / len(task_ids) for k in ("bleu1", "rougeL")}
  else:
    table = {t: per_task[t][metric] if t in per_task else missing for t in task_ids}
    if average:
      table["Avg."] = sum(table[t] for t in task_ids) / len(task_ids)
  return table


def official_results(
  per_task: Mapping[str, Mapping[str, Any]], rows_by_task: Mapping[str, Sequence[Mapping[str, Cell]]]
) -> dict[str, Any]:
  """Per official script whose tasks are in the file: the numbers it writes, under its keys (percent).

  Absent listed tasks get the script's placeholder (0; -1 in TextSummarization.py) and enter
  its "Avg." as they do there. MCQA.py imports a `write_results_to_csv` that `utils.py` lacks
  at HEAD, so it stops before writing: its entry is the per-task accuracy it computes.
  Diagnosis.py pools every row of its file; here, every row of the diagnosis tasks (the
  official eval writes one file per benchmark folder).
  """
  lists = {family: tasks for families in OFFICIAL_SCRIPTS.values() for family, tasks in families.items()}
  present = set(per_task)
  out: dict[str, Any] = {}
  if present & set(lists[MCQA]):
    out["MCQA.py"] = _table(lists[MCQA], per_task, "accuracy", average=False)
  for script, family in (("Rationale.py", RATIONALE), ("ConceptExplanation.py", CONCEPT_EXPLANATION)):
    if present & set(lists[family]):
      out[script] = _table(lists[family], per_task, None)
  if present & set(lists[TEXT_SUMMARIZATION]):
    table = _table(SUMMARIZATION_PRIMARY, per_task, None, missing=-1.0)
    average = table.pop("Avg.")
    for pool, task_ids in SUMMARIZATION_POOLS.items():
      pooled = [row for t in task_ids for row in rows_by_task.get(t, ())]
      scores = generation_scores(TEXT_SUMMARIZATION, "en", pooled)
      table[pool] = (
        {"bleu1": _mean_percent([b for b, _ in scores]), "rougeL": _mean_percent([r for _, r in scores])}
        if scores
        else _pair(None, -1.0)
      )
    out["TextSummarization.py"] = {**table, "Avg.": average}
  if present & set(lists[NLI] + lists[NLI_GENERATION]):
    out["NatureLanguageInference.py"] = {
      "NLI": _table(lists[NLI], per_task, "accuracy"),
      "NLI_GEN": _table(lists[NLI_GENERATION], per_task, None),
    }
  if present & set(lists[NER]):
    out["NamedEntityRecognition.py"] = _table(lists[NER], per_task, "f1")
  if "task106" in present:
    m = per_task["task106"]
    out["TextClassification.py"] = {"precision": m["precision"], "recall": m["recall"], "f1_score": m["f1"]}
  for script, family in (
    ("InformationExtraction.py", INFORMATION_EXTRACTION),
    ("TreatmentPlanning.py", TREATMENT_PLANNING),
    ("ClinicalOutcomePrediction.py", CLINICAL_OUTCOME),
  ):
    if present & set(lists[family]):
      out[script] = _table(lists[family], per_task, "accuracy")
  diagnosis = [t for t, m in per_task.items() if m["category"] == DIAGNOSIS]
  if diagnosis:
    hits = [h for t in diagnosis for h in accuracy_hits(t, DIAGNOSIS, rows_by_task[t])]
    out["Diagnosis.py"] = {"Accuracy": _mean_percent([float(h) for h in hits])}
  if present & set(lists[FACT_VERIFICATION] + lists[FACT_VERIFICATION_GENERATION]):
    out["FactVerification.py"] = {
      **_table(lists[FACT_VERIFICATION], per_task, "accuracy", average=False),
      **_table(lists[FACT_VERIFICATION_GENERATION], per_task, None, average=False),
    }
  return out


def score_rows(
  rows: Sequence[Mapping[str, Cell]],
  *,
  task_categories: Mapping[str, str] | None = None,
  tasks: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
  """Scores result rows (cells as `read_results_csv` gives them).

  Returns `tasks` (per task, by its script's rule), `official` (`official_results`),
  `categories` (ours: the unweighted mean of each family's tasks in these rows) and `n_rows`.
  """
  by_task: dict[str, list[Mapping[str, Cell]]] = {}
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
  for entry in per_category.values():
    members = [per_task[t] for t in entry["tasks"]]
    for name in ("accuracy", "bleu1", "rougeL", "f1", "precision", "recall"):
      if name in members[0]:
        entry[name] = sum(m[name] for m in members) / len(members)
    entry["n"] = sum(m["n"] for m in members)
  return {
    "tasks": per_task,
    "official": official_results(per_task, by_task),
    "categories": per_category,
    "n_rows": len(rows),
  }


def score_results(
  csv_path: str | Path,
  *,
  task_categories: Mapping[str, str] | None = None,
  task_dir: str | Path | None = None,
  tasks: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
  """Reads a results CSV (pandas defaults) and scores it; a task folder (or loaded `tasks`)
  gives Categories and languages of tasks outside the official lists."""
  if task_dir:
    tasks = load_task_dir(task_dir)
  return score_rows(read_results_csv(csv_path), task_categories=task_categories, tasks=tasks)


METRIC_NAMES = ("accuracy", "bleu1", "rougeL", "f1", "precision", "recall")


def summary_table(results: Mapping[str, Any]) -> str:
  """Markdown: one line per task, one per family (ours), then each official script's numbers."""

  def cells(metrics: Mapping[str, Any]) -> list[str]:
    return [f"{metrics[m]:.2f}" if m in metrics else "" for m in METRIC_NAMES]

  rows = [
    [task_id, m["category"], m["script"], m["language"], m["n"], m["n_empty"], *cells(m)]
    for task_id, m in results["tasks"].items()
  ]
  rows += [
    [f"**{category}**", f"{len(m['tasks'])} tasks", "ours: mean of tasks", "", m["n"], "", *cells(m)]
    for category, m in results["categories"].items()
  ]
  text = reporting.markdown_table(["task", "category", "script", "lang", "n", "empty", *METRIC_NAMES], rows)
  official = [
    [script, key, _official_cell(value)]
    for script, table in results["official"].items()
    for key, value in _flatten(table)
  ]
  if official:
    text += "\nAs the official scripts write them (BLEU/ROUGE as bleu1/rougeL):\n"
    text += reporting.markdown_table(["script", "key", "value"], official)
  return text


def _flatten(table: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
  items = []
  for key, value in table.items():
    if isinstance(value, Mapping) and "bleu1" not in value:
      items += _flatten(value, f"{prefix}{key}/")
    else:
      items.append((prefix + key, value))
  return items


def _official_cell(value: Any) -> str:
  if isinstance(value, Mapping):
    return f"{value['bleu1']:.2f}/{value['rougeL']:.2f}"
  return f"{value:.2f}"


def _parse_category_flags(values: Sequence[str]) -> dict[str, str]:
  mapping = {}
  for value in values:
    task_id, sep, category = value.partition("=")
    if not sep or not task_id or category not in CATEGORIES:
      raise MedSInputError(f"--category {value!r}: expected TASK=CATEGORY with CATEGORY in {CATEGORIES}.")
    mapping[task_id] = category
  return mapping


# -------------------------------------------------------------- the run ----


def _pairs(config: ml_collections.ConfigDict, tasks: dict[str, dict]) -> list[tuple[dict, dict]]:
  """(task, instance) of every instance asked: all, or the first `limit`."""
  pairs = [(task, instance) for task in tasks.values() for instance in task["Instances"]]
  return pairs[: config.limit] if config.limit else pairs


LLAMA3_BOS = "<|begin_of_text|>"


def eval_py_ids(prompt: str, ids: list[int]) -> list[int]:
  """The ids eval.py feeds for a rendered prompt: a Llama-3 prompt (text starting with
  `<|begin_of_text|>`) gets the tokenizer's BOS once more in front, as `tokenizer(prompt)` adds it."""
  return [ids[0], *ids] if prompt.startswith(LLAMA3_BOS) else ids


def requests(config: ml_collections.ConfigDict, tasks: dict[str, dict]) -> runner.Requests:
  """A 3-shot prompt per instance, cut to `model_max_length` tokens as eval.py's tokenizer does
  (`model_max_length=2048, truncation=True`: the default side, right, so an overlong prompt loses
  its end: the query and the assistant header)."""
  conversations = [
    build_messages(task, instance, shots=select_shots(task, instance, config.shots, seed=config.seed))
    for task, instance in _pairs(config, tasks)
  ]
  return runner.Requests(
    conversations,
    "MedS-Bench",
    official_ids=eval_py_ids if config.llama3_double_bos else None,
    cut=(config.model_max_length, config.truncation_side),
  )


def score(config: ml_collections.ConfigDict, tasks: dict[str, dict], answers: runner.Answers) -> runner.Scored:
  """`results.csv` (task_id,input,GT,output; `input` is the whole prompt, as eval.py writes it), read
  back as the official scripts read it and scored (`score_rows` plus generation counts). Files:
  `results.csv`, `results.md`, `results.json`."""
  pairs = _pairs(config, tasks)
  rows = [
    [task["task_id"], prompt, meds_ins.answer(instance["output"]), samples[0]]
    for (task, instance), prompt, samples in zip(pairs, answers.prompts, answers.texts)
  ]
  csv_text = files.csv_text(RESULTS_HEADER, rows)
  results = score_rows(read_results_csv(io.StringIO(csv_text)), tasks=tasks)
  counts = dict(answers.counts)
  counts["cut_at_model_max_length"] = counts.pop("cut_at_limit")
  results["counts"] = counts
  results["settings"] = runner.settings(
    config, ("shots", "max_new_tokens", "model_max_length", "truncation_side", "llama3_double_bos", "task_dir")
  )
  return runner.Scored(
    results,
    _meds_summary(results),
    {"results.csv": csv_text, "results.md": summary_table(results), "results.json": files.json_text(results)},
  )


def _meds_summary(results: Mapping[str, Any]) -> str:
  metrics = ("accuracy", "bleu1", "rougeL", "f1")
  rows = [
    [category, len(m["tasks"]), m["n"], *(f"{m[k]:.2f}" if k in m else "" for k in metrics)]
    for category, m in results["categories"].items()
  ]
  counts = ", ".join(f"{k}={v}" for k, v in results["counts"].items())
  return (
    "MedS-Bench (3-shot, greedy; per family, mean of its tasks)\n"
    + reporting.markdown_table(["category", "tasks", "n", *metrics], rows)
    + f"counts: {counts}\n"
  )


def _report_cells(results: Mapping[str, Any]) -> dict[str, float]:
  return {
    f"{category}/{metric}": value
    for category, metrics in results["categories"].items()
    for metric, value in metrics.items()
    if metric not in ("tasks", "n")
  }


def _validate(config: ml_collections.ConfigDict) -> None:
  if config.truncation_side not in ("right", "left"):
    raise runner.EvalConfigError(
      f"config.truncation_side={config.truncation_side!r}; expected 'right' (eval.py's tokenizer default) or 'left'."
    )
  if config.model_max_length < 1:
    raise runner.EvalConfigError(f"config.model_max_length={config.model_max_length} must be >= 1.")


def score_command(results_csv: str, out: str, task_dir: str | None = None, category: Sequence[str] = ()) -> int:
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
  """The flags of `python -m csft_jax.score meds_bench`, defined only when it runs."""
  from absl import flags

  flags.DEFINE_string("results", None, "Results CSV (task_id,input,GT,output).", required=True)
  flags.DEFINE_string("out", None, "Results JSON path (markdown written beside it).", required=True)
  flags.DEFINE_string("task_dir", None, "Folder of task*.json files (Categories, languages).")
  flags.DEFINE_multi_string("category", [], "TASK=CATEGORY for a task outside the official lists, repeatable.")


def score_main(flag_values) -> int:
  """`python -m csft_jax.score meds_bench --results=R.csv --out=R.json [--task_dir=D] [--category=T=C]`."""
  f = flag_values
  return score_command(f.results, f.out, f.task_dir, f.category)


BENCHMARK = runner.Benchmark(
  name="meds_bench",
  inputs=("task_dir",),
  load=lambda config: load_task_dir(config.task_dir),
  validate=_validate,
  requests=requests,
  score=score,
  report_cells=_report_cells,
  offline=runner.OfflineScoring(define_flags, score_main),
)
