"""MedS-Bench against the official code (MAGIC-AI4Med/MedS-Ins `Evaluation/`, `Metrics/`):
the published prompts rebuilt, metrics on the shared CSV, each official script's rules."""

import json
import re
import subprocess
import sys
import types
from pathlib import Path

import jieba
import pytest
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge import Rouge

from configs.eval import meds_bench as meds_config
from csft_jax.configuration import resolve_path
from csft_jax.data import meds_ins
from csft_jax.data.config import DEMO_TOKENIZER
from csft_jax.data.templates import load_chat_template
from csft_jax.data.tokenizer import load_tokenizer
from csft_jax.eval import meds_bench, runner
from tests.data_fixtures import template
from tests.test_eval_metrics import nltk_word_tokenize  # noqa: F401  (a fixture)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "meds_bench"
SHARED_CSV = SHARED / "eval_results_Rationale_1_context_1_oriINS_MMedS-Llama3.csv"
SAMPLE_DIR = REPO / "csft_jax" / "assets" / "eval" / "meds_sample"

needs_shared = pytest.mark.skipif(not SHARED_CSV.exists(), reason="../shared MedS-Bench CSV not present")
# The published results predate EvalDataset.py's "ouput" -> "output" fix; our prompt says "output".
PUBLISHED_SUFFIX = meds_ins.SHOT_INSTRUCTION.replace("to output.", "to ouput.")
LLAMA3_PROMPT = re.compile(
  r"<\|begin_of_text\|><\|start_header_id\|>system<\|end_header_id\|>\n\n(.*)<\|eot_id\|>"
  r"<\|start_header_id\|>user<\|end_header_id\|>\n\nInput:\n(.*)\nOutput:<\|eot_id\|>"
  r"<\|start_header_id\|>assistant<\|end_header_id\|>\n\n",
  re.S,
)


@pytest.fixture(scope="module")
def shared_rows():
  return meds_bench.read_results_csv(SHARED_CSV)


def prompt_parts(prompt: str, definition: str):
  """(3 shots, instance input) out of a published Llama-3 prompt whose definition is known."""
  system, query = LLAMA3_PROMPT.fullmatch(prompt).groups()
  ending = "\n\n\n" + definition + PUBLISHED_SUFFIX
  assert system.endswith(ending)
  cases = system[: -len(ending)].removeprefix("Input:\n").split("\n\n\nInput:\n")
  shots = [dict(zip(("input", "output"), case.split("\n\nOutput:\n"))) for case in cases]
  assert len(shots) == 3 and all(len(s) == 2 for s in shots)
  return shots, query


@needs_shared
def test_published_prompts_rebuilt_from_their_parts(shared_rows):
  definitions = json.loads((SHARED / "RewriteDefinitions.json").read_text(encoding="utf-8"))
  llama3 = template("llama3")
  rebuilt = 0
  for row in shared_rows:
    definition = definitions[row["task_id"]]["original_def"]
    shots, query = prompt_parts(row["input"], definition)
    task = {
      "task_id": row["task_id"],
      "Definition": [definition],
      "Instances": [{"input": s["input"], "output": [s["output"]]} for s in shots],
    }
    messages = meds_bench.build_messages(task, {"input": query, "output": [row["GT"]]}, shots=task["Instances"])
    assert messages[1]["content"].endswith("\nOutput:\n")  # stripped only by the Llama-3 template
    prompt = llama3.render_prompt(messages)
    assert prompt.replace(meds_ins.SHOT_INSTRUCTION, PUBLISHED_SUFFIX) == row["input"]
    rebuilt += 1
  assert rebuilt == 300


@pytest.fixture(scope="module")
def shared_results():
  return meds_bench.score_results(SHARED_CSV)


# Percent, with the real English punkt model; `python -m csft_jax.eval.meds_bench score` prints them.
SHARED_NUMBERS = {
  "task51": (51.50, 35.35),
  "task52": (48.63, 38.22),
  "task53": (47.69, 39.24),
  "task54": (53.31, 36.83),
  "task55": (34.91, 23.71),
  "task56": (47.14, 36.42),
}


