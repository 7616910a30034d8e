"""CMB-Exam: official prompts, answer extraction, majority vote, scoring, CLI.

Follows the official FreedomIntelligence/CMB code: prompt templates and option
formatting from `workers/base.py`, few-shot demos from `src/generate_fewshot.py`,
extraction and voting from `src/utils.py` (`match_choice`, `extract_ans`),
decoding from `configs/model_config.yaml` (greedy, 1 to 512 new tokens; see
configs/eval/cmb.py), scoring from `score.py` (exact match with the key's answer,
accuracy per exam_class, an exam_type's score = mean of its classes' accuracies;
an id missing from the submission answers '' and is wrong, a repeated id keeps
its last answer, ids not in the key are ignored: we warn about each, and
`--strict` refuses them).

The model-facing part returns chat messages; the engine applies the chat
template and generates. Everything here is pure except the file readers and
writers at the bottom.

CLI:
    python -m csft_jax.score cmb --submission=S.json --answer_key=K.json --out=R.json [--strict]
"""

from __future__ import annotations

import random
import re
import sys
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
from absl import logging

from csft_jax import files
from csft_jax.data.cmb_exam import format_question
from csft_jax.eval import reporting, runner

SINGLE_CHOICE = "单项选择题"
MULTI_CHOICE = "多项选择题"
QUESTION_TYPES = (SINGLE_CHOICE, MULTI_CHOICE)
OPTION_LETTERS = "ABCDEFG"

OFFICIAL_PROTOCOL = "generation + official answer extraction (CMB protocol)"
LOGLIK_PROTOCOL = (
  "log-likelihood of each option letter (fast proxy, NOT the official CMB protocol; "
  "multi-choice items get a single letter, so they count as correct only when the key is one letter)"
)

_ANSWER_PATTERN = re.compile(r"(答案|正确选项)(?:是|：|为|应该是|应该为)(.*?)(。|\.|$)", re.S)
_REQUIRED_ITEM_FIELDS = ("exam_type", "exam_class", "question_type", "question", "option")
_REQUIRED_KEY_FIELDS = ("id", "exam_type", "exam_class", "question_type", "answer")


class CMBInputError(ValueError):
  """A CMB file, item, answer key or submission that does not follow the format."""


# ---------------------------------------------------------------- items ----


def validate_item(item: Mapping[str, Any], where: str, *, require_answer: bool = False) -> None:
  """Raises CMBInputError naming `where` if `item` is not a well-formed CMB-Exam item."""
  if not isinstance(item, Mapping):
    raise CMBInputError(f"{where}: expected a JSON object, found {type(item).__name__}.")
  missing = [f for f in _REQUIRED_ITEM_FIELDS if f not in item]
  if require_answer and "answer" not in item:
    missing.append("answer")
  if missing:
    raise CMBInputError(
      f"{where}: missing field(s) {missing}; a CMB-Exam item needs "
      f"{list(_REQUIRED_ITEM_FIELDS)} (+ 'answer' for val/train)."
    )
  _check_question_type(item["question_type"], where)
  options = item["option"]
  if not isinstance(options, Mapping) or not options:
    raise CMBInputError(f"{where}: 'option' must be a non-empty object like {{'A': '...'}}.")
  bad = [k for k in options if k not in OPTION_LETTERS or not isinstance(options[k], str)]
  if bad:
    raise CMBInputError(
      f"{where}: option key(s) {bad} are not letters A-G with text values; CMB options are labelled A to G."
    )
  if "answer" in item:
    _check_answer(item["answer"], item["question_type"], where, options=options)


def _check_question_type(question_type: Any, where: str) -> None:
  if question_type not in QUESTION_TYPES:
    raise CMBInputError(f"{where}: unknown question_type {question_type!r}; expected one of {QUESTION_TYPES}.")


