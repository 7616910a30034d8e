"""The meds_ins source: task files -> instances -> InsDataset conversations; recipe and demo configs; CLIs."""

import json
import os
import random
import subprocess
import sys

import ml_collections
import pytest

from configs import meds_ins_demo, meds_ins_llama3_8b
from csft_jax import configuration
from csft_jax.data import meds_ins
from csft_jax.data.conversation import Conversation
from csft_jax.data.errors import DataError
from csft_jax.data.sources import load_conversations, parse_sources
from csft_jax.eval import meds_bench
from tests import REPO_ROOT

SHARED_REWRITES = os.path.join(REPO_ROOT, "..", "shared", "data", "meds_bench", "RewriteDefinitions.json")
FEW_SHOT_SENTENCE = "Please learn from the few-shot cases to see what content you have to output."

# Three tasks: pretty-printed with rewrites; one JSON line, two definitions, absent from the rewrite
# table (draws from its own Definition list); two instances only (fewer than 3 shots), an empty
# rewrite list (keeps Definition[0]).
TASKS = {
  "task7_alpha_mcqa_en.json": dict(
    definition=["Pick the right option and answer with its letter."],
    split="Train",
    pretty=True,
    instances=[(f"Question {i}: which organ makes insulin?\nA. liver\nB. pancreas", ["B"]) for i in range(5)],
  ),
  "task8_beta_explain_zh.json": dict(
    definition=["用一句话解释下面的医学名词。", "请简要解释这个医学术语。"],
    split="Train/Test",
    pretty=False,
    instances=[(f"名词{i}：心律失常", [f"心跳的节律或频率异常{i}。", "另一个答案"]) for i in range(4)],
  ),
  "task9_gamma_ner_en.json": dict(
    definition=["List the disease names in the sentence, separated by commas."],
    split="Test",
    pretty=True,
    instances=[
      ("The patient has asthma and diabetes.", ["asthma, diabetes"]),
      ("No history of hypertension.", ["hypertension"]),
    ],
  ),
}
REWRITES = {
  "task7": {
    "original_def": ["(ignored: the task file's Definition wins)"],
    "auto_rewrite_def": [
      "Choose the correct option; reply with the letter.",
      "Answer with the letter of the best option.",
      "Which option is right? Give its letter.",
    ],
  },
  "task9": {"original_def": ["x"], "auto_rewrite_def": []},
}


def _task_object(spec: dict, task_id: str) -> dict:
  return {
    "Contributors": ["test"],
    "Categories": ["Test category"],
    "Definition": spec["definition"],
    "Input_language": ["English"],
    "Split Type": spec["split"],
    "Instances": [{"id": f"{task_id}-{i}", "input": x, "output": y} for i, (x, y) in enumerate(spec["instances"])],
  }


def _write_tasks(directory, tasks=TASKS, rewrites=REWRITES) -> str:
  os.makedirs(directory, exist_ok=True)
  for name, spec in tasks.items():
    task = _task_object(spec, name.split("_")[0])
    text = json.dumps(task, ensure_ascii=False, indent=2 if spec["pretty"] else None)
    (directory / name).write_text(text + "\n", encoding="utf-8")
  (directory / "RewriteDefinitions.json").write_text(json.dumps(rewrites, ensure_ascii=False), encoding="utf-8")
  return str(directory)


def _load(directory, on_error="raise", **options):
  options.setdefault("rewrite_definitions", f"{directory}/RewriteDefinitions.json")
  sources = ml_collections.ConfigDict(dict(m=meds_ins.source_config(f"{directory}/task*.json", **options)))
  (spec,) = parse_sources(sources)
  return load_conversations(spec, on_error)


def _official_insdataset(directory, rewrites, original_ins_possibility, no_context_possibility, seed):
  """InsDataset (MAGIC-AI4Med/MedS-Ins, Evaluation/EvalDataset.py) restated: per instance in file order,
  (system, user, response) of its Llama-3 messages. Its module-level `random` is replaced by a
  generator per (seed, task, instance), the draws made in the same order."""
  out = []
  for name in sorted(n for n in os.listdir(directory) if n.startswith("task")):
    task_id = name.split("_")[0]
    with open(os.path.join(directory, name), encoding="utf-8") as f:
      data = json.load(f)
    definition = {
      "original_def": data["Definition"],
      "auto_rewrite_def": rewrites[task_id]["auto_rewrite_def"] if task_id in rewrites else data["Definition"],
    }
    pool = data["Instances"]
    for index, case in enumerate(pool):
      rng = random.Random(f"{seed}|{task_id}|{index}")
      if rng.random() <= original_ins_possibility:
        instruction = definition["original_def"][0]
      else:
        try:
          instruction = rng.sample(definition["auto_rewrite_def"], 1)[0]
        except ValueError:  # An empty rewrite list.
          instruction = definition["original_def"][0]
      if rng.random() <= no_context_possibility:
        query = case["input"]
      else:
        shots = rng.sample(pool, min(len(pool), 3))
        cases = ["Input:\n" + s["input"] + "\n" + "\n" + "Output:\n" + s["output"][0] + "\n" for s in shots]
        instruction = "\n\n".join(cases) + "\n\n" + instruction + FEW_SHOT_SENTENCE
        query = "Input:\n" + case["input"] + "\n" + "Output:\n"
      out.append((instruction, query, case["output"][0]))
  return out