@needs_shared
def test_shared_csv_numbers_per_task_and_as_rationale_py_writes_them(shared_results):
  tasks = shared_results["tasks"]
  assert list(tasks) == list(SHARED_NUMBERS)
  official = shared_results["official"]
  assert list(official) == ["Rationale.py"]
  for task_id, (bleu1, rouge_l) in SHARED_NUMBERS.items():
    assert tasks[task_id]["category"] == meds_bench.RATIONALE and tasks[task_id]["script"] == "Rationale.py"
    assert tasks[task_id]["n"] == 50 and tasks[task_id]["n_empty"] == 0
    assert round(tasks[task_id]["bleu1"], 2) == bleu1 and round(tasks[task_id]["rougeL"], 2) == rouge_l
    assert official["Rationale.py"][task_id] == {"bleu1": tasks[task_id]["bleu1"], "rougeL": tasks[task_id]["rougeL"]}
  average = official["Rationale.py"]["Avg."]
  assert average["bleu1"] == pytest.approx(sum(tasks[t]["bleu1"] for t in SHARED_NUMBERS) / 6)
  assert (round(average["bleu1"], 2), round(average["rougeL"], 2)) == (47.20, 34.96)
  assert "text_generation" not in shared_results["categories"]


@needs_shared
def test_shared_csv_english_and_chinese_equal_a_direct_computation(shared_results, shared_rows, nltk_word_tokenize):
  """Rationale.py's loop written out with nltk.word_tokenize (NLTK loading the English model) and jieba."""
  for task_id, tokenize in (("task52", nltk_word_tokenize), ("task51", lambda text: list(jieba.cut(text)))):
    bleu, rouge_l = [], []
    for row in (r for r in shared_rows if r["task_id"] == task_id):
      out, gt = row["output"].strip(), row["GT"].strip()
      bleu.append(
        sentence_bleu(
          [tokenize(gt)], tokenize(out), smoothing_function=SmoothingFunction().method1, weights=(1, 0, 0, 0)
        )
      )
      if task_id == "task51":
        out, gt = " ".join(jieba.cut(out)), " ".join(jieba.cut(gt))
      rouge_l.append(Rouge().get_scores(out, gt)[0]["rouge-l"]["f"])
    assert shared_results["tasks"][task_id]["bleu1"] == pytest.approx(100 * sum(bleu) / 50, abs=1e-9)
    assert shared_results["tasks"][task_id]["rougeL"] == pytest.approx(100 * sum(rouge_l) / 50, abs=1e-9)


def test_select_shots_from_instances_seeded():
  task = meds_bench.load_task(SAMPLE_DIR / "task901_sample_mcqa_en.json")
  instance = task["Instances"][0]
  shots = meds_bench.select_shots(task, instance)
  assert len(shots) == meds_bench.NUM_SHOTS
  assert all(s in task["Instances"] for s in shots)
  assert shots == meds_bench.select_shots(task, instance)
  draws = {seed: [meds_bench.select_shots(task, i, seed=seed) for i in task["Instances"]] for seed in (0, 1)}
  assert draws[0] != draws[1]  # the seed changes the draw
  system = meds_bench.build_messages(task, instance, shots=shots)[0]["content"]
  assert system.startswith("Input:\nQuestion: ")
  assert system.endswith(
    task["Definition"][0] + "Please learn from the few-shot cases to see what content you have to output."
  )


def test_prompts_cut_at_model_max_length_on_the_right_as_eval_py():
  config = meds_config.get_config()
  assert (config.model_max_length, config.truncation_side) == (2048, "right")
  config.task_dir = str(SAMPLE_DIR)
  assert meds_bench.requests(config, meds_bench.load_task_dir(SAMPLE_DIR)).cut == (2048, "right")
  messages = [{"role": "system", "content": "s " * 40}, {"role": "user", "content": "Input:\nq\nOutput:\n"}]
  full = template("chatml").encode_prompt(messages)
  assert len(full) > 16
  assert runner.cut_prompt(full, 16, "right") == full[:16] and runner.cut_prompt(full, 16, "left") == full[-16:]
  assert runner.cut_prompt(full, len(full), "right") == full


# ------------------------------------------------------- the official rules, by hand ----