def _check_answer(answer: Any, question_type: str, where: str, options: Mapping[str, str] | None = None) -> None:
  if not isinstance(answer, str) or not answer or any(c not in OPTION_LETTERS for c in answer):
    raise CMBInputError(f"{where}: answer {answer!r} must be one or more letters A-G.")
  if question_type == SINGLE_CHOICE and len(answer) != 1:
    raise CMBInputError(f"{where}: single-choice ({SINGLE_CHOICE}) answer {answer!r} has several letters.")
  if options is not None and any(c not in options for c in answer):
    raise CMBInputError(f"{where}: answer {answer!r} names an option not in {sorted(options)}.")


def load_exam(path: str | Path, *, require_answer: bool = False) -> list[dict]:
  """Reads a CMB-Exam JSON list (test/val/train) and validates every item."""
  items = _read_json_list(path, what="CMB-Exam items")
  for index, item in enumerate(items):
    validate_item(item, _where(path, index, item), require_answer=require_answer)
  return items


def _where(path: str | Path, index: int, item: Any) -> str:
  item_id = item.get("id") if isinstance(item, Mapping) else None
  return f"{path}: item {index}" + (f" (id={item_id!r})" if item_id is not None else "")


def _read_json_list(path: str | Path, *, what: str) -> list:
  return files.read_json(path, expect=list, what=what, error=CMBInputError)


# -------------------------------------------------------------- prompts ----


def demo_answer(item: Mapping[str, Any], mode: str = "answer") -> str:
  """The assistant turn of a few-shot demo: `答案是X。` or `{explanation}所以答案是X。`."""
  if "answer" not in item:
    raise CMBInputError(f"Few-shot demo {item.get('question', '')[:30]!r}... has no 'answer'.")
  if mode == "answer":
    return f"答案是{item['answer']}。"
  if "explanation" not in item:
    raise CMBInputError(
      f"Chain-of-thought demo {item.get('question', '')[:30]!r}... has no 'explanation'; "
      "CoT few-shot needs val items with explanations."
    )
  return f"{item['explanation']}所以答案是{item['answer']}。"


def select_shots(
  val_items: Sequence[Mapping[str, Any]], item: Mapping[str, Any], k: int, *, seed: int = 0
) -> list[Mapping[str, Any]]:
  """k val demos with the same exam_type and exam_class, sampled as the official script does.

  Deterministic: the sample depends only on `seed` and the item. An identical
  question is never its own demo (matters only when evaluating val itself).
  """
  if k == 0:
    return []
  pool = [
    demo
    for demo in val_items
    if demo["exam_type"] == item["exam_type"]
    and demo["exam_class"] == item["exam_class"]
    and demo["question"] != item["question"]
  ]
  if len(pool) < k:
    raise CMBInputError(
      f"Only {len(pool)} val item(s) for exam_type={item['exam_type']!r}, "
      f"exam_class={item['exam_class']!r}; cannot draw {k} shots. Use fewer shots."
    )
  rng = random.Random(f"{seed}|{item.get('id', '')}|{item['question']}")
  return rng.sample(pool, k)


def build_messages(
  item: Mapping[str, Any],
  *,
  mode: str = "answer",
  shots: Sequence[Mapping[str, Any]] = (),
  system_prompt: str | None = None,
) -> list[dict[str, str]]:
  """Chat messages for one item: optional system turn, demo user/assistant pairs, the question."""
  messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
  for demo in shots:
    messages.append({"role": "user", "content": format_question(demo, mode)})
    messages.append({"role": "assistant", "content": demo_answer(demo, mode)})
  messages.append({"role": "user", "content": format_question(item, mode)})
  return messages


# ---------------------------------------------------------- extraction ----


