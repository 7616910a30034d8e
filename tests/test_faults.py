"""Promises under the faults the world makes, through the command lines a user runs.

A pretrained checkpoint stands in as a demo-shaped model saved in HF format in several safetensors
shards; each test breaks one thing the way a crash, a copy or a person does and checks the promise.
"""

import csv
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

import numpy as np
import pytest
from flax import nnx

from csft_jax import checkpointing, configuration
from csft_jax.models import Decoder
from tests import REPO_ROOT

# The demo config at test size; the model shape is what the HF stand-in below has.
SMALL = [
  "--config=configs/demo.py",
  "--config.model.hidden_size=64",
  "--config.model.intermediate_size=128",
  "--config.model.num_layers=2",
  "--config.data.seq_len=128",
  "--config.train.log_every=1",
  "--config.train.eval_every=0",
  "--config.train.export_hf=",
]


def python(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, *args],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=timeout,
    env={**os.environ, "PYTHONUNBUFFERED": "1"},
  )


def error_line(done: subprocess.CompletedProcess) -> str:
  """The one `error:` line a CLI prints for an expected error (and no traceback)."""
  assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
  lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1, done.stderr[-3000:]
  return lines[0]


def _first_loss(workdir) -> float:
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return next(json.loads(line)["loss"] for line in f if '"loss"' in line)


def test_converted_checkpoint_trains_from_either_layer_layout(pretrained, tmp_path):
  """Item 2: `convert_from_hf.py` saves scanned layers; the demo trains unrolled, and starts from it with the
  HF directory's weights (its first loss equals the run started from the HF directory)."""
  converted = tmp_path / "orbax"
  done = python("tools/convert_from_hf.py", f"--hf_dir={pretrained}", f"--out={converted}")
  assert done.returncode == 0, done.stderr[-3000:]
  from_hf = python(
    "-m",
    "csft_jax.train",
    *SMALL,
    "--config.train.num_steps=1",
    f"--workdir={tmp_path / 'a'}",
    f"--config.init.from_hf={pretrained}",
  )
  assert from_hf.returncode == 0, from_hf.stderr[-3000:]
  from_orbax = python(
    "-m",
    "csft_jax.train",
    *SMALL,
    "--config.train.num_steps=1",
    f"--workdir={tmp_path / 'b'}",
    f"--config.init.from_checkpoint={converted}",
    f"--config.data.tokenizer={converted}/tokenizer",
  )
  assert from_orbax.returncode == 0, from_orbax.stderr[-3000:]
  assert "started from config.init.from_checkpoint" in from_orbax.stderr
  assert _first_loss(tmp_path / "b") == _first_loss(tmp_path / "a")

  # The stored parameters, restored unrolled and scanned, are bitwise the HF import's.
  step_dir = checkpointing.resolve_step_dir(str(converted))
  scanned = nnx.to_pure_dict(nnx.state(checkpointing.restore_model(step_dir), nnx.Param))
  unrolled = nnx.to_pure_dict(nnx.state(checkpointing.restore_model(step_dir, scan_layers=False), nnx.Param))
  for layer in range(2):
    for a, b in zip(jax_leaves(unrolled["layers"][layer]), jax_leaves(scanned["layers"])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b)[layer])


def jax_leaves(tree):
  import jax

  return jax.tree.leaves(tree)


def test_a_checkpoint_missing_parameters_is_refused_naming_them(pretrained, tmp_path):
  """Item 2: a partial restore never half-fills the model."""
  converted = tmp_path / "orbax"
  assert python("tools/convert_from_hf.py", f"--hf_dir={pretrained}", f"--out={converted}").returncode == 0
  done = python(
    "-m",
    "csft_jax.train",
    *SMALL,
    "--config.model.num_layers=3",
    "--config.train.num_steps=1",
    f"--workdir={tmp_path / 'w'}",
    f"--config.init.from_checkpoint={converted}",
    f"--config.data.tokenizer={converted}/tokenizer",
  )
  message = error_line(done)
  assert "config.model.num_layers=3 but config.init.from_checkpoint" in message