def write_csv(path, rows):
  """rows: (task_id, GT, output) as raw CSV text cells (an empty cell is written as nothing)."""

  def cell(text):
    return '"' + text.replace('"', '""') + '"' if text else ""

  path.write_text(
    "task_id,input,GT,output\n" + "".join(f"{t},q,{cell(g)},{cell(o)}\n" for t, g, o in rows), encoding="utf-8"
  )
  return path


def test_cells_read_with_pandas_defaults(tmp_path):
  values = ["", "NA", "N/A", "None", "null", "nan", "#N/A", "<NA>", " ", "none", "No"]
  rows = meds_bench.read_results_csv(write_csv(tmp_path / "r.csv", [("task4", "A", v) for v in values]))
  assert [r["output"] for r in rows] == [None] * 8 + [" ", "none", "No"]


def test_nan_becomes_the_string_nan_where_a_script_calls_str(tmp_path):
  # MCQA.py: str(NaN) = "nan", whose first letter is "n": a "no" for the yes/no task123.
  path = write_csv(
    tmp_path / "r.csv",
    [
      ("task123", "no", "None"),
      ("task123", "no", ""),
      ("task123", "yes", "N/A"),
      ("task123", "yes", "Yes."),
      ("task4", "The right answer is A", " "),  # blank: MCQA.py crashes on pred[0]; wrong here
      ("task4", "The right answer is A", "a"),
      ("task41", "nan", "NA"),  # NatureLanguageInference.py: "nan" in "nan"
      ("task1", "5 mg", "NULL"),
    ],
  )
  results = meds_bench.score_results(path)
  tasks = results["tasks"]
  assert tasks["task123"]["accuracy"] == 75.0 and tasks["task123"]["n_empty"] == 3
  assert tasks["task4"]["accuracy"] == 50.0 and tasks["task4"]["n_empty"] == 1
  assert tasks["task41"]["accuracy"] == 100.0 and tasks["task1"]["accuracy"] == 0.0
  mcqa = results["official"]["MCQA.py"]
  assert list(mcqa) == list(meds_bench.OFFICIAL_SCRIPTS["MCQA.py"][meds_bench.MCQA])  # no Avg.: see official_results
  assert mcqa["task123"] == 75.0 and mcqa["task4"] == 50.0 and mcqa["task5"] == 0
  assert results["official"]["NatureLanguageInference.py"]["NLI"] == {"task41": 100.0, "Avg.": 100.0}
  assert results["official"]["InformationExtraction.py"]["Avg."] == 0.0


EXACT, OTHER = "chest pain radiating to the left arm", "alpha beta gamma"


def test_strip_and_skip_rules_per_script(tmp_path):
  path = write_csv(
    tmp_path / "r.csv",
    [
      # Rationale.py strips both sides and skips what is then empty; NaN crashes it: skipped.
      ("task52", EXACT, f"\n  {EXACT}  \n"),
      ("task52", EXACT, "   "),
      ("task52", EXACT, ""),
      # ConceptExplanation.py: no strip; NaN skipped; a blank output counts (scores 0).
      ("task18", EXACT, EXACT),
      ("task18", EXACT, "   "),
      ("task18", EXACT, ""),
      # TextSummarization.py: every row counts; NaN crashes word_tokenize: 0 here.
      ("task78", EXACT, EXACT),
      ("task78", EXACT, ""),
      # evaluate_nli_gen: as summarization.
      ("task42", EXACT, OTHER),
      # FactVerification.py BLEU task: lower-cased, '.' dropped from GT, empty output counts 0.
      ("task100", "Supported.", "SUPPORTED"),
      ("task100", "Supported.", "  "),
    ],
  )
  tasks = meds_bench.score_results(path)["tasks"]
  expected = {
    "task52": (1, 100.0, 2),
    "task18": (2, 50.0, 2),
    "task78": (2, 50.0, 1),
    "task42": (1, 0.0, 0),
    "task100": (2, 50.0, 1),
  }
  for task_id, (n, bleu1, n_empty) in expected.items():
    assert (tasks[task_id]["n"], tasks[task_id]["n_empty"]) == (n, n_empty), task_id
    assert tasks[task_id]["bleu1"] == pytest.approx(bleu1), task_id
    assert tasks[task_id]["rougeL"] == pytest.approx(bleu1, abs=1e-6), task_id