def extract_answer(text: str, question_type: str) -> str:
  """The official `match_choice` rule, then first letter only for single-choice.

  Search `(答案|正确选项)(?:是|：|为|应该是|应该为)(.*?)(。|\\.|$)` (DOTALL); the answer
  is the A-G letters of group 2 in order; without a match, every A-G letter of
  the whole text. Letters are neither sorted nor de-duplicated, as officially.
  """
  _check_question_type(question_type, "extract_answer")
  match = _ANSWER_PATTERN.search(text)
  source = match.group(2) if match else text
  letters = "".join(c for c in source if c in OPTION_LETTERS)
  if question_type == SINGLE_CHOICE:
    return letters[:1]
  return letters


def majority_vote(answers: Sequence[str]) -> str:
  """Most frequent non-empty answer; ties go to the one seen first; '' if all empty."""
  counts: dict[str, int] = {}
  for answer in answers:
    if answer:
      counts[answer] = counts.get(answer, 0) + 1
  if not counts:
    return ""
  best = max(counts.values())
  return next(answer for answer, count in counts.items() if count == best)


def predict(generations: Sequence[str], question_type: str) -> str:
  """Extracts an answer from every sampled generation and majority-votes them."""
  return majority_vote([extract_answer(g, question_type) for g in generations])


def build_submission(
  items: Sequence[Mapping[str, Any]], generations: Sequence[Sequence[str]]
) -> tuple[list[dict], dict[str, int]]:
  """Submission `[{"id", "model_answer"}]` from per-item generations, plus counts.

  Counts: `empty_generations` (every sample blank: scored wrong) and
  `no_answer_extracted` (text present but no A-G letter found).
  """
  if len(items) != len(generations):
    raise CMBInputError(f"{len(items)} items but {len(generations)} generation lists.")
  submission, empty, unanswered = [], 0, 0
  for index, (item, samples) in enumerate(zip(items, generations)):
    if "id" not in item:
      raise CMBInputError(f"item {index}: no 'id'; submissions are keyed by the test item id.")
    answer = predict(samples, item["question_type"])
    if not any(s.strip() for s in samples):
      empty += 1
    elif not answer:
      unanswered += 1
    submission.append({"id": item["id"], "model_answer": answer})
  return submission, {"empty_generations": empty, "no_answer_extracted": unanswered}


# ------------------------------------------------------ log-likelihood ----


def loglik_request(
  item: Mapping[str, Any], *, shots: Sequence[Mapping[str, Any]] = (), system_prompt: str | None = None
) -> tuple[list[dict[str, str]], list[str]]:
  """Context messages (answer-only prompt) and the option letters to score after it.

  Non-official fast mode: the engine scores each letter as the first assistant
  tokens; `loglik_answer` turns the scores into a prediction.
  """
  letters = [letter for letter, text in item["option"].items() if len(text) > 1]
  return build_messages(item, mode="answer", shots=shots, system_prompt=system_prompt), letters


def loglik_answer(option_scores: Mapping[str, float]) -> str:
  """Highest-scoring letter (ties: alphabetical first), for single- and multi-choice alike.

  Per-option yes/no scoring for multi-choice is out of scope, so a multi-choice
  item gets one letter and is right only if its key has one letter (25 of the
  1,190 test keys); results carry that label (LOGLIK_PROTOCOL).
  """
  if not option_scores:
    raise CMBInputError("loglik_answer: no option scores given.")
  return max(sorted(option_scores), key=lambda letter: option_scores[letter])


# ------------------------------------------------------------- scoring ----


def load_answer_key(path: str | Path) -> list[dict]:
  """Reads and validates an answer key `[{id, exam_type, exam_class, question_type, answer}]`."""
  key = _read_json_list(path, what="answer-key entries")
  validate_answer_key(key, source=str(path))
  return key