@pytest.mark.parametrize("rewrite_prob,few_shot_prob", [(0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0), (0.5, 0.5)])
def test_conversations_match_the_official_insdataset_construction(tmp_path, rewrite_prob, few_shot_prob):
  directory = _write_tasks(tmp_path)
  records, stats = _load(directory, rewrite_prob=rewrite_prob, few_shot_prob=few_shot_prob, seed=3)
  expected = _official_insdataset(directory, REWRITES, 1.0 - rewrite_prob, 1.0 - few_shot_prob, seed=3)
  got = [(r.conversation.system, r.conversation.turns[0][1], r.conversation.turns[1][1]) for r in records]
  assert [tuple(t[0] for t in r.conversation.turns) for r in records] == [("user", "assistant")] * 11
  assert got == expected
  assert stats.records == 11 and stats.left_out == 0
  few_shot = sum(FEW_SHOT_SENTENCE in system for system, _, _ in got)
  rewritten = sum(_definition_used(r.conversation.system) != r.record["definition"] for r in records)
  assert few_shot == {0.0: 0, 1.0: 11}.get(few_shot_prob, few_shot)
  assert rewritten == 0 if rewrite_prob == 0.0 else rewritten > 0
  if rewrite_prob == few_shot_prob == 0.5:  # The mix holds every kind.
    assert 0 < few_shot < 11 and 0 < rewritten < 11


def _definition_used(system: str) -> str:
  """The definition in a system turn: all of a zero-shot one, the part after the cases of a 3-shot one."""
  return system.removesuffix(FEW_SHOT_SENTENCE).rsplit("\n\n", 1)[-1]


def test_zero_shot_and_three_shot_conversations_by_hand(tmp_path):
  directory = _write_tasks(tmp_path)
  zero = {r.record["id"]: r.conversation for r in _load(directory)[0]}
  assert zero["task7-1"] == Conversation(
    "Pick the right option and answer with its letter.",
    (("user", "Question 1: which organ makes insulin?\nA. liver\nB. pancreas"), ("assistant", "B")),
  )
  assert zero["task8-2"].turns[1] == ("assistant", "心跳的节律或频率异常2。")  # output[0]
  shot = {r.record["id"]: r.conversation for r in _load(directory, few_shot_prob=1.0)[0]}["task9-1"]
  cases = [
    "Input:\nThe patient has asthma and diabetes.\n\nOutput:\nasthma, diabetes\n",
    "Input:\nNo history of hypertension.\n\nOutput:\nhypertension\n",
  ]
  tail = "\n\nList the disease names in the sentence, separated by commas." + FEW_SHOT_SENTENCE
  assert shot.system in {"\n\n".join(cases) + tail, "\n\n".join(cases[::-1]) + tail}  # 2 instances: 2 shots
  assert shot.turns == (("user", "Input:\nNo history of hypertension.\nOutput:\n"), ("assistant", "hypertension"))


def test_records_carry_task_fields_and_lines(tmp_path):
  directory = _write_tasks(tmp_path)
  records, _ = _load(directory)
  first = records[0].record
  assert {k: first[k] for k in ("task_id", "id", "definition", "categories", "split_type", "instance_index")} == dict(
    task_id="task7",
    id="task7-0",
    definition="Pick the right option and answer with its letter.",
    categories=("Test category",),
    split_type="Train",
    instance_index=0,
  )
  pretty = (tmp_path / "task7_alpha_mcqa_en.json").read_text(encoding="utf-8").splitlines()
  for r in records[:5]:  # Each instance's '{' line of the pretty-printed file.
    id_line = pretty.index(f'      "id": "{r.record["id"]}",') + 1
    assert (r.location.line, r.location.item) == (id_line - 1, r.record["instance_index"] + 1)
  assert [(r.location.line, r.location.item) for r in records[5:9]] == [(1, 1), (1, 2), (1, 3), (1, 4)]  # One line.