def test_ner_skips_rows_whose_output_is_not_a_string(tmp_path):
  path = write_csv(
    tmp_path / "r.csv",
    [
      ("task125", "hypertension, sepsis.", "hypertension, sepsis."),
      ("task125", "asthma.", ""),  # NaN output: skipped, its gold entity is not a false negative
      ("task126", "asthma.", "N/A"),  # also NaN
      ("task126", "asthma.", "x."),
    ],
  )  # a string: one false positive, one false negative
  results = meds_bench.score_results(path)
  assert results["tasks"]["task125"]["f1"] == 100.0 and results["tasks"]["task125"]["n"] == 1
  assert results["tasks"]["task126"]["f1"] == 0.0 and results["tasks"]["task126"]["n"] == 1
  assert results["official"]["NamedEntityRecognition.py"] == {
    "task125": 100.0,
    "task126": 0.0,
    "task127": 0.0,
    "task128": 0.0,
    "Avg.": 25.0,
  }


def test_diagnosis_pools_every_row(tmp_path):
  path = write_csv(
    tmp_path / "r.csv",
    [
      ("task901", "The diagnosis result is pneumonia.", "Pneumonia"),
      ("task902", "The diagnosis result is asthma.", "asthma"),
      ("task902", "gout.", "no idea"),
      ("task902", "gout.", ""),
    ],
  )  # NaN: Diagnosis.py's .lower() crashes; wrong here
  results = meds_bench.score_results(path, task_categories={"task901": "diagnosis", "task902": "diagnosis"})
  assert results["tasks"]["task901"]["accuracy"] == 100.0
  assert results["tasks"]["task902"]["accuracy"] == pytest.approx(100 / 3)
  assert results["tasks"]["task902"]["script"] == "Diagnosis.py"
  assert results["official"] == {"Diagnosis.py": {"Accuracy": 50.0}}  # 2 of 4 rows, not the mean of tasks
  assert results["categories"]["diagnosis"]["accuracy"] == pytest.approx((100 + 100 / 3) / 2)  # ours


def test_text_summarization_ct_mri_pools_and_average(tmp_path):
  path = write_csv(
    tmp_path / "r.csv",
    [
      ("task78", EXACT, EXACT),
      ("task78", EXACT, OTHER),
      ("task83", EXACT, EXACT),
      *[("task84", EXACT, OTHER)] * 3,
      ("task89", EXACT, EXACT),
    ],
  )
  results = meds_bench.score_results(path)
  table = results["official"]["TextSummarization.py"]
  assert list(table) == ["task78", "task114", "task112", "task110", "CT", "MRI", "Avg."]
  assert table["task78"]["bleu1"] == pytest.approx(50.0)
  assert table["task114"] == {"bleu1": -1.0, "rougeL": -1.0}  # absent: the script's placeholder
  assert table["CT"]["bleu1"] == pytest.approx(25.0)  # 1 of 4 pooled rows, not (100 + 0) / 2
  assert table["MRI"]["rougeL"] == pytest.approx(100.0, abs=1e-6)
  assert table["Avg."]["bleu1"] == pytest.approx((50.0 - 3) / 4)  # over the four it lists, -1s included
  assert results["tasks"]["task84"]["bleu1"] == 0.0 and results["tasks"]["task83"]["bleu1"] == pytest.approx(100)


# The default task lists of the official Metrics/*.py, typed from those scripts.
OFFICIAL_LISTS = {
  "mcqa": "4 5 6 8 9 57 58 59 60 61 122 123 129",
  "rationale": "51 52 53 54 55 56",
  "concept_explanation": "18 46 50",
  "text_summarization": "78 114 112 110 " + " ".join(map(str, range(83, 95))),
  "nli": "41",
  "nli_generation": "42",
  "ner": "125 126 127 128",
  "text_classification": "106",
  "information_extraction": "1 2 3 29 74",
  "treatment_planning": "131",
  "clinical_outcome": "117 118 119",
  "fact_verification": "12 16",
  "fact_verification_generation": "100",
}