def validate_answer_key(answer_key: Sequence[Mapping[str, Any]], *, source: str = "answer key") -> None:
  """Raises CMBInputError on missing fields, bad answers or duplicate ids."""
  seen: set = set()
  for index, entry in enumerate(answer_key):
    where = _where(source, index, entry)
    if not isinstance(entry, Mapping):
      raise CMBInputError(f"{where}: expected a JSON object.")
    missing = [f for f in _REQUIRED_KEY_FIELDS if f not in entry]
    if missing:
      raise CMBInputError(f"{where}: missing field(s) {missing}; keys need {list(_REQUIRED_KEY_FIELDS)}.")
    _check_question_type(entry["question_type"], where)
    _check_answer(entry["answer"], entry["question_type"], where)
    if entry["id"] in seen:
      raise CMBInputError(f"{where}: duplicate id {entry['id']!r} in the answer key.")
    seen.add(entry["id"])


def load_submission(path: str | Path) -> list[dict]:
  """Reads a submission JSON list (validated against a key by `validate_submission`)."""
  return _read_json_list(path, what='{"id", "model_answer"} entries')


def _check_entries(submission: Sequence[Any]) -> None:
  """Raises CMBInputError on entries the official score.py cannot read either (it would crash)."""
  for index, entry in enumerate(submission):
    if not isinstance(entry, Mapping) or "id" not in entry or "model_answer" not in entry:
      raise CMBInputError(
        f'submission entry {index}: expected {{"id": ..., "model_answer": ...}}, found {entry!r:.80}.'
      )
    if not isinstance(entry["id"], Hashable):
      raise CMBInputError(f"submission entry {index}: id {entry['id']!r:.40} must be a number or a string.")


def submission_problems(submission: Sequence[Mapping[str, Any]], answer_key: Sequence[Mapping[str, Any]]) -> list[str]:
  """What the strict validator finds wrong in a submission, each with how `score.py` scores it.

  Duplicate ids (the last entry counts), answer-key ids missing (scored as empty answers, wrong),
  ids not in the key (ignored), and model answers that are not a string of letters A-G ('' = no
  answer; compared as written, so `"a"` or `"A "` is wrong). Ids compare as Python values, as in
  the official dict: 1 and "1" differ.
  """
  id_counts = Counter(entry["id"] for entry in submission)
  duplicates = [i for i, count in id_counts.items() if count > 1]
  key_ids = {entry["id"] for entry in answer_key}
  missing = [entry["id"] for entry in answer_key if entry["id"] not in id_counts]
  extra = [i for i in id_counts if i not in key_ids]
  not_letters = [
    (entry["id"], entry["model_answer"])
    for entry in submission
    if not isinstance(entry["model_answer"], str) or any(c not in OPTION_LETTERS for c in entry["model_answer"])
  ]
  problems = []
  if duplicates:
    problems.append(f"{len(duplicates)} duplicate id(s), e.g. {duplicates[:5]}: the last entry of each counts")
  if missing:
    problems.append(f"{len(missing)} answer-key id(s) missing, e.g. {missing[:5]}: scored as empty answers (wrong)")
  if extra:
    problems.append(f"{len(extra)} id(s) not in the answer key, e.g. {extra[:5]}: ignored")
  if not_letters:
    example = ", ".join(f"id {i!r}: {a!r:.20}" for i, a in not_letters[:3])
    problems.append(
      f"{len(not_letters)} model_answer(s) not letters A-G, e.g. {example}: compared as written (exact match)"
    )
  return problems


def validate_submission(submission: Sequence[Mapping[str, Any]], answer_key: Sequence[Mapping[str, Any]]) -> None:
  """The strict validator: every key id exactly once, nothing else, answers letters A-G or ''.

  Raises CMBInputError listing `submission_problems`; `score_submission(strict=False)` scores
  such a submission as the official score.py does instead.
  """
  _check_entries(submission)
  problems = submission_problems(submission, answer_key)
  if problems:
    raise CMBInputError(_strict_error(problems))


def _strict_error(problems: Sequence[str]) -> str:
  return (
    "Submission does not match the answer key: "
    + "; ".join(problems)
    + ". Submit exactly one entry per answer-key id, each model_answer letters A-G or '' "
    '(ids compare as values: 1 and "1" differ).'
  )


