"""CMB-Clin: multi-turn clinical case questions with gold history, judge prompts, local proxy.

Generation follows the official FreedomIntelligence/CMB code, not its README: every worker's
`collate_conv` (`workers/*.py`) opens the dialogue with `description + question_1`, concatenated
with nothing between them (the README's `以下是一位病人的病例：` preamble is in no worker); every
later question is a new user turn, and the earlier assistant turns carry the *gold* solutions,
not the model's answers. Each (case, question) is one greedy generation (`do_sample: False`) of
1 to 512 new tokens (`min_new_tokens`, `max_new_tokens` in `configs/model_config.yaml`) with
`repetition_penalty=1.1`, which `workers/base.py` sets for CMB-Clin (`use_qa`).

Scoring is by an LLM judge. The CMB repository ships no code for it, in any commit: only the
README's "CMB-Clin GPT-4 evaluation Prompt" (`JUDGE_PROMPT`, verbatim, PDF spacing included), which
rates fluency, relevance, completeness and proficiency in medicine on 1-5 scales and asks for
"JSON format and ONLY the JSON" like `{ ‘ fluency ’: 3 , ‘ relevance ’: 3 , ...}`. With
`config.judge.model` (a local checkpoint through our engine) or `config.judge.endpoint` (an
OpenAI-compatible API, the README's GPT-4 protocol) each answer's prompt goes to the judge
(`csft_jax.eval.judge`; records in `judge.jsonl`), `parse_judgment` reads the reply (a reply it
cannot read is counted in `n_unparsed`, never guessed), and the summary holds each dimension's mean
on the 1-5 scale over the readable replies and `avg`, the mean of the four (the repository has no
results table to follow; its leaderboard is a web page). Without a judge, every record still holds
its ready-to-send judge prompt. Always, as a local proxy only: ROUGE-L and BLEU-1 against the
solution (jieba tokens); empty answers score 0 on the proxies and are counted (`n_empty`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from csft_jax import files
from csft_jax.eval import reporting, runner, text_metrics

# The README does not say how `{ history }` is filled; this layout of the earlier turns is ours.
HISTORY_TURN = "问：{question}\n答：{solution}\n"

JUDGE_PROMPT = """You are an AI evaluator specializing in assessing the quality of answers
provided by other language models . Your primary goal is to rate the
answers based on their fluency , relevance , completeness , proficiency
in medicine . Use the following scales to evaluate each criterion :
Fluency :
1: Completely broken and unreadable sentence pieces
2: Mostly broken with few readable tokens
3: Moderately fluent but with limited vocabulary
4: Mostly coherent in expressing complex subjects
5: Human - level fluency
Relevance :
1: Completely unrelated to the question
2: Some relation to the question , but mostly off - topic
3: Relevant , but lacking focus or key details
4: Highly relevant , addressing the main aspects of the question
5: Directly relevant and precisely targeted to the question
Completeness :
1: Extremely incomplete
2: Almost incomplete with limited information
3: Moderate completeness with some information
4: Mostly complete with most of the information displayed
5: Fully complete with all information presented
Proficiency in medicine :
1: Using plain languages with no medical terminology .
2: Equipped with some medical knowledge but lacking in - depth details
3: Conveying moderately complex medical information with clarity
4: Showing solid grasp of medical terminology but having some minor
mistakes in detail
5: Fully correct in all presented medical knowledge
You will be provided with the following information :
- a description
- a conversation based on the description ( optional )
- a question based on the description and conversation
- the solution to the question
- a model \u2019 s answer to the question
[ description ]
{ description }
[ end of description ]
[ conversation ]
{ history }
[ end of conversation ]
[ question ]
{ question }
[ end of question ]
[ solution ]
{ solution }
[ end of solution ]
[ answer ]
{ answer }
[ end of answer ]
Make sure to provide your evaluation results in JSON format and ONLY the
JSON , with separate ratings for each of the mentioned criteria as in
the following example :
{ \u2018 fluency \u2019: 3 , \u2018 relevance \u2019: 3 , \u2018 completeness \u2019: 3 , \u2018 proficiency \u2019: 3}"""  # noqa: E501  verbatim

_JUDGE_SLOT = re.compile(r"\{ (description|history|question|solution|answer) \}")

# The four ratings the judge prompt asks for, as its example names them.
DIMENSIONS = ("fluency", "relevance", "completeness", "proficiency")
_QUOTES = str.maketrans({"\u2018": '"', "\u2019": '"', "\u201c": '"', "\u201d": '"', "'": '"'})


class ClinInputError(ValueError):
  """A CMB-Clin file or case that does not follow the format."""


def load_clin(path: str | Path) -> list[dict]:
  """Reads CMB-Clin cases `[{id, title, description, QA_pairs: [{question, solution}]}]`."""
  cases = files.read_json(path, expect=list, what="CMB-Clin cases", error=ClinInputError)
  for index, case in enumerate(cases):
    where = f"{path}: case {index}"
    missing = [f for f in ("id", "title", "description", "QA_pairs") if f not in case]
    if missing:
      raise ClinInputError(f"{where}: missing field(s) {missing}.")
    if not isinstance(case["QA_pairs"], list) or not case["QA_pairs"]:
      raise ClinInputError(f"{where} (id={case['id']!r}): 'QA_pairs' must be a non-empty list.")
    for turn, pair in enumerate(case["QA_pairs"]):
      if not isinstance(pair, Mapping) or "question" not in pair or "solution" not in pair:
        raise ClinInputError(f"{where} (id={case['id']!r}): QA_pairs[{turn}] needs 'question' and 'solution'.")
  return cases


def build_messages(case: Mapping[str, Any], turn: int, *, system_prompt: str | None = None) -> list[dict[str, str]]:
  """Messages asking question `turn` of `case`, earlier turns answered with the gold solutions."""
  pairs = case["QA_pairs"]
  if not 0 <= turn < len(pairs):
    raise ClinInputError(f"case {case['id']!r} has {len(pairs)} questions; turn {turn} is out of range.")
  messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
  for index, pair in enumerate(pairs[: turn + 1]):
    question = pair["question"]
    if index == 0:
      question = case["description"] + question
    messages.append({"role": "user", "content": question})
    if index < turn:
      messages.append({"role": "assistant", "content": pair["solution"]})
  return messages


def judge_prompt(case: Mapping[str, Any], turn: int, answer: str) -> str:
  """The README's judge prompt filled in for question `turn` and the model's `answer`."""
  pairs = case["QA_pairs"]
  history = "".join(HISTORY_TURN.format(**pair) for pair in pairs[:turn])
  values = {
    "description": case["description"],
    "history": history,
    "question": pairs[turn]["question"],
    "solution": pairs[turn]["solution"],
    "answer": answer,
  }
  # One pass, so text inside an answer is never substituted again.
  return _JUDGE_SLOT.sub(lambda match: values[match.group(1)], JUDGE_PROMPT)


def parse_judgment(reply: str) -> dict[str, int] | None:
  """The four ratings in a judge's reply, or None when it cannot be read.

  The prompt asks for ONLY a JSON object like its example `{ ‘ fluency ’: 3 , ...}`. A reply is read
  when the `{...}` objects in it that parse as JSON (with curly or single quotes read as JSON's double
  quotes, and keys stripped and lower-cased, as in the example) and have the four keys give one
  rating set, each an integer 1-5. No object, a missing key, another value, or two objects that
  disagree: None (counted, never guessed).
  """
  found = []
  for block in re.findall(r"\{[^{}]*\}", reply):
    try:
      value = json.loads(block.translate(_QUOTES))
    except json.JSONDecodeError:
      continue
    if not isinstance(value, dict):
      continue
    ratings = {str(k).strip().lower(): v for k, v in value.items()}
    if not all(k in ratings for k in DIMENSIONS):
      continue
    if not all(type(ratings[k]) is int and 1 <= ratings[k] <= 5 for k in DIMENSIONS):
      return None  # a rating off the scale is not read as some other rating
    found.append({k: ratings[k] for k in DIMENSIONS})
  return found[0] if found and all(f == found[0] for f in found) else None


def summarize_judgments(judged: Sequence[Mapping[str, Any] | None], judge: str) -> dict[str, Any]:
  """Each dimension's mean rating (1-5) over the readable replies and `avg`, their mean; counts."""
  ratings = [j["scores"] for j in judged if j is not None and j["scores"] is not None]
  means = {k: sum(r[k] for r in ratings) / len(ratings) if ratings else None for k in DIMENSIONS}
  return {
    "judge": judge,
    "n_judged": len(judged),
    "n_unparsed": len(judged) - len(ratings),
    **means,
    "avg": sum(means.values()) / len(DIMENSIONS) if ratings else None,
  }