def test_category_inferred_from_the_official_task_lists(tmp_path):
  expected = {f"task{n}": family for family, numbers in OFFICIAL_LISTS.items() for n in numbers.split()}
  assert meds_bench.OFFICIAL_TASK_CATEGORIES == expected
  assert meds_bench.resolve_categories(["task52", "task131"]) == {
    "task52": "rationale",
    "task131": "treatment_planning",
  }
  with pytest.raises(meds_bench.MedSInputError, match=r"task52 is in the task list of the official Rationale.py"):
    meds_bench.resolve_categories(["task52"], task_categories={"task52": "mcqa"})
  with pytest.raises(meds_bench.MedSInputError, match=r"No metric category for \['task999'\]"):
    meds_bench.resolve_categories(["task999"])
  assert meds_bench.task_language("task18", {"task18": {"Output_language": ["Chinese"]}}) == "en"  # script: 'en'
  assert meds_bench.task_language("task55") == "ru"


def test_results_json_has_tasks_and_official_per_script(tmp_path, capsys):
  path = write_csv(
    tmp_path / "r.csv",
    [
      ("task12", "Supported.", "supported\nbecause"),
      ("task16", "refuted", "Supported"),
      ("task100", "Supported.", "supported"),
      ("task106", "inducing angiogenesis", "Inducing angiogenesis."),
      ("task117", "true", "True"),
      ("task131", "The treatment planning is: metformin.", "metformin daily"),
    ],
  )
  out = tmp_path / "res.json"
  assert meds_bench.score_command(str(path), str(out)) == 0
  results = json.loads(out.read_text(encoding="utf-8"))
  assert set(results) == {"tasks", "official", "categories", "n_rows"}
  official = results["official"]
  assert official["FactVerification.py"] == {
    "task12": 100.0,
    "task16": 0.0,
    "task100": {"bleu1": pytest.approx(100), "rougeL": pytest.approx(100)},
  }
  assert official["TextClassification.py"] == {"precision": 10.0, "recall": 10.0, "f1_score": 10.0}
  assert official["ClinicalOutcomePrediction.py"] == {
    "task117": 100.0,
    "task118": 0,
    "task119": 0,
    "Avg.": pytest.approx(100 / 3),
  }
  assert official["TreatmentPlanning.py"] == {"task131": 100.0, "Avg.": 100.0}
  printed = capsys.readouterr().out
  assert "| FactVerification.py | task100 | 100.00/100.00 |" in printed
  assert "| task106 | text_classification | TextClassification.py | en | 1 | 0 |" in printed


def sample_rows(output_for):
  rows = []
  for task in meds_bench.load_task_dir(SAMPLE_DIR).values():
    for instance in task["Instances"]:
      gold = meds_ins.answer(instance["output"])
      rows.append(
        {
          "task_id": task["task_id"],
          "input": instance["input"],
          "GT": gold,
          "output": output_for(task["task_id"], gold),
        }
      )
  return rows


def test_sample_tasks_scored_by_their_categories(tmp_path):
  path = meds_bench.write_results_csv(sample_rows(lambda task_id, gold: gold), tmp_path / "r.csv")
  results = meds_bench.score_results(path, task_dir=SAMPLE_DIR)
  tasks = results["tasks"]
  assert tasks["task901"]["category"] == meds_bench.MCQA and tasks["task901"]["accuracy"] == 100.0
  assert tasks["task902"]["category"] == meds_bench.TEXT_GENERATION and tasks["task902"]["language"] == "zh"
  assert tasks["task902"]["script"] == "ours"
  assert tasks["task902"]["bleu1"] == pytest.approx(100.0) and tasks["task902"]["rougeL"] == pytest.approx(100.0)
  assert tasks["task903"]["category"] == meds_bench.NER and tasks["task903"]["f1"] == 100.0
  assert results["n_rows"] == 16 and results["official"] == {}  # no task of an official list