def test_a_truncated_safetensors_shard_is_named_by_every_cli(pretrained, tmp_path):
  """Item 8: train, evaluate and convert each name the shard that is cut short."""
  broken = tmp_path / "hf"
  os.makedirs(broken)
  for name in os.listdir(pretrained):
    with open(os.path.join(pretrained, name), "rb") as src, open(broken / name, "wb") as dst:
      dst.write(src.read())
  shard = sorted(glob.glob(str(broken / "model-*.safetensors")))[1]
  with open(shard, "r+b") as f:
    f.truncate(os.path.getsize(shard) - 1000)
  runs = {
    "train": python(
      "-m",
      "csft_jax.train",
      *SMALL,
      "--config.train.num_steps=1",
      f"--workdir={tmp_path / 'w'}",
      f"--config.init.from_hf={broken}",
    ),
    "evaluate": python(
      "-m",
      "csft_jax.evaluate",
      "--config=configs/eval/cmb.py",
      f"--config.checkpoint={broken}",
      f"--config.out_dir={tmp_path / 'eval'}",
    ),
    "convert": python("tools/convert_from_hf.py", f"--hf_dir={broken}", f"--out={tmp_path / 'orbax'}"),
  }
  for name, done in runs.items():
    message = error_line(done)
    assert message.startswith(f"error: {shard}: ") and "cut short" in message, (name, message)
  assert not (tmp_path / "w").exists() and not (tmp_path / "eval").exists()


def _steps_logged(workdir) -> list[int]:
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line)["step"] for line in f if '"loss"' in line]


