"""CMB-Clin: multi-turn clinical case questions with gold history, judge prompts, local proxy.

Generation follows the official FreedomIntelligence/CMB code, not its README: every worker's
`collate_conv` (`workers/*.py`) opens the dialogue with `description + question_1`, concatenated
with nothing between them (the README's `以下是一位病人的病例：` preamble is in no worker); every
later question is a new user turn, and the earlier assistant turns carry the *gold* solutions,
not the model's answers. Each (case, question) is one greedy generation (`do_sample: False`) of
1 to 512 new tokens (`min_new_tokens`, `max_new_tokens` in `configs/model_config.yaml`) with
`repetition_penalty=1.1`, which `workers/base.py` sets for CMB-Clin (`use_qa`).

Scoring is by an LLM judge. The CMB repository ships no code for it; the judge prompt is the README's
"CMB-Clin GPT-4 evaluation Prompt" (`JUDGE_PROMPT`, verbatim, PDF spacing included). We save one
ready-to-send judge prompt per answer and, as a local proxy only, ROUGE-L and BLEU-1 against the
solution (jieba tokens); empty answers score 0 on the proxies and are counted (`n_empty`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from csft_jax import files
from csft_jax.eval import engine, reporting, runner, text_metrics

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
{ \u2018 fluency \u2019: 3 , \u2018 relevance \u2019: 3 , \u2018 completeness \u2019: 3 , \u2018 proficiency \u2019: 3}"""

_JUDGE_SLOT = re.compile(r"\{ (description|history|question|solution|answer) \}")


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
        raise ClinInputError(
            f"{where} (id={case['id']!r}): QA_pairs[{turn}] needs 'question' and 'solution'."
        )
  return cases


def build_messages(
    case: Mapping[str, Any], turn: int, *, system_prompt: str | None = None
) -> list[dict[str, str]]:
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


def build_records(
    cases: Sequence[Mapping[str, Any]], answers: Sequence[Sequence[str]]
) -> list[dict[str, Any]]:
  """One record per (case, question): answer, judge prompt and proxy scores (fractions)."""
  if len(cases) != len(answers):
    raise ClinInputError(f"{len(cases)} cases but {len(answers)} answer lists.")
  records = []
  for case, case_answers in zip(cases, answers):
    if len(case_answers) != len(case["QA_pairs"]):
      raise ClinInputError(
          f"case {case['id']!r}: {len(case['QA_pairs'])} questions but {len(case_answers)} answers."
      )
    for turn, (pair, answer) in enumerate(zip(case["QA_pairs"], case_answers)):
      empty = not answer.strip()
      records.append({
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
      })
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
  return cases[:config.limit] if config.limit else cases


def run(chat: runner.ChatModel, config: ml_collections.ConfigDict, out_dir: str,
        cases: list[dict]) -> tuple[dict, str]:
  """CMB-Clin: one greedy reply per (case, question) with gold history; judge prompts + proxies.

  Decoding uses `config.repetition_penalty` and `config.min_new_tokens` (official 1.1 and 1). Writes `results.json` (`{"summary", "records"}`, `write_outputs`). Returns
  `(summary dict, summary text)`.
  """
  system = config.system_prompt or None
  asks = [(c, t) for c, case in enumerate(cases) for t in range(len(case["QA_pairs"]))]
  conversations = [build_messages(cases[c], t, system_prompt=system) for c, t in asks]
  texts, counts = chat.generate(conversations, max_new_tokens=config.max_new_tokens, sampling=_sampling(config),
                                desc="CMB-Clin")
  answers: list[list[str]] = [[] for _ in cases]
  for (c, _), samples in zip(asks, texts):
    answers[c].append(samples[0])
  records = build_records(cases, answers)
  summary = summarize(records)
  summary.update(counts=counts, settings=runner.settings(config, ("max_new_tokens", "min_new_tokens", "repetition_penalty", "clin")))
  files.write_json_atomic(os.path.join(out_dir, "results.json"), {"summary": summary, "records": records})
  files.write_json_atomic(os.path.join(out_dir, "answers.json"),
                          [{"id": case["id"], "answers": case_answers} for case, case_answers in zip(cases, answers)])
  rows = [["ROUGE-L", summary["rougeL"]], ["BLEU-1", summary["bleu1"]]]
  counts_text = ", ".join(f"{k}={v}" for k, v in counts.items())
  table = (f"CMB-Clin ({summary['protocol']})\n" + reporting.markdown_table(["metric", "%"], rows)
           + f"questions={summary['n']}, {counts_text}\n")
  files.write_text_atomic(os.path.join(out_dir, "results.md"), table)
  return summary, table


def _report_cells(results: Mapping[str, Any]) -> dict[str, float]:
  return {"rougeL": results["summary"]["rougeL"], "bleu1": results["summary"]["bleu1"]}


def _sampling(config: ml_collections.ConfigDict) -> engine.Sampling:
  try:
    return engine.Sampling(repetition_penalty=config.repetition_penalty, min_new_tokens=config.min_new_tokens)
  except ValueError as error:
    raise runner.EvalConfigError(f"config: {error}") from error


BENCHMARK = runner.Benchmark(
    name="cmb_clin", inputs=(("clin", lambda c: True),), result_name=lambda config: "cmb_clin",
    run=run, report_cells=_report_cells, validate=_sampling, load=load_inputs, sampling=_sampling)