def test_rewritten_definitions_from_the_shared_file(tmp_path):
  shared = json.load(open(SHARED_REWRITES, encoding="utf-8"))
  directory = _write_tasks(tmp_path, tasks={"task51_rationale_zh.json": TASKS["task8_beta_explain_zh.json"]})
  records, _ = _load(directory, rewrite_definitions=SHARED_REWRITES, rewrite_prob=1.0)
  assert {r.conversation.system for r in records} <= set(shared["task51"]["auto_rewrite_def"])


def test_choices_are_a_function_of_seed_task_and_instance(tmp_path):
  directory = _write_tasks(tmp_path)
  mix = dict(rewrite_prob=0.5, few_shot_prob=0.5)
  runs = {seed: [r.conversation for r in _load(directory, seed=seed, **mix)[0]] for seed in (1, 2)}
  assert [r.conversation for r in _load(directory, seed=1, **mix)[0]] == runs[1]
  assert runs[1] != runs[2]
  # A record's conversation does not depend on what was read before it.
  assert [r.conversation for r in _load(directory, seed=1, max_samples=4, **mix)[0]] == runs[1][:4]
  # Renamed, task7 becomes task99 and is read between task8 and task9: the others keep their
  # conversations, task99 draws anew.
  (tmp_path / "task7_alpha_mcqa_en.json").rename(tmp_path / "task99_alpha_mcqa_en.json")
  moved = [r.conversation for r in _load(directory, seed=1, **mix)[0]]
  assert moved[:4] + moved[9:] == runs[1][5:] and moved[4:9] != runs[1][:5]
  # The configs link the source's seed to config.data.seed.
  config = meds_ins_demo.get_config()
  config.data.seed = 7
  assert configuration.resolve_paths(config).data.sources.meds_ins.seed == 7


def test_split_types_keep_some_tasks_and_an_empty_result_is_an_error(tmp_path):
  directory = _write_tasks(tmp_path)
  records, stats = _load(directory, split_types=("Train", "Train/Test"))
  assert [r.record["task_id"] for r in records] == ["task7"] * 5 + ["task8"] * 4
  assert (stats.records, stats.left_out) == (11, 2)
  no_test = _write_tasks(tmp_path / "no_test", tasks={k: v for k, v in TASKS.items() if v["split"] != "Test"})
  with pytest.raises(
    DataError,
    match=r"leave out 9 of its 9 records.*task 'task7'.*Split Type 'Train', not one of "
    r"split_types=\['Test'\]",
  ):
    _load(no_test, split_types=("Test",))
  with pytest.raises(DataError, match=r"split_types=\['train'\]: \['train'\] not among the Split Types"):
    _load(directory, split_types=("train",))


def test_bad_task_files_name_the_file_and_instance(tmp_path):
  directory = _write_tasks(tmp_path)
  path = tmp_path / "task7_alpha_mcqa_en.json"
  task = json.loads(path.read_text(encoding="utf-8"))
  del task["Instances"][2]["output"]
  path.write_text(json.dumps(task, indent=2), encoding="utf-8")
  line = path.read_text(encoding="utf-8").splitlines().index('      "id": "task7-2",')  # 1-based '{' line
  with pytest.raises(
    DataError,
    match=rf"task7_alpha_mcqa_en.json:{line} \(item 3\): task 'task7' instance 'task7-2': "
    r"has no 'output'",
  ):
    _load(directory)
  records, stats = _load(directory, on_error="skip", few_shot_prob=1.0)
  assert stats.skipped == 1 and len(records) == 10
  assert not any("Question 2:" in r.conversation.system for r in records)  # Never a few-shot case either.
  del task["Instances"]
  path.write_text(json.dumps(task), encoding="utf-8")
  with pytest.raises(DataError, match=r"task7_alpha_mcqa_en.json: task file has no 'Instances' \(fields: "):
    _load(directory)
  path.write_text(json.dumps([task]), encoding="utf-8")
  with pytest.raises(DataError, match=r"task7_alpha_mcqa_en.json:1 expected a JSON object"):
    _load(directory)
  sources = ml_collections.ConfigDict(dict(m=meds_ins.source_config(f"{directory}/task8*.json", reader="json")))
  with pytest.raises(
    DataError,
    match=r"source 'm': its format reads its files with its own reader; remove "
    r"reader='json'",
  ):
    load_conversations(parse_sources(sources)[0], "raise")