def score_submission(
  submission: Sequence[Mapping[str, Any]],
  answer_key: Sequence[Mapping[str, Any]],
  *,
  protocol: str = OFFICIAL_PROTOCOL,
  generation_stats: Mapping[str, int] | None = None,
  strict: bool = False,
) -> dict[str, Any]:
  """CMB scoring as the official score.py, plus overall numbers; accuracies are fractions in [0, 1].

  As score.py: a model answer is right when it equals the key's answer exactly; an id missing
  from the submission answers '' (wrong); a repeated id keeps its last answer; ids not in the key
  are ignored. Each such problem is logged as a warning and listed in `submission_warnings`; with
  `strict=True` it is an error instead (`validate_submission`).

  Returns `accuracy_per_category` (exam_type = mean of its classes),
  `accuracy_per_subcategory` ({exam_type: {exam_class: accuracy}}), `overall`
  (`micro` = correct / items, `macro` = mean of the exam_type scores),
  `accuracy_per_question_type`, `counts`, the `protocol` label and, when there are any,
  `submission_warnings`.
  """
  validate_answer_key(answer_key)
  _check_entries(submission)
  problems = submission_problems(submission, answer_key)
  if strict and problems:
    raise CMBInputError(_strict_error(problems))
  for problem in problems:
    logging.warning("CMB submission: %s, as the official score.py does (--strict refuses it).", problem)
  # A dict of the entries, as score.py builds it: a repeated id keeps its last answer.
  predicted = {entry["id"]: entry["model_answer"] for entry in submission}
  per_class: dict[str, dict[str, list[int]]] = {}
  per_qtype: dict[str, list[int]] = {}
  correct_total = empty = 0
  for entry in answer_key:
    answer = predicted.get(entry["id"], "")
    correct = int(answer == entry["answer"])
    stats = per_class.setdefault(entry["exam_type"], {}).setdefault(entry["exam_class"], [0, 0])
    stats[0] += correct
    stats[1] += 1
    qtype = per_qtype.setdefault(entry["question_type"], [0, 0])
    qtype[0] += correct
    qtype[1] += 1
    correct_total += correct
    empty += int(answer == "")
  subcategory = {
    exam_type: {exam_class: c / n for exam_class, (c, n) in classes.items()} for exam_type, classes in per_class.items()
  }
  category = {t: sum(classes.values()) / len(classes) for t, classes in subcategory.items()}
  results = {
    "protocol": protocol,
    "accuracy_per_category": category,
    "accuracy_per_subcategory": subcategory,
    "overall": {
      "micro": correct_total / len(answer_key),
      "macro": sum(category.values()) / len(category),
    },
    "accuracy_per_question_type": {q: c / n for q, (c, n) in per_qtype.items()},
    "counts": {"items": len(answer_key), "correct": correct_total, "empty_answers": empty},
  }
  if generation_stats:
    results["counts"].update(generation_stats)
  if problems:
    results["submission_warnings"] = problems
  return results


def markdown_report(results: Mapping[str, Any]) -> str:
  """Markdown: protocol line, per exam_type / exam_class table (percent), overall and counts."""
  rows = []
  for exam_type, classes in results["accuracy_per_subcategory"].items():
    rows.append([f"**{exam_type}**", "(mean of classes)", 100 * results["accuracy_per_category"][exam_type]])
    rows += [["", exam_class, 100 * acc] for exam_class, acc in classes.items()]
  overall = results["overall"]
  rows.append(["**overall**", "micro (all items)", 100 * overall["micro"]])
  rows.append(["**overall**", "macro (mean of exam_types)", 100 * overall["macro"]])
  counts = ", ".join(f"{k}={v}" for k, v in results["counts"].items())
  warnings = "".join(f"Warning: {problem}.\n" for problem in results.get("submission_warnings", ()))
  return (
    f"Protocol: {results['protocol']}\n\n"
    + reporting.markdown_table(["exam_type", "exam_class", "accuracy (%)"], rows)
    + f"\nCounts: {counts}\n"
    + warnings
  )


