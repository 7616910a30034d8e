"""The user's workflow end to end, through the command lines the README gives.

A pretrained HF checkpoint (a tiny Qwen2 saved by transformers, with the real Qwen BPE tokenizer of
../shared/tokenizers/qwen) -> `python -m csft_jax.train` with `init.from_hf` on the shared
collection -> SIGTERM mid-run -> the HF directory deleted -> the same command resumes and finishes
-> its `hf_export/` loads in transformers with the last checkpoint's logits and stops `generate` at
the end of the turn -> `python -m csft_jax.evaluate` on CMB and MedS-Bench from the workdir and from
the export gives identical answers -> `python -m csft_jax.report` shows both benchmarks.
"""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from csft_jax import checkpointing
from csft_jax.workdir import RunDir
from tests import REPO_ROOT
from tests.hf_models import TINY

QWEN_TOKENIZER = os.path.join(REPO_ROOT, "..", "shared", "tokenizers", "qwen")
NUM_STEPS = 12
TRAIN_FLAGS = [
  "--config=configs/collection_shared.py",
  "--config.data.tokenizer=",
  "--config.data.seq_len=96",
  "--config.data.val_fraction=0.0",
  "--config.model.dtype=float32",
  "--config.train.num_steps=12",
  "--config.train.global_batch_size=8",
  "--config.train.log_every=1",
  "--config.train.export_hf=hf_export",
  "--config.checkpoint.every_steps=2",
  "--config.checkpoint.keep=3",
]

pytestmark = pytest.mark.skipif(not os.path.isdir(QWEN_TOKENIZER), reason="needs ../shared/tokenizers/qwen")


def _env() -> dict[str, str]:
  return {**os.environ, "PYTHONUNBUFFERED": "1"}


def _python(*args: str, check: bool = True) -> subprocess.CompletedProcess:
  done = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=900)
  if check:
    assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-4000:])
  return done


def _pretrained_qwen2(path) -> transformers.PreTrainedModel:
  """The "downloaded" checkpoint: a tiny random Qwen2 whose vocabulary fits the real Qwen tokenizer."""
  torch.manual_seed(0)
  config = transformers.Qwen2Config(**{**TINY, "vocab_size": 151936}, tie_word_embeddings=True, rope_theta=10000.0)
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  model.save_pretrained(path)
  transformers.AutoTokenizer.from_pretrained(QWEN_TOKENIZER).save_pretrained(path)
  return model