def test_the_few_shot_prompt_is_the_evaluated_one(tmp_path):
  directory = _write_tasks(tmp_path)
  task = meds_bench.load_task(tmp_path / "task7_alpha_mcqa_en.json")
  shots = task["Instances"][1:4]
  system, user = meds_ins.few_shot_prompt(task["Definition"][0], shots, task["Instances"][0]["input"])
  evaluated = meds_bench.build_messages(task, task["Instances"][0], shots=shots)
  # The published results spell the last word "ouput"; InsDataset's code spells it right.
  assert [system, user] == [m["content"].replace("to ouput.", "to output.") for m in evaluated]
  del directory


def test_recipe_config_and_its_data_section(tmp_path):
  directory = _write_tasks(tmp_path)
  config = meds_ins_llama3_8b.get_config(f"mesh=v5p-8,model_dir=/models/llama3,data_dir={directory}")
  assert (config.data.seq_len, config.train.global_batch_size, config.optim.lr, config.train.num_epochs) == (
    2048,
    128,
    1e-5,
    5.0,
  )
  assert (config.data.chat_template, config.init.from_hf, config.model.vocab_size) == (
    "llama3",
    "/models/llama3",
    128256,
  )
  for preset, (mesh, accum) in meds_ins_llama3_8b.MESH_PRESETS.items():
    devices = mesh["data"] * mesh["fsdp"] * mesh["tensor"]
    assert 128 % accum == 0 and (128 // accum) % devices == 0, preset
  (spec,) = parse_sources(configuration.resolve_paths(config).data.sources)
  records, stats = load_conversations(spec, "raise")  # task*.json: not RewriteDefinitions.json; no Test task.
  assert (len(records), stats.left_out) == (9, 2)
  rewrites = set(REWRITES["task7"]["auto_rewrite_def"])
  assert any(r.conversation.system.removesuffix(FEW_SHOT_SENTENCE).split("\n\n")[-1] in rewrites for r in records)


def _run(*args: str) -> str:
  env = {**os.environ, "PYTHONPATH": REPO_ROOT}
  return subprocess.run(
    [sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300, check=True
  ).stdout


def test_inspect_the_demo_config():
  stdout = _run(
    "-m", "csft_jax.data.inspect", "--config=configs/meds_ins_demo.py", "--num_batches=2", "--num_examples=4", "--json"
  )
  summary = json.loads(stdout.strip().splitlines()[-1])
  assert list(summary["sources"]) == ["meds_ins"] and summary["sources"]["meds_ins"]["examples"] == 36  # 40 - 4 val
  assert summary["seq_len"] == 1024 and summary["sources"]["meds_ins"]["dropped"] == 0
  # Examples 0-2 are zero-shot, 3 is 3-shot (seed 0); the answer is the trained text.
  assert stdout.count("--- meds_ins example") == 4 and stdout.count(FEW_SHOT_SENTENCE) == 1
  zero_shot = (
    "<|im_start|>user\n反复咳嗽、咳痰两周，夜间加重，偶有低热。<|im_end|>\n<|im_start|>assistant\n"
    "[[呼吸内科<|im_end|>]]"
  )
  assert zero_shot in stdout
  assert "<|im_start|>user\nInput:\n突发一侧肢体无力、口角歪斜，说话含糊。\nOutput:\n<|im_end|>" in stdout


def test_decontaminate_against_medsbench_task_files(tmp_path):
  bench = tmp_path / "meds_bench"
  bench.mkdir()
  leaked = "Why are antibiotics not useful for the common cold?"
  task = {"Definition": ["Answer briefly."], "Instances": [{"id": "b0", "input": leaked, "output": ["-"]}]}
  (bench / "task1_bench_en.json").write_text(json.dumps(task, indent=2), encoding="utf-8")
  out = tmp_path / "filtered"
  stdout = _run(
    "tools/decontaminate.py",
    "--config=configs/meds_ins_demo.py",
    f"--benchmark=meds:{bench}",
    f"--write_filtered={out}",
    "--json",
  )
  report = json.loads(stdout.strip().splitlines()[-1])["sources"]["meds_ins"]
  # Only the instance itself, not the instances whose 3-shot prompts borrow it.
  assert (report["examples"], report["contaminated"]) == (40, 1)
  assert report["first"][0]["location"].endswith("task1002_sample_medication_qa_en.json:1 (item 9)")
  records, _ = _load(out / "meds_ins", rewrite_definitions="")
  assert len(records) == 39 and leaked not in {r.record["input"] for r in records}
  assert sorted(os.listdir(out / "meds_ins")) == [
    "task1001_sample_triage_zh.json",
    "task1002_sample_medication_qa_en.json",
  ]