def write_submission(
  submission: Sequence[Mapping[str, Any]],
  path: str | Path,
  answer_key: Sequence[Mapping[str, Any]] | None = None,
) -> Path:
  """Writes `[{"id", "model_answer"}]` atomically, validated against `answer_key` if given."""
  if answer_key is not None:
    validate_submission(submission, answer_key)
  payload = [{"id": entry["id"], "model_answer": entry["model_answer"]} for entry in submission]
  return files.write_json_atomic(path, payload)


def write_results(results: Mapping[str, Any], json_path: str | Path, markdown_path: str | Path | None = None) -> None:
  """Writes the results JSON and (default: same name, .md) the markdown table, atomically."""
  files.write_json_atomic(json_path, results)
  files.write_text_atomic(markdown_path or Path(json_path).with_suffix(".md"), markdown_report(results))


def _summary(results: Mapping[str, Any]) -> str:
  rows = [[t, 100 * acc] for t, acc in results["accuracy_per_category"].items()]
  rows.append(["overall micro", 100 * results["overall"]["micro"]])
  rows.append(["overall macro", 100 * results["overall"]["macro"]])
  return reporting.markdown_table(["exam_type", "accuracy (%)"], rows)


# -------------------------------------------------------------- the run ----


def load_inputs(config: ml_collections.ConfigDict) -> tuple[list[dict], list[dict], list[dict] | None]:
  """The items to ask (the first `limit`), the few-shot pool and the answer key, all validated."""
  items = load_exam(config.exam)
  if config.limit:
    items = items[: config.limit]
  val = load_exam(config.val, require_answer=True) if config.shots else []
  key = load_answer_key(config.answer_key) if config.answer_key else None
  return items, val, key


def requests(
  config: ml_collections.ConfigDict, inputs: tuple[list[dict], list[dict], list[dict] | None]
) -> runner.Requests:
  """CMB-Exam's prompts: answer / cot generation (`num_samples` each, majority vote), or the option
  letters' log-likelihoods after the answer-only prompt (loglik)."""
  items, val, _ = inputs
  system = config.system_prompt or None
  shots = [select_shots(val, item, config.shots, seed=config.seed) for item in items]
  if config.mode == "loglik":
    asked = [loglik_request(item, shots=s, system_prompt=system) for item, s in zip(items, shots)]
    return runner.Requests([m for m, _ in asked], "CMB loglik", options=[letters for _, letters in asked])
  conversations = [
    build_messages(item, mode=config.mode, shots=s, system_prompt=system) for item, s in zip(items, shots)
  ]
  return runner.Requests(conversations, f"CMB {config.mode}", num_samples=config.num_samples)