def build_records(cases: Sequence[Mapping[str, Any]], answers: Sequence[Sequence[str]]) -> list[dict[str, Any]]:
  """One record per (case, question): answer, judge prompt and proxy scores (fractions)."""
  if len(cases) != len(answers):
    raise ClinInputError(f"{len(cases)} cases but {len(answers)} answer lists.")
  records = []
  for case, case_answers in zip(cases, answers):
    if len(case_answers) != len(case["QA_pairs"]):
      raise ClinInputError(f"case {case['id']!r}: {len(case['QA_pairs'])} questions but {len(case_answers)} answers.")
    for turn, (pair, answer) in enumerate(zip(case["QA_pairs"], case_answers)):
      empty = not answer.strip()
      records.append(
        {
          "id": case["id"],
          "title": case["title"],
          "turn": turn,
          "question": pair["question"],
          "solution": pair["solution"],
          "answer": answer,
          "empty": empty,
          "judge_prompt": judge_prompt(case, turn, answer),
          "rougeL": 0.0 if empty else text_metrics.rouge_l(answer, pair["solution"], "zh"),
          "bleu1": 0.0 if empty else text_metrics.bleu1(answer, pair["solution"], "zh"),
        }
      )
  return records


def summarize(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Mean proxy scores in percent over all questions (empty answers count as 0)."""
  n = len(records)
  if n == 0:
    raise ClinInputError("No CMB-Clin records to summarise.")
  return {
    "protocol": "local proxy (ROUGE-L / BLEU-1 vs solutions); CMB-Clin's score is an LLM judge's "
    "(one judge_prompt per record)",
    "rougeL": 100 * sum(r["rougeL"] for r in records) / n,
    "bleu1": 100 * sum(r["bleu1"] for r in records) / n,
    "n": n,
    "n_empty": sum(r["empty"] for r in records),
  }


def write_outputs(records: Sequence[Mapping[str, Any]], path: str | Path) -> dict[str, Any]:
  """Writes `{"summary", "records"}` JSON atomically (judge prompts included); returns the summary."""
  summary = summarize(records)
  files.write_json_atomic(path, {"summary": summary, "records": list(records)})
  return summary


# -------------------------------------------------------------- the run ----


def load_inputs(config: ml_collections.ConfigDict) -> list[dict]:
  """The cases to ask (the first `limit`), validated."""
  cases = load_clin(config.clin)
  return cases[: config.limit] if config.limit else cases


def requests(config: ml_collections.ConfigDict, cases: list[dict]) -> runner.Requests:
  """One reply per (case, question), with the case's gold history before it."""
  system = config.system_prompt or None
  return runner.Requests(
    [build_messages(case, turn, system_prompt=system) for case in cases for turn in range(len(case["QA_pairs"]))],
    "CMB-Clin",
  )


def _per_case(cases: list[dict], answers: runner.Answers) -> list[list[str]]:
  replies = iter(samples[0] for samples in answers.texts)
  return [[next(replies) for _ in case["QA_pairs"]] for case in cases]


def judge_prompts(
  config: ml_collections.ConfigDict, cases: list[dict], answers: runner.Answers
) -> list[tuple[str, str]]:
  """`(case id/turn, the README's judge prompt)` per answer."""
  del config
  return [
    (f"{case['id']}/{turn}", judge_prompt(case, turn, answer))
    for case, case_answers in zip(cases, _per_case(cases, answers))
    for turn, answer in enumerate(case_answers)
  ]


def score(config: ml_collections.ConfigDict, cases: list[dict], answers: runner.Answers) -> runner.Scored:
  """Judge prompts and proxy scores per question (`build_records`), and with a judge its reply and
  ratings per question and their means (`summarize_judgments`). Files: `answers.json` (per case)
  and `results.json` (`{"summary", "records"}`) + `results.md`."""
  per_case = _per_case(cases, answers)
  records = build_records(cases, per_case)
  summary = summarize(records)
  if answers.judged is not None:
    for record, judged in zip(records, answers.judged):
      record["judge"] = {"reply": judged["reply"], "scores": judged["scores"]}
    summary["judgments"] = summarize_judgments(answers.judged, answers.judged[0]["judge"] if answers.judged else "")
    summary["protocol"] = (
      "LLM judge (the CMB README's GPT-4 prompt), mean rating 1-5 per dimension over readable "
      "replies; local proxies ROUGE-L / BLEU-1 vs solutions"
    )
  summary.update(
    counts=answers.counts,
    settings=runner.settings(config, ("max_new_tokens", "min_new_tokens", "repetition_penalty", "clin")),
  )
  rows = [["ROUGE-L (%)", summary["rougeL"]], ["BLEU-1 (%)", summary["bleu1"]]]
  judged_text = ""
  if "judgments" in summary:
    judgments = summary["judgments"]
    rows += [[f"judge {k} (1-5)", "-" if judgments[k] is None else judgments[k]] for k in (*DIMENSIONS, "avg")]
    judged_text = (
      f"judge: {judgments['judge']}, {judgments['n_judged']} answers, "
      f"{judgments['n_unparsed']} replies unreadable (left out of the means; see judge.jsonl)\n"
    )
  counts_text = ", ".join(f"{k}={v}" for k, v in answers.counts.items())
  table = (
    f"CMB-Clin ({summary['protocol']})\n"
    + reporting.markdown_table(["metric", "value"], rows)
    + f"questions={summary['n']}, {counts_text}\n"
    + judged_text
  )
  outputs = {
    "answers.json": files.json_text(
      [{"id": case["id"], "answers": case_answers} for case, case_answers in zip(cases, per_case)]
    ),
    "results.md": table,
    "results.json": files.json_text({"summary": summary, "records": records}),
  }
  return runner.Scored({"summary": summary, "records": records}, table, outputs)


def _report_cells(results: Mapping[str, Any]) -> dict[str, float]:
  summary = results["summary"]
  cells = {"rougeL": summary["rougeL"], "bleu1": summary["bleu1"]}
  judgments = summary.get("judgments")
  if judgments is not None:  # ratings 1-5, not percent
    cells.update({f"judge/{k}": judgments[k] for k in (*DIMENSIONS, "avg") if judgments[k] is not None})
    cells["judge/n_unparsed"] = judgments["n_unparsed"]
  return cells


BENCHMARK = runner.Benchmark(
  name="cmb_clin",
  inputs=("clin",),
  load=load_inputs,
  requests=requests,
  score=score,
  report_cells=_report_cells,
  judging=runner.Judging(judge_prompts, parse_judgment),
)
