"""The inspect and decontaminate CLIs on the sample collection."""

import importlib
import json
import os
import subprocess
import sys

from tests import REPO_ROOT


def _run(*args):
  env = {**os.environ, "PYTHONPATH": REPO_ROOT}
  out = subprocess.run(
    [sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120, check=True
  )
  return out.stdout


def test_inspect_json_summary():
  stdout = _run("-m", "csft_jax.data.inspect", "--config=configs/sample_collection.py", "--num_batches=4", "--json")
  summary = json.loads(stdout.strip().splitlines()[-1])
  assert set(summary["sources"]) == {"alpaca_qa", "cmb_style_mcq", "doctor_qa", "messages_chat", "sharegpt_dialogues"}
  for row in summary["sources"].values():
    assert {"target_weight", "realized_fraction_examples", "realized_fraction_tokens", "dropped", "truncated"} <= set(
      row
    )
  assert abs(sum(r["target_weight"] for r in summary["sources"].values()) - 1) < 1e-9
  assert 0 < summary["packing_efficiency"] < 1
  assert "[[答案是" in stdout  # MCQ answers are shown as trained text.


def test_no_module_shadows_the_standard_library():
  """A script run from a package folder has that folder first on sys.path: no module there may be
  named like a standard-library one (csft_jax/data/inspect.py once shadowed `inspect`)."""
  names = [
    os.path.splitext(name)[0]
    for root, _, files in os.walk(os.path.join(REPO_ROOT, "csft_jax"))
    for name in files
    if name.endswith(".py")
  ]
  assert not set(names) & sys.stdlib_module_names
  folder = os.path.join(REPO_ROOT, "csft_jax", "data")
  done = subprocess.run(
    [sys.executable, "-c", "import inspect; print(inspect.__file__)"],
    cwd=folder,
    capture_output=True,
    text=True,
    timeout=60,
    check=True,
  )
  assert folder not in done.stdout
  # The CLI's old module name stays importable, and runs the real module (not an empty alias).
  assert callable(importlib.import_module("csft_jax.data.inspect").main)


def test_decontaminate_finds_a_leaked_question_and_writes_filtered_copies(tmp_path):
  with open(os.path.join(REPO_ROOT, "csft_jax/assets/sample_collection/cmb_style_mcq.json"), encoding="utf-8") as f:
    leaked = json.load(f)[3]
  bench = tmp_path / "cmb_val.json"
  bench.write_text(json.dumps([leaked], ensure_ascii=False), encoding="utf-8")
  out = tmp_path / "filtered"
  stdout = _run(
    "tools/decontaminate.py",
    "--config=configs/sample_collection.py",
    f"--benchmark=cmb:{bench}",
    f"--write_filtered={out}",
    "--json",
  )
  report = json.loads(stdout.strip().splitlines()[-1])["sources"]
  assert report["cmb_style_mcq"]["contaminated"] >= 1
  assert report["cmb_style_mcq"]["first"][0]["location"].endswith("cmb_style_mcq.json:46 (item 4)")
  kept = (out / "cmb_style_mcq.jsonl").read_text(encoding="utf-8").splitlines()
  assert len(kept) == report["cmb_style_mcq"]["examples"] - report["cmb_style_mcq"]["contaminated"]
  assert leaked not in [json.loads(line) for line in kept]