def test_one_trainer_per_workdir_and_kill_9_leaves_metrics_that_resume_cleanly(tmp_path):
  """Items 5 and 6: a second trainer on a busy workdir stops at once and touches nothing; after kill -9 the
  stale lock is broken, the run resumes from its last checkpoint, and metrics.jsonl holds every step once."""
  workdir = tmp_path / "w"
  flags = [
    *SMALL,
    f"--workdir={workdir}",
    "--config.checkpoint.every_steps=2",
    "--config.checkpoint.keep=5",
    "--config.checkpoint.async_save=False",
  ]
  first = subprocess.Popen(
    [sys.executable, "-m", "csft_jax.train", *flags, "--config.train.num_steps=100000"],
    cwd=REPO_ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    env={**os.environ, "PYTHONUNBUFFERED": "1"},
  )
  try:
    for line in first.stdout:
      if re.match(r"step +7/", line):
        break
    second = python("-m", "csft_jax.train", *flags, "--config.train.num_steps=100000")
    message = error_line(second)
    assert f"is in use by process {first.pid} on" in message and "one trainer per workdir" in message
    assert first.poll() is None  # the first one goes on
  finally:
    first.kill()  # kill -9: no handler runs, the lock stays behind
    first.wait()
  assert os.path.exists(workdir / ".lock")
  steps_before = _steps_logged(workdir)
  saved = max(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
  if max(steps_before) == saved:
    # The kill landed just after a save. Drop that step: the state a kill between a step's log line
    # and its save leaves, which this test is about.
    shutil.rmtree(workdir / "checkpoints" / str(saved))
    saved = max(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
  assert max(steps_before) > saved  # steps after the last checkpoint were logged, and will run again

  done = python("-m", "csft_jax.train", *flags, f"--config.train.num_steps={max(steps_before) + 3}")
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"removed the stale lock {workdir / '.lock'} of process {first.pid}" in done.stderr
  assert f"resumed from step {saved}" in done.stderr
  assert _steps_logged(workdir) == list(range(1, max(steps_before) + 4))
  assert not os.path.exists(workdir / ".lock")


def test_resume_with_a_changed_config_is_refused_unless_allowed(tmp_path):
  """Item 7: fields that change what the run trains are refused, naming them; run-length and logging changes
  go through with a note; --allow_config_change takes the new values."""
  workdir = tmp_path / "w"
  flags = [*SMALL, f"--workdir={workdir}"]
  assert python("-m", "csft_jax.train", *flags, "--config.train.num_steps=2").returncode == 0
  with open(workdir / "config.json", encoding="utf-8") as f:
    stored = f.read()

  refused = python(
    "-m",
    "csft_jax.train",
    *flags,
    "--config.train.num_steps=3",
    "--config.optim.lr=0.01",
    "--config.data.sources.messages_chat.enabled=False",
  )
  message = error_line(refused)
  assert "resuming would change 2 field(s)" in message
  assert "data.sources.messages_chat.enabled: True -> False" in message and "optim.lr: 0.001 -> 0.01" in message
  assert "--allow_config_change" in message
  with open(workdir / "config.json", encoding="utf-8") as f:
    assert f.read() == stored  # nothing was written
  assert _steps_logged(workdir) == [1, 2]

  longer = python("-m", "csft_jax.train", *flags, "--config.train.num_steps=3", "--config.train.log_every=1")
  assert longer.returncode == 0, longer.stderr[-3000:]
  assert "note: config changed since this run started" in longer.stderr and "train.num_steps: 2 -> 3" in longer.stderr

  allowed = python(
    "-m", "csft_jax.train", *flags, "--config.train.num_steps=4", "--config.optim.lr=0.01", "--allow_config_change"
  )
  assert allowed.returncode == 0, allowed.stderr[-3000:]
  assert "optim.lr: 0.001 -> 0.01" in allowed.stderr and "resumed from step 3" in allowed.stderr
  with open(workdir / "config.json", encoding="utf-8") as f:
    assert json.load(f)["optim"]["lr"] == 0.01

  # An allowed change the saved state cannot take is refused by name, and costs no checkpoint.
  other_state = error_line(
    python(
      "-m",
      "csft_jax.train",
      *flags,
      "--config.train.num_steps=5",
      "--config.optim.grad_clip_norm=0.0",
      "--allow_config_change",
    )
  )
  assert "step 4 cannot be restored into this config's state" in other_state and "grad_clip_norm" in other_state
  assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "4"] and not (workdir / "checkpoints_unreadable").exists()


def test_overrides_that_name_nothing_or_do_nothing_say_so_in_one_line(tmp_path):
  """Item 10: a field typo, a source that does not exist, a kernel this backend lacks: one `error:` line each,
  and no workdir left behind; a weight under temperature mixing is reported as ignored."""
  workdir = tmp_path / "w"
  typo = error_line(python("-m", "csft_jax.train", *SMALL, f"--workdir={workdir}", "--config.train.num_stepz=4"))
  assert "--config.train.num_stepz: config.train has no field 'num_stepz'" in typo
  assert "Did you mean config.train.num_steps?" in typo
  source = error_line(
    python("-m", "csft_jax.train", *SMALL, f"--workdir={workdir}", "--config.data.sources.cmb.weight=2.0")
  )
  assert (
    "config.data.sources has no field 'cmb'" in source and "alpaca_qa, cmb_exam, cmb_style_mcq, doctor_qa" in source
  )
  kernel = error_line(
    python(
      "-m",
      "csft_jax.train",
      *SMALL,
      f"--workdir={workdir}",
      "--config.train.num_steps=1",
      "--config.model.attention_impl=cudnn",
    )
  )
  assert "attention_impl='cudnn' needs an NVIDIA GPU" in kernel and "'cpu'" in kernel
  assert not workdir.exists()
  verbose = python(
    "-m", "csft_jax.train", *SMALL, f"--workdir={workdir}", "--config.train.num_stepz=4", "--verbosity=0"
  )
  assert verbose.returncode != 0 and "Traceback" in verbose.stderr

  weighted = python(
    "-m",
    "csft_jax.data.inspect",
    *SMALL[:1],
    "--config.data.sources.alpaca_qa.weight=5.0",
    "--num_batches=1",
    "--num_examples=0",
  )
  assert weighted.returncode == 0, weighted.stderr[-3000:]
  assert (
    "note: config.data.sources.<name>.weight is set for ['alpaca_qa'] but mixing is 'temperature'" in weighted.stdout
  )


def test_inspect_takes_the_tokenizer_of_init_from_hf_as_training_does(pretrained):
  """Item 11: with data.tokenizer empty, inspect (like train and prepare) uses the init model's tokenizer."""
  done = python(
    "-m",
    "csft_jax.data.inspect",
    "--config=configs/demo.py",
    "--config.data.tokenizer=",
    f"--config.init.from_hf={pretrained}",
    "--num_batches=1",
    "--num_examples=1",
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert "--- alpaca_qa example 0" in done.stdout
  empty = error_line(
    python("-m", "csft_jax.data.inspect", "--config=configs/demo.py", "--config.data.tokenizer=", "--num_batches=1")
  )
  assert "config.data.tokenizer is empty and there is no config.init.from_hf" in empty


@pytest.fixture(scope="module")
def run_workdir(tmp_path_factory) -> str:
  """A finished 4-step run with checkpoints at steps 2 and 4 and an HF export."""
  workdir = str(tmp_path_factory.mktemp("run") / "sft")
  done = python(
    "-m",
    "csft_jax.train",
    *SMALL,
    "--config.train.num_steps=4",
    "--config.checkpoint.every_steps=2",
    "--config.train.export_hf=hf_export",
    f"--workdir={workdir}",
  )
  assert done.returncode == 0, done.stderr[-3000:]
  return workdir


def _evaluate(*args: str) -> subprocess.CompletedProcess:
  return python(
    "-m",
    "csft_jax.evaluate",
    "--config=configs/eval/cmb.py",
    "--config.max_new_tokens=4",
    "--config.batch_size=8",
    *args,
  )


def _read(path) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def test_evaluations_are_kept_per_step_and_partial_ones_apart(run_workdir):
  """Item 3: evaluating an older checkpoint does not replace the final model's results; a limit run is
  marked partial and kept out of the report's columns, which show the step evaluated."""
  eval_root = os.path.join(run_workdir, "eval", "cmb-answer")
  assert _evaluate(f"--config.checkpoint={run_workdir}").returncode == 0
  final = _read(os.path.join(eval_root, "step_4", "results.json"))
  assert _evaluate(f"--config.checkpoint={run_workdir}/checkpoints/2").returncode == 0
  assert _read(os.path.join(eval_root, "step_4", "results.json")) == final
  assert _read(os.path.join(eval_root, "step_2", "results.json"))["settings"]["checkpoint"].endswith("checkpoints/2")
  export = _evaluate(f"--config.checkpoint={run_workdir}/hf_export", "--config.scan_layers=True")
  assert export.returncode == 0 and f"Results in {os.path.join(eval_root, 'step_4')}" in export.stdout
  partial = _evaluate(f"--config.checkpoint={run_workdir}", "--config.limit=3")
  assert partial.returncode == 0
  settings = _read(os.path.join(eval_root, "step_4-limit_3", "results.json"))["settings"]
  assert settings["limit"] == 3
  assert sorted(os.listdir(eval_root)) == ["step_2", "step_4", "step_4-limit_3"]

  report = python("-m", "csft_jax.report", f"--workdir={os.path.dirname(run_workdir)}")
  assert report.returncode == 0, report.stderr[-3000:]
  with open(os.path.join(os.path.dirname(run_workdir), "summary.csv"), encoding="utf-8") as f:
    header, row = list(csv.reader(f))[:2]
  assert row[header.index("cmb-answer/step")] == "4"
  assert float(row[header.index("cmb-answer/micro")]) == pytest.approx(100 * final["overall"]["micro"])
  assert (
    "Partial evaluations (config.limit: the first items only), not in the table: sft: cmb-answer/step_4-limit_3"
    in report.stdout
  )


def test_ctrl_c_during_evaluation_keeps_finished_generations_and_the_rerun_completes_them(run_workdir, tmp_path):
  """Item 4: SIGINT finishes the batch in flight, keeps its generations and exits 0; the rerun generates
  only the rest, and its results equal an uninterrupted run's."""
  flags = [
    "--config=configs/eval/cmb.py",
    f"--config.checkpoint={run_workdir}",
    "--config.batch_size=2",
    "--config.max_new_tokens=256",
  ]
  reference = python("-m", "csft_jax.evaluate", *flags, f"--config.out_dir={tmp_path / 'straight'}")
  assert reference.returncode == 0, reference.stderr[-3000:]
  out = tmp_path / "interrupted"
  journal = out / "progress.jsonl"
  process = subprocess.Popen(
    [sys.executable, "-m", "csft_jax.evaluate", *flags, f"--config.out_dir={out}"],
    cwd=REPO_ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    env={**os.environ, "PYTHONUNBUFFERED": "1"},
  )
  deadline = time.time() + 300
  while time.time() < deadline and process.poll() is None:
    if journal.exists() and len(journal.read_text(encoding="utf-8").splitlines()) >= 3:  # header + 2 prompts
      process.send_signal(signal.SIGINT)
      break
    time.sleep(0.02)
  stdout, stderr = process.communicate(timeout=300)
  assert process.returncode == 0, stderr[-3000:]
  assert "SIGINT received:" in stdout and "Rerun the same command to continue." in stdout
  assert "Traceback" not in stderr and not (out / "results.json").exists()
  kept = len(journal.read_text(encoding="utf-8").splitlines()) - 1
  assert 2 <= kept < 24

  rerun = python("-m", "csft_jax.evaluate", *flags, f"--config.out_dir={out}")
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"{kept} of 24 prompts were done before" in rerun.stderr
  assert len(journal.read_text(encoding="utf-8").splitlines()) == 1 + 24  # nothing generated twice
  assert _read(out / "generations.json") == _read(tmp_path / "straight" / "generations.json")
  assert _read(out / "results.json")["overall"] == _read(tmp_path / "straight" / "results.json")["overall"]


def test_a_bad_item_is_reported_before_the_model_loads(run_workdir, tmp_path):
  """Item 9: the benchmark's inputs are checked first (seconds, not minutes of loading 7B weights)."""
  items = _read(os.path.join(REPO_ROOT, "csft_jax", "assets", "eval", "cmb_sample", "test.json"))
  del items[5]["option"]
  exam = tmp_path / "exam.json"
  exam.write_text(json.dumps(items, ensure_ascii=False), encoding="utf-8")
  done = _evaluate(f"--config.checkpoint={run_workdir}", f"--config.exam={exam}", f"--config.out_dir={tmp_path / 'o'}")
  message = error_line(done)
  assert f"{exam}: item 5" in message and "missing field(s) ['option']" in message
  assert "Loaded" not in done.stderr and not (tmp_path / "o").exists()


def test_the_generation_journal_survives_a_cut_line_and_refuses_other_settings(tmp_path):
  """Item 4: what the rerun trusts: whole lines only, the same prompt tokens, the same settings."""
  from csft_jax.eval import runner

  path = str(tmp_path / "progress.jsonl")
  journal = runner.GenerationJournal(path, "settings-1")
  journal.add("CMB answer", 0, [1, 2, 3], [[7, 8]])
  journal.add("CMB answer", 1, [4, 5], [[9]])
  journal.close()
  with open(path, "a", encoding="utf-8") as f:
    f.write('{"call": "CMB answer", "index": 2, "prom')  # killed mid-write
  again = runner.GenerationJournal(path, "settings-1")
  assert again.finished("CMB answer", 0, [1, 2, 3]) == [[7, 8]]
  assert again.finished("CMB answer", 0, [1, 2, 4]) is None  # another prompt at that index
  assert again.finished("CMB answer", 2, [6]) is None and again.finished("MedS", 1, [4, 5]) is None
  again.add("CMB answer", 2, [6], [[1]])  # appended after the cut line was dropped
  again.close()
  assert runner.GenerationJournal(path, "settings-1").finished("CMB answer", 2, [6]) == [[1]]
  other = runner.GenerationJournal(path, "settings-2")  # e.g. the model was rewritten in place
  assert other.finished("CMB answer", 0, [1, 2, 3]) is None
  other.close()
  assert os.path.exists(path + ".old")


def test_a_journal_cut_in_its_header_or_inside_a_character_is_repaired(tmp_path):
  """A kill can cut the very first line (the header) or a line of Chinese text mid-character: the
  journal keeps every whole line, drops the rest, and appends cleanly after it."""
  from csft_jax import files

  path = tmp_path / "judge.jsonl"
  path.write_text('{"fingerp', encoding="utf-8")  # killed while writing the header
  journal = files.JsonlJournal(str(path), "f1")
  assert journal.records == []
  journal.write({"key": "1/0", "reply": "流畅性：4"})
  journal.close()
  whole = path.read_bytes()
  path.write_bytes(whole + '{"key": "1/1", "reply": "相关性'.encode()[:-2])  # cut inside a character
  again = files.JsonlJournal(str(path), "f1")
  assert again.records == [{"key": "1/0", "reply": "流畅性：4"}] and path.read_bytes() == whole
  again.write({"key": "1/1", "reply": "5"})
  again.close()
  assert files.JsonlJournal(str(path), "f1").records[-1] == {"key": "1/1", "reply": "5"}


def test_a_partial_restore_is_refused_naming_the_missing_parameters(tmp_path):
  """Item 2: a checkpoint that lacks parameters the model has (here a third layer) never half-fills it."""
  import dataclasses

  from csft_jax.models import get_preset

  for scan_layers in (False, True):
    model = Decoder(dataclasses.replace(get_preset("tiny"), num_layers=2, scan_layers=scan_layers), rngs=nnx.Rngs(0))
    step_dir = checkpointing.save_model(str(tmp_path / f"scan{scan_layers}"), model)
    for target_scan in (False, True):
      expected = (
        r"lacks 9 of the model's 30 parameters, e.g. \['layers/2/attn/k_proj/kernel'"
        if not scan_layers
        else r"parameter shapes differ from the model's \(stored vs wanted\): "
        r"\['layers/attn/k_proj/kernel \(2, 64, 2, 16\) vs \(3, 64, 2, 16\)'"
      )
      with pytest.raises(checkpointing.CheckpointError, match=expected):
        checkpointing.restore_model(step_dir, num_layers=3, scan_layers=target_scan)


def test_ctrl_c_outside_a_clean_stopping_point_is_one_line_and_exit_130():
  """Ctrl-C while, say, a model loads (or a second Ctrl-C): no traceback."""
  program = "from csft_jax.console import run_cli\ndef main(argv):\n  raise KeyboardInterrupt\nrun_cli(main)\n"
  done = python("-c", program)
  assert done.returncode == 130 and done.stderr.strip() == "interrupted" and "Traceback" not in done.stderr


def test_optimizer_offload_from_the_command_line(tmp_path):
  """`--config.optim.offload=host` as the README gives it: the same losses as on the device."""
  runs = {}
  for offload in ("none", "host"):
    done = python(
      "-m",
      "csft_jax.train",
      *SMALL,
      "--config.train.num_steps=3",
      f"--workdir={tmp_path / offload}",
      f"--config.optim.offload={offload}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    runs[offload] = _steps_and_losses(tmp_path / offload)
  assert runs["host"] == runs["none"] and len(runs["host"]) == 3


def _steps_and_losses(workdir) -> dict[int, float]:
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_a_run_from_before_new_config_fields_resumes_while_they_hold_their_defaults():
  """A workdir whose config.json predates a field (here lora.* and optim.moments_dtype) resumes: the field
  at its default is the behaviour the run had; set away from it, it is refused like any change."""
  from csft_jax import train

  current = configuration.load("configs/demo.py").to_dict()
  stored = json.loads(json.dumps(current, default=str))
  del stored["lora"], stored["optim"]["moments_dtype"]
  notes = []
  train.check_resume_config(stored, current, allow=False, say=notes.append)
  assert notes == []
  current["lora"]["rank"] = 8
  with pytest.raises(train.InitError, match=r"change 1 field\(s\) that decide what it trains: lora.rank: None -> 8"):
    train.check_resume_config(stored, current, allow=False, say=notes.append)