def test_sample_tasks_hand_computed(tmp_path):
  def output_for(task_id, gold):
    if task_id == "task901":
      return "The right answer is A" if "C: Vitamin C" in gold or "B: Pancreas" in gold else gold
    if task_id == "task902":
      return ""  # all empty: read as NaN, skipped as ConceptExplanation.py skips them, and reported
    return "hypertension." if gold.startswith("hypertension") else gold

  path = meds_bench.write_results_csv(sample_rows(output_for), tmp_path / "r.csv")
  tasks = meds_bench.score_results(path, task_dir=SAMPLE_DIR)["tasks"]
  assert tasks["task901"]["accuracy"] == pytest.approx(100 * 4 / 6)
  assert tasks["task902"]["n"] == 0 and tasks["task902"]["n_empty"] == 5 and tasks["task902"]["bleu1"] == 0.0
  # NER: row 1 predicts {"hypertensio"} vs {"hypertension", "type 2 diabete"}: tp 0 fp 1 fn 2;
  # the other 4 rows match 1+2+1+2 = 6 entities. P = 6/7, R = 6/8.
  precision, recall = 6 / 7, 6 / 8
  assert tasks["task903"]["f1"] == pytest.approx(100 * 2 * precision * recall / (precision + recall))


def test_results_csv_round_trip(tmp_path):
  rows = [{"task_id": "task52", "input": 'a, "quoted"\nmulti-line', "GT": "x", "output": "y,\nz"}]
  path = meds_bench.write_results_csv(rows, tmp_path / "out" / "r.csv")
  assert meds_bench.read_results_csv(path) == rows
  with pytest.raises(meds_bench.MedSInputError, match=r"missing \['output'\]"):
    meds_bench.write_results_csv([{"task_id": "t", "input": "", "GT": ""}], tmp_path / "bad.csv")
  assert not (tmp_path / "bad.csv").exists()


def test_bad_results_csv(tmp_path):
  path = tmp_path / "r.csv"
  path.write_text("task_id,input,GT\ntask52,a,b\n", encoding="utf-8")
  with pytest.raises(meds_bench.MedSInputError, match=r"lacks \['output'\]"):
    meds_bench.read_results_csv(path)
  path.write_text("task_id,GT,input,output\ntask52,a,b,c\n", encoding="utf-8")
  with pytest.raises(meds_bench.MedSInputError, match="out of order"):
    meds_bench.read_results_csv(path)
  path.write_text("task_id,input,GT,output\n,a,b,c\n", encoding="utf-8")
  with pytest.raises(meds_bench.MedSInputError, match="data row 1 has no task_id"):
    meds_bench.read_results_csv(path)
  path.write_text("task_id,input,GT,output\ntask999,a,b,c\n", encoding="utf-8")
  with pytest.raises(meds_bench.MedSInputError, match=r"No metric category for \['task999'\]"):
    meds_bench.score_results(path)
  assert meds_bench.score_results(path, task_categories={"task999": "nli"})["tasks"]["task999"]["accuracy"] == 0.0
  with pytest.raises(meds_bench.MedSInputError, match="not found"):
    meds_bench.read_results_csv(tmp_path / "missing.csv")


def test_bad_task_file(tmp_path):
  (tmp_path / "task7_x.json").write_text(json.dumps({"Definition": ["d"], "Instances": [{"input": "x"}]}))
  with pytest.raises(meds_bench.MedSInputError, match=r"Instances\[0\] needs 'input' and 'output'"):
    meds_bench.load_task_dir(tmp_path)
  (tmp_path / "task7_x.json").write_text(json.dumps({"Instances": []}))
  with pytest.raises(meds_bench.MedSInputError, match="'Definition' must be a non-empty list"):
    meds_bench.load_task(tmp_path / "task7_x.json")
  assert meds_ins.task_id_from_path("dir/task51_rationale_zh.json") == "task51"


