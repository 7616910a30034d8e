"""CMB-Exam: prompts, official extraction, majority vote, scoring as score.py, strict validator, CLI."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from configs.eval import cmb as cmb_config
from csft_jax.eval import cmb

REPO = Path(__file__).resolve().parents[1]
SHARED_KEY = REPO.parent / "shared" / "data" / "cmb" / "CMB-test-choice-answer.json"
SAMPLE = REPO / "csft_jax" / "assets" / "eval" / "cmb_sample"
S, M = cmb.SINGLE_CHOICE, cmb.MULTI_CHOICE

needs_shared_key = pytest.mark.skipif(not SHARED_KEY.exists(), reason="../shared CMB answer key not present")


def official_reference(text: str, question_type: str) -> str:
  """Independent transcription of the official procedure (src/utils.py match_choice + extract_ans)."""
  found = re.search("(答案|正确选项)(?:是|：|为|应该是|应该为)(.*?)(。|\\.|$)", text, re.DOTALL)
  pool = found.group(2) if found else text
  choice = "".join(ch for ch in pool if ch in ["A", "B", "C", "D", "E", "F", "G"])
  if len(choice) > 1 and question_type != "多项选择题":
    choice = choice[0]
  return choice


PHRASINGS = [
  # (text, expected single-choice answer, expected multi-choice answer)
  ("答案是A。", "A", "A"),
  ("正确选项为：B、D", "B", "BD"),
  ("A项错误，因为该药无此作用；B项正确，符合指南。所以答案是B。", "B", "B"),
  ("选项D描述错误，答案为A。", "A", "A"),
  ("正确答案是ACD。", "A", "ACD"),
  ("答案应该是E", "E", "E"),
  ("答案应该为C和D。其余错误。", "C", "CD"),
  ("答案是 B. 因为其余选项与题干不符", "B", "B"),
  ("答案：A", "A", "A"),
  ("答案是：B", "B", "B"),
  ("分析：\nA. 正确\nB. 错误\nC. 正确\n正确选项是：A、C、E\n", "A", "ACE"),
  ("The answer is C.", "C", "C"),
  ("Answer: B", "A", "AB"),  # no Chinese cue: every A-G capital counts, 'A' of 'Answer' first
  ("Option A is wrong. Therefore, the correct option is D.", "A", "AD"),
  ("答案:A", "A", "A"),  # half-width colon is not a cue; the fallback still finds A
  ("答案是。", "", ""),  # a cue with nothing after it gives no answer (no fallback)
  ("我不确定这道题。", "", ""),
  ("", "", ""),
  ("答案是EB。", "E", "EB"),  # letters are kept in written order, never sorted
]


@pytest.mark.parametrize("text,single,multi", PHRASINGS)
def test_extract_answer_literal_expectations(text, single, multi):
  assert cmb.extract_answer(text, S) == single
  assert cmb.extract_answer(text, M) == multi


@pytest.mark.parametrize(
  "text",
  [p[0] for p in PHRASINGS]
  + [
    "综上，答案是B，但也可能是C。",
    "根据题意，正确选项应该是AB.其余不对",
    "Ans: G F",
    "答案为F\n解析略",
  ],
)
def test_extract_answer_matches_official_reference(text):
  for question_type in (S, M):
    assert cmb.extract_answer(text, question_type) == official_reference(text, question_type)


def test_extract_answer_rejects_unknown_question_type():
  with pytest.raises(cmb.CMBInputError, match="unknown question_type '判断题'"):
    cmb.extract_answer("答案是A", "判断题")


@pytest.mark.parametrize(
  "answers,expected",
  [
    (["A", "B", "A"], "A"),
    (["", "", "C"], "C"),
    (["B", "A"], "B"),  # tie: first seen wins, as the official stable sort
    (["C", "A", "A", "C"], "C"),
    (["AB", "AB", "A"], "AB"),
    (["", ""], ""),
    ([], ""),
  ],
)
def test_majority_vote(answers, expected):
  assert cmb.majority_vote(answers) == expected


def test_predict_extracts_then_votes():
  samples = ["所以答案是B。", "答案为C。", "我认为正确选项是B、D", "无法判断"]
  assert cmb.predict(samples, S) == "B"
  assert cmb.predict(samples, M) == "B"  # "B", "C", "BD": all once, B first


ITEM = {
  "id": 7,
  "exam_type": "医师考试",
  "exam_class": "执业医师",
  "exam_subject": "临床执业医师",
  "question": "诊断糖尿病的空腹血糖标准是",
  "question_type": S,
  "option": {"A": "≥5.6mmol/L", "B": "≥6.1mmol/L", "C": "≥7.0mmol/L", "D": "是"},
}


def test_format_question_is_the_official_prompt():
  assert cmb.format_question(ITEM, "answer") == (
    "以下是中国医师考试中执业医师考试的一道单项选择题，不需要做任何分析和解释，直接输出答案选项。\n"
    "诊断糖尿病的空腹血糖标准是\nA. ≥5.6mmol/L\nB. ≥6.1mmol/L\nC. ≥7.0mmol/L"
  )  # option D ("是", one character) is dropped by the official len(v) > 1 filter
  assert cmb.format_question(ITEM, "cot").startswith(
    "以下是中国医师考试中执业医师考试的一道单项选择题，请分析每个选项，并最后给出答案。\n"
  )
  with pytest.raises(ValueError, match="Unknown CMB prompt mode"):
    cmb.format_question(ITEM, "fewshot")


def test_build_messages_zero_and_few_shot():
  val = cmb.load_exam(SAMPLE / "val.json", require_answer=True)
  demos = [v for v in val if v["exam_class"] == "执业医师"][:2]
  assert cmb.build_messages(ITEM) == [{"role": "user", "content": cmb.format_question(ITEM, "answer")}]
  messages = cmb.build_messages(ITEM, mode="cot", shots=demos, system_prompt="你是医学助手。")
  assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
  assert messages[2]["content"] == demos[0]["explanation"] + f"所以答案是{demos[0]['answer']}。"
  answer_only = cmb.build_messages(ITEM, mode="answer", shots=demos)
  assert answer_only[1]["content"] == f"答案是{demos[0]['answer']}。"
  assert answer_only[0]["content"] == cmb.format_question(demos[0], "answer")


def test_cot_demo_without_explanation_is_an_error():
  demo = {**ITEM, "answer": "C"}
  with pytest.raises(cmb.CMBInputError, match="no 'explanation'"):
    cmb.build_messages(ITEM, mode="cot", shots=[demo])


def test_select_shots_same_type_and_class_deterministic():
  val = cmb.load_exam(SAMPLE / "val.json", require_answer=True)
  test = cmb.load_exam(SAMPLE / "test.json")
  for item in test:
    shots = cmb.select_shots(val, item, 3)
    assert len(shots) == 3
    assert all((s["exam_type"], s["exam_class"]) == (item["exam_type"], item["exam_class"]) for s in shots)
    assert shots == cmb.select_shots(val, item, 3)
  assert cmb.select_shots(val, test[0], 0) == []
  with pytest.raises(cmb.CMBInputError, match="cannot draw 4 shots"):
    cmb.select_shots(val, test[0], 4)


@pytest.mark.parametrize(
  "change,message",
  [
    (lambda item: item.pop("question"), "missing field"),
    (lambda item: item.update(question_type="判断题"), "unknown question_type"),
    (lambda item: item["option"].update(H="选项H"), r"option key\(s\) \['H'\]"),
    (lambda item: item.update(answer="E"), "names an option not in"),
    (lambda item: item.update(answer="AB"), "has several letters"),
  ],
)
def test_load_exam_bad_items(tmp_path, change, message):
  item = json.loads(json.dumps(ITEM))
  change(item)
  path = tmp_path / "bad.json"
  path.write_text(json.dumps([item], ensure_ascii=False), encoding="utf-8")
  with pytest.raises(cmb.CMBInputError, match=message):
    cmb.load_exam(path)


def test_load_exam_bad_files(tmp_path):
  with pytest.raises(cmb.CMBInputError, match="file not found"):
    cmb.load_exam(tmp_path / "missing.json")
  (tmp_path / "broken.json").write_text("[{", encoding="utf-8")
  with pytest.raises(cmb.CMBInputError, match="broken.json:1: not valid JSON"):
    cmb.load_exam(tmp_path / "broken.json")


def test_build_submission_counts_empty_and_unanswered():
  items = [{**ITEM, "id": 1}, {**ITEM, "id": 2}, {**ITEM, "id": 3}]
  submission, stats = cmb.build_submission(items, [["答案是C。"], ["", "  "], ["不知道"]])
  assert submission == [{"id": 1, "model_answer": "C"}, {"id": 2, "model_answer": ""}, {"id": 3, "model_answer": ""}]
  assert stats == {"empty_generations": 1, "no_answer_extracted": 1}
  with pytest.raises(cmb.CMBInputError, match="no 'id'"):
    cmb.build_submission([{k: v for k, v in ITEM.items() if k != "id"}], [["A"]])


def test_loglik_request_and_answer():
  messages, letters = cmb.loglik_request(ITEM)
  assert letters == ["A", "B", "C"]  # the same options the prompt shows
  assert messages == cmb.build_messages(ITEM, mode="answer")
  assert cmb.loglik_answer({"A": -3.0, "B": -0.5, "C": -2.0}) == "B"
  assert cmb.loglik_answer({"C": -1.0, "A": -1.0}) == "A"
  assert "NOT the official" in cmb.LOGLIK_PROTOCOL


TINY_KEY = [
  {"id": 1, "exam_type": "T1", "exam_class": "c1", "question_type": S, "answer": "A"},
  {"id": 2, "exam_type": "T1", "exam_class": "c1", "question_type": S, "answer": "B"},
  {"id": 3, "exam_type": "T1", "exam_class": "c2", "question_type": S, "answer": "C"},
  {"id": 4, "exam_type": "T1", "exam_class": "c2", "question_type": S, "answer": "D"},
  {"id": 5, "exam_type": "T1", "exam_class": "c2", "question_type": M, "answer": "AB"},
  {"id": 6, "exam_type": "T1", "exam_class": "c2", "question_type": M, "answer": "CE"},
  {"id": 7, "exam_type": "T2", "exam_class": "c3", "question_type": S, "answer": "E"},
]


def test_score_exam_type_is_mean_of_classes_hand_computed():
  answers = {1: "A", 2: "C", 3: "C", 4: "D", 5: "AB", 6: "CE", 7: ""}
  submission = [{"id": i, "model_answer": a} for i, a in answers.items()]
  results = cmb.score_submission(submission, TINY_KEY)
  assert results["accuracy_per_subcategory"] == {"T1": {"c1": 0.5, "c2": 1.0}, "T2": {"c3": 0.0}}
  assert results["accuracy_per_category"] == {"T1": 0.75, "T2": 0.0}  # not 5/6: mean of classes
  assert results["overall"] == {"micro": pytest.approx(5 / 7), "macro": 0.375}
  assert results["accuracy_per_question_type"] == {S: pytest.approx(3 / 5), M: 1.0}
  assert results["counts"] == {"items": 7, "correct": 5, "empty_answers": 1}
  assert results["protocol"] == cmb.OFFICIAL_PROTOCOL


def test_multi_choice_needs_exact_letters():
  submission = [{"id": i, "model_answer": e["answer"]} for i, e in enumerate(TINY_KEY, start=1)]
  submission[4]["model_answer"] = "BA"  # same set, different order: wrong under exact match
  submission[5]["model_answer"] = "C"
  results = cmb.score_submission(submission, TINY_KEY)
  assert results["accuracy_per_question_type"][M] == 0.0


def official_score(answer_key: list[dict], submission: list[dict]) -> dict:
  """Independent transcription of the official score.py, reading lists instead of its two files."""
  model_answers = {item["id"]: item["model_answer"] for item in submission}
  stats = {}
  for item in answer_key:
    counts = stats.setdefault(item["exam_type"], {}).setdefault(item["exam_class"], {"correct": 0, "total": 0})
    counts["total"] += 1
    if item["answer"] == model_answers.get(item["id"], ""):
      counts["correct"] += 1
  result = {"accuracy_per_category": {}, "accuracy_per_subcategory": {}}
  for exam_type, classes in stats.items():
    result["accuracy_per_subcategory"][exam_type] = {c: v["correct"] / v["total"] for c, v in classes.items()}
    total = sum(result["accuracy_per_subcategory"][exam_type].values())
    result["accuracy_per_category"][exam_type] = total / len(classes)
  return result


# What the official scorer accepts but the strict validator does not.
MESSY = [
  {"id": 1, "model_answer": "a"},  # lower case: wrong under exact match
  {"id": 3, "model_answer": "C"},
  {"id": 3, "model_answer": "A"},  # a repeated id: the last answer counts (wrong)
  {"id": 4.0, "model_answer": "D"},  # the same dict key as 4: right
  {"id": "5", "model_answer": "AB"},  # not id 5: 5 is missing, "5" is unknown
  {"id": 6, "model_answer": ["C", "E"]},  # not a string: wrong
  {"id": 99, "model_answer": "A"},  # not in the key: ignored
]  # ids 2, 5 and 7 are missing: empty answers, wrong


def test_score_follows_official_score_py_with_warnings(caplog):
  results = cmb.score_submission(MESSY, TINY_KEY)
  official = official_score(TINY_KEY, MESSY)
  assert results["accuracy_per_subcategory"] == official["accuracy_per_subcategory"]
  assert results["accuracy_per_category"] == official["accuracy_per_category"]
  # Hand-computed: c1 = {1: wrong, 2: missing}; c2 = {3: last is A, 4.0: right, 5: missing, 6: list}.
  assert official["accuracy_per_subcategory"] == {"T1": {"c1": 0.0, "c2": 0.25}, "T2": {"c3": 0.0}}
  assert results["counts"] == {"items": 7, "correct": 1, "empty_answers": 3}
  assert results["submission_warnings"] == [
    "1 duplicate id(s), e.g. [3]: the last entry of each counts",
    "3 answer-key id(s) missing, e.g. [2, 5, 7]: scored as empty answers (wrong)",
    "2 id(s) not in the answer key, e.g. ['5', 99]: ignored",
    "2 model_answer(s) not letters A-G, e.g. id 1: 'a', id 6: ['C', 'E']: compared as written (exact match)",
  ]
  assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
    f"CMB submission: {w}, as the official score.py does (--strict refuses it)." for w in results["submission_warnings"]
  ]
  assert "Warning: 3 answer-key id(s) missing" in cmb.markdown_report(results)
  with pytest.raises(cmb.CMBInputError, match="Submission does not match the answer key: 1 duplicate id"):
    cmb.score_submission(MESSY, TINY_KEY, strict=True)


@pytest.mark.parametrize(
  "changes",
  [
    {},
    {0: "B"},
    {0: None},
    {1: ""},
    {4: "BA"},
    {4: "ABC"},
    {6: "e"},
    {6: 5},
  ],
)
def test_score_equals_official_transcription(changes):
  submission = [{"id": e["id"], "model_answer": changes.get(i, e["answer"])} for i, e in enumerate(TINY_KEY)]
  for strict in (False, True):
    if strict and any(not isinstance(a, str) or a.upper() != a for a in changes.values()):
      continue
    results = cmb.score_submission(submission, TINY_KEY, strict=strict)
    official = official_score(TINY_KEY, submission)
    assert results["accuracy_per_subcategory"] == official["accuracy_per_subcategory"]
    assert results["accuracy_per_category"] == official["accuracy_per_category"]


@pytest.mark.parametrize(
  "mutate,message",
  [
    (lambda s: s.pop(), r"1 answer-key id\(s\) missing, e.g. \[7\]"),
    (lambda s: s.append({"id": 3, "model_answer": "C"}), r"1 duplicate id\(s\), e.g. \[3\]"),
    (lambda s: s.append({"id": 99, "model_answer": "A"}), r"1 id\(s\) not in the answer key, e.g. \[99\]"),
    (
      lambda s: s.__setitem__(0, {"id": "1", "model_answer": "A"}),
      r"missing, e.g. \[1\].*not in the answer key, e.g. \['1'\]",
    ),
    (lambda s: s.__setitem__(0, {"id": 1, "model_answer": "H"}), r"not letters A-G, e.g. id 1: 'H'"),
  ],
)
def test_strict_validator_refuses_what_official_scores(mutate, message):
  submission = [{"id": e["id"], "model_answer": e["answer"]} for e in TINY_KEY]
  mutate(submission)
  with pytest.raises(cmb.CMBInputError, match=message):
    cmb.score_submission(submission, TINY_KEY, strict=True)
  with pytest.raises(cmb.CMBInputError, match=message):
    cmb.validate_submission(submission, TINY_KEY)
  results = cmb.score_submission(submission, TINY_KEY)  # scored, with a warning
  assert results["accuracy_per_category"] == official_score(TINY_KEY, submission)["accuracy_per_category"]
  assert len(results["submission_warnings"]) >= 1


@pytest.mark.parametrize(
  "entry,message",
  [
    ({"id": 1}, r"submission entry 0: expected \{\"id\": ..., \"model_answer\": ...\}"),
    ({"model_answer": "A"}, "submission entry 0: expected"),
    ("A", "submission entry 0: expected"),
    ({"id": [1], "model_answer": "A"}, r"submission entry 0: id \[1\] must be a number or a string"),
  ],
)
def test_entries_the_official_scorer_cannot_read_are_errors(entry, message):
  submission = [entry] + [{"id": e["id"], "model_answer": e["answer"]} for e in TINY_KEY[1:]]
  with pytest.raises(cmb.CMBInputError, match=message):
    cmb.score_submission(submission, TINY_KEY)


def test_answer_key_errors():
  with pytest.raises(cmb.CMBInputError, match="duplicate id 1"):
    cmb.validate_answer_key(TINY_KEY + [TINY_KEY[0]])
  with pytest.raises(cmb.CMBInputError, match=r"missing field\(s\) \['answer'\]"):
    cmb.validate_answer_key([{k: v for k, v in TINY_KEY[0].items() if k != "answer"}])
  with pytest.raises(cmb.CMBInputError, match="must be one or more letters A-G"):
    cmb.validate_answer_key([{**TINY_KEY[0], "answer": "Z"}])


@needs_shared_key
def test_shared_key_scores():
  key = cmb.load_answer_key(SHARED_KEY)
  assert len(key) == 11200
  perfect = cmb.score_submission([{"id": e["id"], "model_answer": e["answer"]} for e in key], key)
  assert perfect["overall"] == {"micro": 1.0, "macro": 1.0}
  assert all(v == 1.0 for v in perfect["accuracy_per_category"].values())
  assert len([c for t in perfect["accuracy_per_subcategory"].values() for c in t]) == 28

  all_a = cmb.score_submission([{"id": e["id"], "model_answer": "A"} for e in key], key)
  # Independent count: the share of "A" keys per class, then the mean over the classes of a type.
  classes = {}
  for e in key:
    classes.setdefault(e["exam_type"], {}).setdefault(e["exam_class"], []).append(e["answer"] == "A")
  for exam_type, by_class in classes.items():
    shares = {c: sum(v) / len(v) for c, v in by_class.items()}
    assert all_a["accuracy_per_subcategory"][exam_type] == pytest.approx(shares)
    assert all_a["accuracy_per_category"][exam_type] == pytest.approx(sum(shares.values()) / len(shares))
  n_a = sum(e["answer"] == "A" for e in key)
  assert all_a["counts"]["correct"] == n_a == 1845
  assert all_a["overall"]["micro"] == pytest.approx(n_a / 11200)
  assert all_a["accuracy_per_subcategory"]["医师考试"]["高级职称"] == pytest.approx(38 / 400)


def _score_cli(*args: str) -> subprocess.CompletedProcess:
  """`python -m csft_jax.score cmb ...` as a user runs it, from the repository root."""
  return subprocess.run(
    [sys.executable, "-m", "csft_jax.score", "cmb", *args], cwd=REPO, capture_output=True, text=True, timeout=300
  )


@needs_shared_key
def test_cli_scores_shared_key_as_official_score_py(tmp_path):
  key = json.loads(SHARED_KEY.read_text(encoding="utf-8"))
  # Right for most ids; the first 300 ids missing; 200 ids repeated with a wrong last answer; one
  # unknown id; 50 lower-case answers.
  entries = [{"id": e["id"], "model_answer": e["answer"]} for e in key[300:]]
  entries += [{"id": e["id"], "model_answer": "G"} for e in key[300:500]]
  entries.append({"id": 99999, "model_answer": "A"})
  for entry in entries[1000:1050]:
    entry["model_answer"] = entry["model_answer"].lower()
  submission = tmp_path / "messy.json"
  submission.write_text(json.dumps(entries), encoding="utf-8")
  out = tmp_path / "r" / "results.json"

  done = _score_cli(f"--submission={submission}", f"--answer_key={SHARED_KEY}", f"--out={out}")
  assert done.returncode == 0, done.stderr
  results = json.loads(out.read_text(encoding="utf-8"))
  official = official_score(key, entries)
  assert results["accuracy_per_subcategory"] == official["accuracy_per_subcategory"]
  assert results["accuracy_per_category"] == official["accuracy_per_category"]
  assert results["counts"]["correct"] == 11200 - 300 - 200 - 50 == 10650
  assert results["counts"]["empty_answers"] == 300
  for warning in (
    "200 duplicate id(s)",
    "300 answer-key id(s) missing",
    "1 id(s) not in the answer key",
    "50 model_answer(s) not letters A-G",
  ):
    assert warning in done.stderr
  assert f"| overall micro | {100 * 10650 / 11200:.2f} |" in done.stdout
  assert "Warning: 300 answer-key id(s) missing" in out.with_suffix(".md").read_text(encoding="utf-8")

  strict_out = tmp_path / "strict" / "results.json"
  refused = _score_cli(f"--submission={submission}", f"--answer_key={SHARED_KEY}", f"--out={strict_out}", "--strict")
  assert refused.returncode == 2
  assert "error: Submission does not match the answer key: 200 duplicate id(s)" in refused.stderr
  assert not strict_out.parent.exists()


def test_cli_unreadable_submission_writes_nothing(tmp_path, capsys):
  submission = tmp_path / "bad.json"
  submission.write_text(json.dumps([{"id": 1, "answer": "B"}]), encoding="utf-8")
  out = tmp_path / "results.json"
  code = cmb.score_command(str(submission), str(SAMPLE / "answer_key.json"), str(out))
  assert code == 2
  assert "submission entry 0: expected" in capsys.readouterr().err
  assert list(tmp_path.iterdir()) == [submission]


def test_generation_defaults_are_the_official_configs():
  for mode in ("answer", "cot"):
    config = cmb_config.get_config(mode)
    assert config.max_new_tokens == 512 and config.min_new_tokens == 1
    assert config.temperature == 0.0 and config.num_samples == 1


def test_sample_end_to_end(tmp_path):
  test = cmb.load_exam(SAMPLE / "test.json")
  key = cmb.load_answer_key(SAMPLE / "answer_key.json")
  assert [i["id"] for i in test] == [e["id"] for e in key]
  gold = {e["id"]: e["answer"] for e in key}
  generations = [[f"分析略。所以答案是{gold[i['id']]}。"] if i["id"] % 3 else ["我不知道"] for i in test]
  submission, stats = cmb.build_submission(test, generations)
  path = cmb.write_submission(submission, tmp_path / "submission.json", key)
  assert json.loads(path.read_text(encoding="utf-8")) == submission
  results = cmb.score_submission(submission, key, generation_stats=stats)
  assert results["counts"] == {
    "items": 24,
    "correct": 16,
    "empty_answers": 8,
    "empty_generations": 0,
    "no_answer_extracted": 8,
  }
  cmb.write_results(results, tmp_path / "results.json")
  assert json.loads((tmp_path / "results.json").read_text(encoding="utf-8")) == results
  assert (tmp_path / "results.md").read_text(encoding="utf-8").startswith("Protocol: generation")


def test_the_bundled_answer_key_uses_every_single_choice_letter():
  """A model that always answers the same letter cannot score 0 (or 100) on the sample by accident of the key."""
  key = cmb.load_answer_key(REPO / "csft_jax/assets/eval/cmb_sample/answer_key.json")
  items = {item["id"]: item for item in cmb.load_exam(REPO / "csft_jax/assets/eval/cmb_sample/test.json")}
  single = {entry["answer"] for entry in key if entry["question_type"] == cmb.SINGLE_CHOICE}
  assert single == set("ABCDE")
  assert all(set(entry["answer"]) <= set(items[entry["id"]]["option"]) for entry in key)