def score(
  config: ml_collections.ConfigDict, inputs: tuple[list[dict], list[dict], list[dict] | None], answers: runner.Answers
) -> runner.Scored:
  """The submission (official extraction and majority vote, or the likeliest letter) and, with an
  answer key, its score (`score_submission`).

  Files: `generations.json`, `submission.json` and, with an answer key, `results.json` + `results.md`.
  """
  items, _, key = inputs
  counts = dict(answers.counts)
  if answers.option_scores is not None:
    submission = [{"id": item["id"], "model_answer": loglik_answer(s)} for item, s in zip(items, answers.option_scores)]
    records = [{"id": item["id"], "option_scores": s} for item, s in zip(items, answers.option_scores)]
    protocol = LOGLIK_PROTOCOL
  else:
    submission, extraction_counts = build_submission(items, answers.texts)
    counts.update(extraction_counts)
    records = [
      {"id": item["id"], "samples": samples, "model_answer": entry["model_answer"]}
      for item, samples, entry in zip(items, answers.texts, submission)
    ]
    protocol = OFFICIAL_PROTOCOL
  outputs = {"generations.json": files.json_text(records), "submission.json": files.json_text(submission)}
  if key is None:
    return runner.Scored(
      None,
      f"No answer key: wrote submission.json ({len(submission)} answers); score it with "
      "`python -m csft_jax.score cmb`.\n",
      outputs,
    )
  asked = {item["id"] for item in items}
  results = score_submission(
    submission, [e for e in key if e["id"] in asked], protocol=protocol, generation_stats=counts
  )
  results["settings"] = runner.settings(
    config, ("mode", "shots", "num_samples", "temperature", "top_p", "max_new_tokens", "min_new_tokens", "exam")
  )
  outputs.update({"results.md": markdown_report(results), "results.json": files.json_text(results)})
  counts_text = ", ".join(f"{k}={v}" for k, v in results["counts"].items())
  extracted = ""
  if config.mode != "loglik":
    answered = sum(bool(entry["model_answer"]) for entry in submission)
    extracted = (
      f"answers extracted: {answered} of {len(submission)} ({answered / len(submission):.0%}; the rest "
      "had no letter A-G for the official extraction)\n"
    )
  return runner.Scored(
    results, f"CMB-Exam ({results['protocol']})\n{_summary(results)}counts: {counts_text}\n{extracted}", outputs
  )


def _report_cells(results: Mapping[str, Any]) -> dict[str, float]:
  cells = {"micro": 100 * results["overall"]["micro"], "macro": 100 * results["overall"]["macro"]}
  cells.update({t: 100 * acc for t, acc in results["accuracy_per_category"].items()})
  return cells


def _validate(config) -> None:
  if config.mode not in ("answer", "cot", "loglik"):
    raise runner.EvalConfigError(f"config.mode={config.mode!r}; choose answer, cot or loglik.")


def score_command(
  submission: str, answer_key: str, out: str, markdown: str | None = None, *, strict: bool = False
) -> int:
  """`score`: scores a submission as the official score.py, writes results JSON + markdown; exit code.

  Problems the official scorer tolerates (missing, repeated or unknown ids, answers that are not
  letters A-G) are warnings, or with `strict` an error (exit 2, nothing written).
  """
  try:
    results = score_submission(load_submission(submission), load_answer_key(answer_key), strict=strict)
  except CMBInputError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  write_results(results, out, markdown)
  print(_summary(results))
  print(f"wrote {out} and {markdown or Path(out).with_suffix('.md')}")
  return 0


def define_flags() -> None:
  """The flags of `python -m csft_jax.score cmb`, defined only when it runs."""
  from absl import flags

  flags.DEFINE_string("submission", None, 'Submission JSON list [{"id", "model_answer"}].', required=True)
  flags.DEFINE_string(
    "answer_key", None, "Answer key, e.g. ../shared/data/cmb/CMB-test-choice-answer.json.", required=True
  )
  flags.DEFINE_string("out", None, "Results JSON path.", required=True)
  flags.DEFINE_string("markdown", None, "Markdown path (default: --out with .md).")
  flags.DEFINE_bool(
    "strict",
    False,
    "Refuse a submission with missing, repeated or unknown ids or answers that "
    "are not letters A-G (by default they are scored as the official score.py does, with a warning).",
  )


def score_main(flag_values) -> int:
  """`python -m csft_jax.score cmb --submission=S --answer_key=K --out=R [--markdown=M] [--strict]`."""
  f = flag_values
  return score_command(f.submission, f.answer_key, f.out, f.markdown, strict=f.strict)


BENCHMARK = runner.Benchmark(
  name="cmb",
  inputs=("exam", ("val", lambda c: c.shots > 0), ("answer_key", lambda c: bool(c.answer_key))),
  load=load_inputs,
  result_name=lambda config: f"cmb-{config.mode}",
  validate=_validate,
  requests=requests,
  score=score,
  report_cells=_report_cells,
  offline=runner.OfflineScoring(define_flags, score_main),
)