def test_cli(tmp_path, capsys):
  results_csv = meds_bench.write_results_csv(sample_rows(lambda task_id, gold: gold), tmp_path / "r.csv")
  out = tmp_path / "res.json"

  def score_cli(*args):  # as the README says to run it
    return subprocess.run(
      [sys.executable, "-m", "csft_jax.score", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )

  done = score_cli("meds_bench", f"--results={results_csv}", f"--out={out}", f"--task_dir={SAMPLE_DIR}")
  assert done.returncode == 0, done.stderr
  assert json.loads(out.read_text(encoding="utf-8"))["tasks"]["task901"]["accuracy"] == 100.0
  assert "| task901 | mcqa | ours | en | 6 | 0 | 100.00 |" in done.stdout
  unknown = score_cli("cmb_clinic", "--out=x.json")
  assert unknown.returncode == 1 and "with BENCHMARK one of ['cmb', 'meds_bench'] (got 'cmb_clinic')" in unknown.stderr
  bad_out = tmp_path / "bad.json"
  assert meds_bench.score_command(str(results_csv), str(bad_out)) == 2
  assert "No metric category" in capsys.readouterr().err and not bad_out.exists()
  assert meds_bench.score_command(str(results_csv), str(bad_out), category=["task901=essay"]) == 2
  assert "expected TASK=CATEGORY" in capsys.readouterr().err


def _llama3_style_tokenizer(directory):
  """The demo tokenizer with Llama-3's post-processor: `tokenizer(text)` puts <|begin_of_text|> first."""
  import tokenizers

  source = Path(resolve_path(DEMO_TOKENIZER))
  directory.mkdir()
  for name in ("tokenizer.json", "tokenizer_config.json"):
    (directory / name).write_bytes((source / name).read_bytes())
  backend = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
  bos = backend.token_to_id(meds_bench.LLAMA3_BOS)
  backend.post_processor = tokenizers.processors.TemplateProcessing(
    single=f"{meds_bench.LLAMA3_BOS} $A", special_tokens=[(meds_bench.LLAMA3_BOS, bos)]
  )
  backend.save(str(directory / "tokenizer.json"))
  return load_tokenizer(str(directory)), bos


def _engine_prompts(tokenizer, template_name, config, tasks, out_dir, monkeypatch) -> list[list[int]]:
  """The prompt ids the engine gets when the runner asks MedS-Bench's requests, as `evaluate` does
  (the engine stubbed: every reply stops at once)."""
  seen = []

  def generate(model, prompts, max_new_tokens, stop_ids, *, on_prompt_done, **options):
    del model, max_new_tokens, options
    seen.extend(prompts)
    for j in range(len(prompts)):
      on_prompt_done(j, [[stop_ids[0]]])
    return types.SimpleNamespace(num_compilations=0, stopped=False)

  monkeypatch.setattr(runner.engine, "generate", generate)
  monkeypatch.setattr(runner.engine, "prompt_limit", lambda model, max_new_tokens, max_prompt_len: 1 << 30)
  chat = runner.ChatModel(
    None, tokenizer, load_chat_template(template_name, tokenizer), mesh=None, batch_size=1, max_prompt_len=None
  )
  runner.run(meds_bench.BENCHMARK, chat, config, str(out_dir), tasks)
  return seen


def test_llama3_prompt_ids_are_eval_pys_two_bos(tmp_path, monkeypatch):
  """eval.py: `tokenizer(input_sentence, max_length=2048, truncation=True)` on a prompt whose text
  begins with <|begin_of_text|>: two BOS tokens (the default); the switch gives the template's one."""
  tokenizer, bos = _llama3_style_tokenizer(tmp_path / "tok")
  config = meds_config.get_config()
  config.task_dir = str(SAMPLE_DIR)
  tasks = meds_bench.load_task_dir(SAMPLE_DIR)
  asked = meds_bench.requests(config, tasks)
  # A Llama-3 tokenizer with the llama3 template; a Qwen-style one (adds no BOS) with chatml.
  for name, family_tokenizer in (("llama3", tokenizer), ("chatml", load_tokenizer(DEMO_TOKENIZER))):
    ids = _engine_prompts(family_tokenizer, name, config, tasks, tmp_path / name, monkeypatch)
    texts = [load_chat_template(name, family_tokenizer).render_prompt(m) for m in asked.conversations]
    assert ids == [family_tokenizer(t, max_length=2048, truncation=True)["input_ids"] for t in texts]
    assert [p[:2] == [bos, bos] for p in ids] == [name == "llama3"] * len(ids)
  config.llama3_double_bos = False
  ids = _engine_prompts(tokenizer, "llama3", config, tasks, tmp_path / "single", monkeypatch)
  assert len(ids) == len(asked.conversations) and all(p[0] == bos and p[1] != bos for p in ids)