def _train_until_sigterm(workdir: str, hf_dir: str) -> str:
  """Starts the trainer, sends SIGTERM once step 2 is logged, returns its output."""
  process = subprocess.Popen(
    [sys.executable, "-m", "csft_jax.train", *TRAIN_FLAGS, f"--config.init.from_hf={hf_dir}", f"--workdir={workdir}"],
    cwd=REPO_ROOT,
    env=_env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  lines = []
  for line in process.stdout:
    lines.append(line)
    if line.startswith(f"step  2/{NUM_STEPS}") or line.startswith(f"step 2/{NUM_STEPS}"):
      process.send_signal(signal.SIGTERM)
  assert process.wait(timeout=900) == 0, "".join(lines)[-4000:]
  return "".join(lines)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp("workflow")
  hf_dir, workdir = str(root / "qwen2_pretrained"), str(root / "runs" / "sft")
  _pretrained_qwen2(hf_dir)

  first = _train_until_sigterm(workdir, hf_dir)
  assert f"started from config.init.from_hf={hf_dir}" in first
  assert "SIGTERM received: saved step" in first
  interrupted = RunDir(workdir).read_summary()
  assert interrupted["status"] == "interrupted" and 2 <= interrupted["step"] < NUM_STEPS

  shutil.rmtree(hf_dir)  # the init source is gone: the resume must not need it
  second = _python("-m", "csft_jax.train", *TRAIN_FLAGS, f"--config.init.from_hf={hf_dir}", f"--workdir={workdir}")
  assert f"resumed from step {interrupted['step']}" in second.stderr
  summary = RunDir(workdir).read_summary()
  assert summary["status"] == "finished" and summary["step"] == NUM_STEPS
  return root, workdir, interrupted["step"]


def test_resume_continues_the_interrupted_run(trained):
  _, workdir, stopped_at = trained
  with open(RunDir(workdir).metrics, encoding="utf-8") as f:
    steps = [json.loads(line)["step"] for line in f if '"loss"' in line]
  # Steps after the interruption were logged once each, right after the saved step.
  assert steps[-(NUM_STEPS - stopped_at) :] == list(range(stopped_at + 1, NUM_STEPS + 1))
  assert os.path.isfile(os.path.join(RunDir(workdir).tokenizer, "tokenizer.json"))  # the run's own copy


def test_export_loads_in_transformers_with_the_checkpoints_logits_and_stops_at_end_of_turn(trained):
  _, workdir, _ = trained
  export = RunDir(workdir).hf_export()
  model, info = transformers.AutoModelForCausalLM.from_pretrained(export, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  ours = checkpointing.restore_model(workdir, dtype="float32")
  tokens = np.asarray([[151644, 872, 198, 100, 2000, 30000, 151645, 198, 151644, 77091, 198]], np.int32)
  with torch.no_grad():
    reference = model(torch.from_numpy(tokens).long()).logits.numpy()
  np.testing.assert_allclose(np.asarray(ours(tokens)), reference, atol=1e-4, rtol=1e-4)

  tokenizer = transformers.AutoTokenizer.from_pretrained(export)
  im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
  assert model.generation_config.eos_token_id == [im_end, tokenizer.convert_tokens_to_ids("<|endoftext|>")]
  prompt = tokenizer.apply_chat_template(
    [{"role": "user", "content": "头痛怎么办？"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
  )["input_ids"]
  # The export's template is the one it trained with (chatml, no default system prompt).
  assert tokenizer.decode(prompt[0]) == "<|im_start|>user\n头痛怎么办？<|im_end|>\n<|im_start|>assistant\n"

  class EndTurnAtThirdToken(transformers.LogitsProcessor):
    """Makes the model say <|im_end|> as its third token: generate must stop there."""

    def __call__(self, input_ids, scores):
      if input_ids.shape[1] - prompt.shape[1] == 2:
        scores[:, :] = -1e9
        scores[:, im_end] = 0.0
      return scores

  out = model.generate(
    prompt,
    max_new_tokens=20,
    do_sample=False,
    logits_processor=transformers.LogitsProcessorList([EndTurnAtThirdToken()]),
  )
  assert out.shape[1] == prompt.shape[1] + 3 and int(out[0, -1]) == im_end


def _evaluate(eval_config: str, checkpoint: str, *extra: str) -> None:
  _python(
    "-m",
    "csft_jax.evaluate",
    f"--config={eval_config}",
    f"--config.checkpoint={checkpoint}",
    "--config.max_new_tokens=8",
    "--config.batch_size=8",
    *extra,
  )


def test_evaluate_from_workdir_and_export_agree_and_report_shows_both(trained):
  root, workdir, _ = trained
  run_dir = RunDir(workdir)
  export_out = str(root / "export_eval")
  _evaluate("configs/eval/cmb.py", workdir)
  _evaluate(
    "configs/eval/cmb.py", run_dir.hf_export(), f"--config.out_dir={export_out}/cmb", "--config.scan_layers=True"
  )
  from_run = json.loads(
    open(os.path.join(run_dir.eval_dir("cmb-answer", f"step_{NUM_STEPS}"), "generations.json"), encoding="utf-8").read()
  )
  from_export = json.loads(open(os.path.join(export_out, "cmb", "generations.json"), encoding="utf-8").read())
  assert len(from_run) == 24 and from_run == from_export

  _evaluate("configs/eval/meds_bench.py", workdir)
  _evaluate(
    "configs/eval/meds_bench.py",
    run_dir.hf_export(),
    f"--config.out_dir={export_out}/meds",
    "--config.scan_layers=True",
  )
  with open(
    os.path.join(run_dir.eval_dir("meds_bench", f"step_{NUM_STEPS}"), "results.csv"), encoding="utf-8", newline=""
  ) as f:
    rows_run = list(csv.DictReader(f))
  with open(os.path.join(export_out, "meds", "results.csv"), encoding="utf-8", newline="") as f:
    rows_export = list(csv.DictReader(f))
  assert len(rows_run) == 16 and rows_run == rows_export  # same prompts (templates agree) and same outputs

  report = _python("-m", "csft_jax.report", f"--workdir={os.path.dirname(workdir)}")
  with open(os.path.join(os.path.dirname(workdir), "summary.csv"), encoding="utf-8") as f:
    header, row = list(csv.reader(f))[:2]
  assert row[0] == "sft" and row[header.index("status")] == "finished"
  cmb_micro = float(row[header.index("cmb-answer/micro")])
  assert cmb_micro == pytest.approx(
    100 * json.load(open(run_dir.eval_results("cmb-answer", f"step_{NUM_STEPS}")))["overall"]["micro"]
  )
  assert any(h.startswith("meds_bench/") for h in header)
  assert "cmb-answer/micro" in report.stdout
