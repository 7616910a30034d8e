"""CMB-Clin: multi-turn prompts with gold history as the official workers, decoding, judge prompt, proxies."""

import json
import types
from pathlib import Path

import pytest

from configs.eval import cmb_clin as cmb_clin_config
from csft_jax.eval import cmb_clin, engine, runner, text_metrics

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "csft_jax" / "assets" / "eval" / "cmb_sample" / "clin.json"


@pytest.fixture(scope="module")
def cases():
  return cmb_clin.load_clin(SAMPLE)


def test_first_turn_and_gold_history(cases):
  case = cases[0]
  first = cmb_clin.build_messages(case, 0)
  # As every official worker's collate_conv: description and question joined with nothing between.
  assert first == [{"role": "user", "content": case["description"] + case["QA_pairs"][0]["question"]}]
  assert first[0]["content"].startswith(case["description"][:20]) and "以下是一位病人的病例" not in first[0]["content"]
  third = cmb_clin.build_messages(case, 2, system_prompt="你是医生。")
  assert [m["role"] for m in third] == ["system", "user", "assistant", "user", "assistant", "user"]
  assert third[1] == first[0]
  assert third[2]["content"] == case["QA_pairs"][0]["solution"]  # gold, not the model's answer
  assert third[4]["content"] == case["QA_pairs"][1]["solution"]
  assert third[5]["content"] == case["QA_pairs"][2]["question"]
  with pytest.raises(cmb_clin.ClinInputError, match="turn 3 is out of range"):
    cmb_clin.build_messages(case, 3)


def test_judge_prompt_is_official_text_filled_once(cases):
  case = cases[0]
  answer = "可能是阑尾炎。{ question }"  # slot-like text inside an answer must stay literal
  prompt = cmb_clin.judge_prompt(case, 1, answer)
  assert prompt.startswith("You are an AI evaluator specializing in assessing the quality of answers\n")
  assert prompt.endswith(
    "{ \u2018 fluency \u2019: 3 , \u2018 relevance \u2019: 3 , "
    "\u2018 completeness \u2019: 3 , \u2018 proficiency \u2019: 3}"
  )
  assert f"[ description ]\n{case['description']}\n[ end of description ]" in prompt
  history = f"问：{case['QA_pairs'][0]['question']}\n答：{case['QA_pairs'][0]['solution']}\n"
  assert f"[ conversation ]\n{history}\n[ end of conversation ]" in prompt
  assert f"[ question ]\n{case['QA_pairs'][1]['question']}\n[ end of question ]" in prompt
  assert f"[ answer ]\n{answer}\n[ end of answer ]" in prompt
  assert "- a model \u2019 s answer to the question" in prompt
  assert len(cmb_clin.JUDGE_PROMPT.splitlines()) == 54  # as laid out in the README block
  assert "[ conversation ]\n\n[ end of conversation ]" in cmb_clin.judge_prompt(case, 0, "x")


def test_records_and_summary(cases, tmp_path):
  answers = [[p["solution"] for p in cases[0]["QA_pairs"]], ["", "多运动。"]]
  records = cmb_clin.build_records(cases, answers)
  assert len(records) == 5
  assert records[0]["rougeL"] == pytest.approx(1.0, abs=1e-6) and records[0]["bleu1"] == pytest.approx(1.0)
  empty = records[3]
  assert empty["empty"] and empty["rougeL"] == 0.0 and empty["bleu1"] == 0.0
  assert "[ answer ]\n\n[ end of answer ]" in empty["judge_prompt"]  # judged like any other answer
  assert "judge_scores" not in empty  # we never invent a judge's score
  last = records[4]
  assert last["bleu1"] == pytest.approx(text_metrics.bleu1("多运动。", cases[1]["QA_pairs"][1]["solution"], "zh"))
  summary = cmb_clin.write_outputs(records, tmp_path / "clin.json")
  assert summary["n"] == 5 and summary["n_empty"] == 1
  assert summary["bleu1"] == pytest.approx(100 * sum(r["bleu1"] for r in records) / 5)
  saved = json.loads((tmp_path / "clin.json").read_text(encoding="utf-8"))
  assert saved["summary"] == summary and saved["records"][1]["judge_prompt"] == records[1]["judge_prompt"]
  with pytest.raises(cmb_clin.ClinInputError, match="3 questions but 1 answers"):
    cmb_clin.build_records(cases[:1], [["x"]])


def test_bad_clin_file(tmp_path):
  path = tmp_path / "clin.json"
  path.write_text(json.dumps([{"id": 0, "title": "t", "description": "d", "QA_pairs": [{"question": "q"}]}]))
  with pytest.raises(cmb_clin.ClinInputError, match=r"QA_pairs\[0\] needs 'question' and 'solution'"):
    cmb_clin.load_clin(path)
  path.write_text(json.dumps([{"id": 0, "title": "t"}]))
  with pytest.raises(cmb_clin.ClinInputError, match=r"missing field\(s\) \['description', 'QA_pairs'\]"):
    cmb_clin.load_clin(path)


class _RecordingChat:
  """A ChatModel stand-in that records what CMB-Clin asks for and answers '答'."""

  def __init__(self):
    self.calls = []
    self.template = types.SimpleNamespace(render_prompt=str)

  def generate(self, conversations, **options):
    self.calls.append((conversations, options))
    return [["答"] for _ in conversations], {"prompts": len(conversations)}


def test_run_decodes_as_the_official_workers(tmp_path, cases):
  config = cmb_clin_config.get_config()
  assert config.max_new_tokens == 512 and config.repetition_penalty == 1.1
  config.clin = str(SAMPLE)  # The evaluator resolves pkg:// paths when it loads a config file.
  chat = _RecordingChat()
  results, _ = runner.run(cmb_clin.BENCHMARK, chat, config, str(tmp_path), cmb_clin.load_inputs(config))
  summary = results["summary"]
  assert json.loads((tmp_path / "results.json").read_text())["summary"] == summary
  ((conversations, options),) = chat.calls
  assert options["max_new_tokens"] == 512
  assert options["sampling"] == engine.Sampling(temperature=0.0, repetition_penalty=1.1, min_new_tokens=1)
  assert conversations[0] == [
    {"role": "user", "content": cases[0]["description"] + cases[0]["QA_pairs"][0]["question"]}
  ]
  assert len(conversations) == summary["n"] == sum(len(c["QA_pairs"]) for c in cases)
  assert summary["settings"]["repetition_penalty"] == 1.1
  config.repetition_penalty = 0.0
  config.checkpoint = str(tmp_path)  # the sampling is checked before the model loads
  with pytest.raises(cmb_clin.runner.EvalConfigError, match="config: Sampling repetition_penalty=0.0"):
    cmb_clin.runner.validate_config(config)


def test_no_official_judge_script_is_claimed():
  """The CMB repository has no judge script: only the README's judge prompt exists."""
  sources = [*REPO.glob("csft_jax/**/*.py"), *REPO.glob("configs/**/*.py")]
  claims = [str(path) for path in sources if "judge script" in path.read_text(encoding="utf-8").lower()]
  assert claims == []
