"""The CMB benchmark's own question prompt, as its official code asks it (FreedomIntelligence/CMB,
`workers/base.py`).

Evaluation asks it (`csft_jax.eval.cmb`); a training source can rehearse it (`mcq` with
`prompt="cmb_exam"`), so that a model learns the answer format the benchmark extracts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MODES = ("answer", "cot")

# The official prompts (workers/base.py: query_prompt_2 and query_prompt_1).
ANSWER_ONLY_PROMPT = (
  "以下是中国{exam_type}中{exam_class}考试的一道{question_type}，"
  "不需要做任何分析和解释，直接输出答案选项。\n{question}\n{option_str}"
)
COT_PROMPT = (
  "以下是中国{exam_type}中{exam_class}考试的一道{question_type}，"
  "请分析每个选项，并最后给出答案。\n{question}\n{option_str}"
)


def option_str(options: Mapping[str, str]) -> str:
  """Official option block "A. text\\nB. text".

  Reproduces the official filter `len(v) > 1`: options whose text is a single
  character (or empty) are not shown, exactly as in the official prompts.
  """
  return "\n".join(f"{letter}. {text}" for letter, text in options.items() if len(text) > 1)


def format_question(item: Mapping[str, Any], mode: str = "answer") -> str:
  """The official user prompt for one item: answer-only ('answer') or chain-of-thought ('cot')."""
  if mode not in MODES:
    raise ValueError(f"Unknown CMB prompt mode {mode!r}; expected one of {MODES}.")
  template = ANSWER_ONLY_PROMPT if mode == "answer" else COT_PROMPT
  return template.format(
    exam_type=item["exam_type"],
    exam_class=item["exam_class"],
    question_type=item["question_type"],
    question=item["question"],
    option_str=option_str(item["option"]),
  )
