"""`python -m csft_jax.evaluate` end to end on the shipped samples with a tiny random model."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from configs.eval import cmb as cmb_config
from configs.eval import cmb_clin as cmb_clin_config
from configs.eval import meds_bench as meds_config
from csft_jax import evaluate, loading
from csft_jax.eval import cmb, runner
from tests import run_local_processes
from tests.hf_models import TINY

REPO = Path(__file__).resolve().parents[1]
DEMO_TOKENIZER = REPO / "csft_jax" / "assets" / "demo_tokenizer"
SAMPLE_ITEMS = 24
EXAM_TYPES = {"医师考试", "护理考试", "药师考试"}


def _tiny_llama_dir(path: Path, *, silent: bool = False) -> str:
  """A random Llama sized for the demo tokenizer, saved with that tokenizer (template 'hf')."""
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(DEMO_TOKENIZER))
  torch.manual_seed(0)
  config = transformers.LlamaConfig(**{**TINY, "vocab_size": len(tokenizer), "max_position_embeddings": 1024})
  model = transformers.AutoModelForCausalLM.from_config(config)
  if silent:
    # All-zero logits: argmax is token 0 = <|endoftext|>, a stop token, so every reply is empty.
    with torch.no_grad():
      model.lm_head.weight.zero_()
  model.save_pretrained(path)
  tokenizer.save_pretrained(path)
  return str(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
  return _tiny_llama_dir(tmp_path_factory.mktemp("tiny_llama"))


def _evaluate_cmb(model_dir: str, *flags: str) -> subprocess.CompletedProcess:
  """`python -m csft_jax.evaluate --config=configs/eval/cmb.py` on `model_dir` with `flags`; it must exit 0."""
  command = [
    sys.executable,
    "-m",
    "csft_jax.evaluate",
    "--config=configs/eval/cmb.py",
    f"--config.checkpoint={model_dir}",
  ]
  done = subprocess.run([*command, *flags], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  return done


def _config(module, checkpoint: str, out_dir: Path, **fields):
  config = module.get_config()
  config.checkpoint, config.out_dir, config.batch_size = checkpoint, str(out_dir), 8
  config.update(fields)
  return config


def test_cli_cmb_writes_results_and_prints_summary(model_dir):
  done = _evaluate_cmb(model_dir, "--config.max_new_tokens=4", "--config.batch_size=8")
  assert "overall micro" in done.stdout and f"items={SAMPLE_ITEMS}" in done.stdout
  assert "CMB answer" in done.stderr  # the progress bar
  out = Path(model_dir) / "eval" / "cmb-answer"  # default: <checkpoint>/eval/<benchmark>-<mode>
  results = json.loads((out / "results.json").read_text())
  assert set(results["accuracy_per_category"]) == EXAM_TYPES
  assert sum(len(classes) for classes in results["accuracy_per_subcategory"].values()) == 6
  assert results["counts"]["items"] == results["counts"]["prompts"] == SAMPLE_ITEMS
  assert results["counts"]["truncated_prompts"] == 0
  assert 0 <= results["overall"]["micro"] <= 1 and results["protocol"] == cmb.OFFICIAL_PROTOCOL
  submission = json.loads((out / "submission.json").read_text())
  assert [e["id"] for e in submission] == list(range(1, SAMPLE_ITEMS + 1))
  assert (out / "results.md").exists()
  # Scoring the written submission again reproduces results.json.
  key = cmb.load_answer_key(REPO / "csft_jax/assets/eval/cmb_sample/answer_key.json")
  assert cmb.score_submission(submission, key)["overall"] == results["overall"]


def test_greedy_answers_are_the_same_at_every_batch_size_and_batching(model_dir, tmp_path):
  """Through the evaluate CLI: batch sizes 16 and 5, static and continuous batching, the default prefill
  attention (blockwise on CPU) and dense `xla`: one set of answers."""
  generations = {}
  for batch_size, batching, attention in ((16, "static", "auto"), (5, "static", "xla"), (5, "continuous", "auto")):
    out = tmp_path / f"{batching}_{batch_size}"
    _evaluate_cmb(
      model_dir,
      "--config.max_new_tokens=12",
      f"--config.batch_size={batch_size}",
      f"--config.batching={batching}",
      f"--config.attention_impl={attention}",
      f"--config.out_dir={out}",
    )
    generations[(batch_size, batching)] = json.loads((out / "generations.json").read_text())
  first = generations[(16, "static")]
  assert len(first) == SAMPLE_ITEMS and all(g == first for g in generations.values())


def test_cmb_majority_vote_over_samples(model_dir, tmp_path):
  config = _config(cmb_config, model_dir, tmp_path, shots=1, num_samples=3, temperature=1.0, max_new_tokens=4, limit=4)
  results, _, _ = evaluate.run(config)
  records = json.loads((tmp_path / "generations.json").read_text())
  assert len(records) == 4 and all(len(r["samples"]) == 3 for r in records)
  items = {item["id"]: item for item in cmb.load_exam(REPO / "csft_jax/assets/eval/cmb_sample/test.json")}
  for record in records:
    assert record["model_answer"] == cmb.predict(record["samples"], items[record["id"]]["question_type"])
  assert results["counts"]["items"] == 4 and results["settings"]["num_samples"] == 3


def test_cmb_loglik_mode_scores_every_option(model_dir, tmp_path):
  results, summary, _ = evaluate.run(_config(cmb_config, model_dir, tmp_path, mode="loglik"))
  assert results["protocol"] == cmb.LOGLIK_PROTOCOL and results["counts"]["items"] == SAMPLE_ITEMS
  answers = {e["id"]: e["model_answer"] for e in json.loads((tmp_path / "submission.json").read_text())}
  for record in json.loads((tmp_path / "generations.json").read_text()):
    scores = record["option_scores"]
    assert all(value < 0 for value in scores.values())
    assert answers[record["id"]] == cmb.loglik_answer(scores)
  assert "log-likelihood" in summary


def test_empty_generations_and_overlong_prompts_are_counted(tmp_path):
  silent_dir = _tiny_llama_dir(tmp_path / "silent", silent=True)
  results, summary, _ = evaluate.run(
    _config(cmb_config, silent_dir, tmp_path / "out", max_prompt_len=32, max_new_tokens=4)
  )
  counts = results["counts"]
  assert counts["empty_generations"] == SAMPLE_ITEMS and counts["correct"] == 0
  assert counts["truncated_prompts"] == SAMPLE_ITEMS  # every sample prompt is longer than 32 tokens
  assert "empty_generations=24" in summary


def test_meds_bench_writes_csv_then_scores_it(model_dir, tmp_path):
  results, summary, _ = evaluate.run(_config(meds_config, model_dir, tmp_path, max_new_tokens=6))
  with open(tmp_path / "results.csv", encoding="utf-8", newline="") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 16 and list(rows[0]) == ["task_id", "input", "GT", "output"]
  assert rows[0]["input"].startswith("<|im_start|>system\n")
  assert set(results["tasks"]) == {"task901", "task902", "task903"}
  assert set(results["categories"]) == {"mcqa", "text_generation", "ner"}
  assert results["counts"]["prompts"] == 16
  written = json.loads((tmp_path / "results.json").read_text())
  assert written["tasks"]["task901"]["n"] == 6 and "accuracy" in written["tasks"]["task901"]
  assert "mcqa" in summary


def test_cmb_clin_writes_judge_prompts(model_dir, tmp_path):
  results, text, _ = evaluate.run(_config(cmb_clin_config, model_dir, tmp_path, max_new_tokens=4))
  written = json.loads((tmp_path / "results.json").read_text())
  assert results == written and results["summary"]["n"] == len(written["records"]) == 5
  assert all("[ answer ]" in record["judge_prompt"] for record in written["records"])
  assert "ROUGE-L" in text
  assert (tmp_path / "results.md").read_text(encoding="utf-8") == text  # the table a person reads
  answers = json.loads((tmp_path / "answers.json").read_text(encoding="utf-8"))
  assert [a for case in answers for a in case["answers"]] == [r["answer"] for r in written["records"]]


def test_bad_configs_fail_with_a_message_and_write_nothing(model_dir, tmp_path):
  with pytest.raises(runner.EvalConfigError, match="config.checkpoint is empty"):
    evaluate.run(_config(cmb_config, "", tmp_path / "a"))
  with pytest.raises(runner.EvalConfigError, match="config.mode"):
    evaluate.run(_config(cmb_config, model_dir, tmp_path / "b", mode="guess"))
  with pytest.raises(runner.EvalConfigError, match="config.exam="):
    evaluate.run(_config(cmb_config, model_dir, tmp_path / "c", exam=str(tmp_path / "missing.json")))
  with pytest.raises(loading.LoadError, match="does not exist"):
    evaluate.run(_config(cmb_config, str(tmp_path / "nowhere"), tmp_path / "d"))
  with pytest.raises(runner.EvalConfigError, match=r"config.attention_impl='flash'; choose one of \('auto', 'xla'"):
    evaluate.run(_config(cmb_config, model_dir, tmp_path / "f", attention_impl="flash"))
  blocker = tmp_path / "blocker"
  blocker.write_text("a file where the output directory's parent should be")
  with pytest.raises(PermissionError, match=r"config.out_dir .*cannot write to .*blocker.* is not a directory"):
    evaluate.run(_config(cmb_config, model_dir, blocker / "out"))  # refused before the model loads
  not_a_list = tmp_path / "exam.json"
  not_a_list.write_text("{}")
  with pytest.raises(cmb.CMBInputError, match="expected a JSON list"):
    evaluate.run(_config(cmb_config, model_dir, tmp_path / "e", exam=str(not_a_list)))
  assert not any((tmp_path / name).exists() for name in "abcdef")


def test_two_processes_generate_what_one_process_does(model_dir, tmp_path):
  """2 local processes x 2 devices (gloo) shard the batch rows and gather the same answers."""
  common = [
    "--config=configs/eval/cmb.py",
    f"--config.checkpoint={model_dir}",
    "--config.max_new_tokens=4",
    "--config.batch_size=8",
  ]
  single = subprocess.run(
    [sys.executable, "-m", "csft_jax.evaluate", *common, f"--config.out_dir={tmp_path / 'one'}"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4"),
  )
  assert single.returncode == 0, single.stderr[-3000:]
  run_local_processes(["-m", "csft_jax.evaluate", *common, f"--config.out_dir={tmp_path / 'two'}"], timeout=300)
  one = json.loads((tmp_path / "one" / "generations.json").read_text())
  two = json.loads((tmp_path / "two" / "generations.json").read_text())
  assert one == two
