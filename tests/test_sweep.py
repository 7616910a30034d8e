"""Sweeps: expansion, naming, commands, and skip/resume/failure with a fake trainer and evaluator."""

import json
import os
import shlex
import subprocess
import sys
import textwrap

import pytest

from csft_jax import sweep as sw
from tests import REPO_ROOT

# Stand-ins for `python -m csft_jax.train` / `csft_jax.evaluate` that honour the same contract:
# rerunning in a workdir resumes after the last logged step; run_summary.json says "finished".
FAKE_TRAIN = """
import json, os, sys
args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
workdir = args["--workdir"[2:]]
os.makedirs(workdir, exist_ok=True)
with open(os.path.join(workdir, "calls.txt"), "a") as f:
  f.write("train " + " ".join(sys.argv[1:]) + "\\n")
metrics = os.path.join(workdir, "metrics.jsonl")
start = 0
if os.path.exists(metrics):
  start = max(json.loads(line)["step"] for line in open(metrics))
if args.get("config.fake.fail") == "True":
  sys.exit(3)
num_steps = 4
with open(metrics, "a") as f:
  for step in range(start + 1, num_steps + 1):
    f.write(json.dumps({"step": step, "loss": 10.0 / step}) + "\\n")
json.dump({"status": "finished", "step": num_steps, "num_steps": num_steps, "final_loss": 10.0 / num_steps},
          open(os.path.join(workdir, "run_summary.json"), "w"))
"""

FAKE_EVAL = """
import json, os, sys
args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
run_dir = args["config.checkpoint"]
with open(os.path.join(run_dir, "calls.txt"), "a") as f:
  f.write("eval " + " ".join(sys.argv[1:]) + "\\n")
step = json.load(open(os.path.join(run_dir, "run_summary.json")))["step"]
out = os.path.join(run_dir, "eval", "cmb-answer", f"step_{step}")
os.makedirs(out, exist_ok=True)
json.dump({"overall": {"micro": 0.5, "macro": 0.5}}, open(os.path.join(out, "results.json"), "w"))
"""

FAKE_CONFIG = """
import ml_collections

def get_config(arg=None):
  return ml_collections.ConfigDict(dict(
      data=dict(mixing="temperature", temperature=2.0, sources=arg or "collection"),
      fake=dict(fail=False)))
"""


@pytest.fixture
def fake_experiment(tmp_path):
  """Writes the fake trainer, evaluator, config and an experiment file using them; returns its path."""
  (tmp_path / "fake_train.py").write_text(FAKE_TRAIN)
  (tmp_path / "fake_eval.py").write_text(FAKE_EVAL)
  (tmp_path / "fake_config.py").write_text(FAKE_CONFIG)
  python = shlex.quote(sys.executable)
  experiment = tmp_path / "experiment.py"
  experiment.write_text(
    textwrap.dedent(f"""
      import ml_collections
      from csft_jax.sweep import chain, product, sweep

      def get_experiment():
        exp = ml_collections.ConfigDict()
        exp.config = {str(tmp_path / "fake_config.py")!r}
        exp.evals = ("configs/eval/cmb.py",)
        exp.train_command = "{python} {tmp_path / "fake_train.py"}"
        exp.eval_command = "{python} {tmp_path / "fake_eval.py"}"
        return exp

      def get_sweep():
        return chain(
            sweep("arg.sources", ["cmb_only"]),
            product([sweep("data.mixing", ["temperature"]), sweep("data.temperature", [2.0, 5.0])]),
            [{{"data.mixing": "uniform", "fake.fail": True}}],
            sweep("data.mixing", ["uniform"]),
        )
      """)
  )
  return str(experiment)


def _calls(run_dir) -> list[str]:
  path = os.path.join(run_dir, "calls.txt")
  return [line.split()[0] for line in open(path)] if os.path.exists(path) else []


def _write_run(run_dir, status: str | None, steps: int, with_eval: bool) -> None:
  os.makedirs(run_dir)
  with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps({"step": s, "loss": 10.0 / s}) + "\n" for s in range(1, steps + 1))
  if status:
    with open(os.path.join(run_dir, "run_summary.json"), "w") as f:
      json.dump({"status": status, "step": steps, "num_steps": 4, "final_loss": 10.0 / steps}, f)
  if with_eval:
    os.makedirs(os.path.join(run_dir, "eval", "cmb-answer", f"step_{steps}"))
    with open(os.path.join(run_dir, "eval", "cmb-answer", f"step_{steps}", "results.json"), "w") as f:
      f.write("{}")


def test_sweep_product_chain_expansion():
  points = sw.chain(
    sw.sweep("arg.sources", ["cmb_only"]),
    sw.product(
      [
        sw.sweep("data.mixing", ["temperature"]),
        sw.sweep("data.temperature", [2.0, 5.0]),
        sw.sweep("model.preset", ["tiny", "tiny_qwen3"]),
      ]
    ),
  )
  assert points == [
    {"arg.sources": "cmb_only"},
    {"data.mixing": "temperature", "data.temperature": 2.0, "model.preset": "tiny"},
    {"data.mixing": "temperature", "data.temperature": 2.0, "model.preset": "tiny_qwen3"},
    {"data.mixing": "temperature", "data.temperature": 5.0, "model.preset": "tiny"},
    {"data.mixing": "temperature", "data.temperature": 5.0, "model.preset": "tiny_qwen3"},
  ]
  with pytest.raises(sw.SweepError, match=r"axes both set \['data.mixing'\]"):
    sw.product([sw.sweep("data.mixing", ["a"]), sw.sweep("data.mixing", ["b"])])


@pytest.mark.parametrize(
  "overrides, name",
  [
    ({"data.mixing": "temperature", "data.temperature": 2.0}, "mixing-temperature_temperature-2"),
    ({"arg.sources": "cmb_only"}, "sources-cmb_only"),
    ({"optim.lr": 2e-5, "train.num_steps": 100, "train.shuffle": False}, "lr-2e-05_num_steps-100_shuffle-false"),
    ({"optim.lr": 1e-5, "schedule.lr": 0.5}, "optim.lr-1e-05_schedule.lr-0.5"),  # clashing last components
    (
      {"config": "configs/collectivesft_internlm2_5_7b.py", "arg.sources": "collection"},
      "collectivesft_internlm2_5_7b_sources-collection",
    ),
    ({"mesh.shape": (2, 4)}, "shape-2x4"),
    ({}, "base"),
  ],
)
def test_run_name_is_readable(overrides, name):
  assert sw.run_name(overrides) == name


def test_run_name_hashes_unsafe_and_long_names_stably():
  unsafe = sw.run_name({"data.tokenizer": "/models/中文 tok"})
  assert unsafe.startswith("tokenizer-modelstok-") and len(unsafe) == len("tokenizer-modelstok-") + 8
  assert unsafe == sw.run_name({"data.tokenizer": "/models/中文 tok"})
  assert unsafe != sw.run_name({"data.tokenizer": "/models/英文 tok"})
  long_a = sw.run_name({f"a.field_{i}": "x" * 10 for i in range(8)})
  long_b = sw.run_name({f"a.field_{i}": "x" * 10 if i else "y" for i in range(8)})
  assert len(long_a) == sw.MAX_NAME_LENGTH and long_a != long_b
  assert long_a[:-9] == "_".join(f"field_{i}-{'x' * 10}" for i in range(8))[: sw.MAX_NAME_LENGTH - 9]


def test_experiment_errors_name_the_problem(tmp_path):
  bad = tmp_path / "dup.py"
  bad.write_text(
    "import ml_collections\n"
    "def get_experiment():\n  return ml_collections.ConfigDict(dict(config='c.py', evalz=()))\n"
    "def get_sweep():\n  return [{'data.mixing': 'uniform'}]\n"
  )
  with pytest.raises(sw.SweepError, match=r"unknown fields \['evalz'\]"):
    sw.load_experiment(str(bad))
  bad.write_text(
    "import ml_collections\n"
    "def get_experiment():\n  return ml_collections.ConfigDict(dict(config='c.py'))\n"
    "def get_sweep():\n  return [{'data.temperature': 2}, {'data.temperature': 2.0}]\n"
  )
  with pytest.raises(sw.SweepError, match=r"points 0 and 1 are both named 'temperature-2'"):
    sw.load_experiment(str(bad))
  with pytest.raises(sw.SweepError, match="does not exist"):
    sw.load_experiment(str(tmp_path / "missing.py"))


def test_commands_and_dry_run(fake_experiment, tmp_path):
  experiment = sw.load_experiment(fake_experiment)
  workdir = str(tmp_path / "w")
  runs = sw.plan_runs(experiment, workdir)
  assert [r.name for r in runs] == [
    "sources-cmb_only",
    "mixing-temperature_temperature-2",
    "mixing-temperature_temperature-5",
    "mixing-uniform_fail-true",
    "mixing-uniform",
  ]
  config = str(tmp_path / "fake_config.py")
  assert runs[0].train[-2:] == (f"--config={config}:sources=cmb_only", f"--workdir={workdir}/sources-cmb_only")
  assert runs[1].train[-4:] == (
    f"--config={config}",
    f"--workdir={workdir}/mixing-temperature_temperature-2",
    "--config.data.mixing=temperature",
    "--config.data.temperature=2.0",
  )
  assert runs[1].evals[0][-2:] == (
    "--config=configs/eval/cmb.py",
    f"--config.checkpoint={workdir}/mixing-temperature_temperature-2",
  )
  assert runs[1].eval_names == ("cmb-answer",)

  _write_run(runs[0].run_dir, "finished", 4, with_eval=True)
  _write_run(runs[1].run_dir, "interrupted", 2, with_eval=False)
  _write_run(runs[2].run_dir, "finished", 4, with_eval=False)
  lines = sw.dry_run_script(runs).splitlines()
  assert [line for line in lines if line.startswith("#")] == [
    "# sources-cmb_only: finished -> skip",
    "# mixing-temperature_temperature-2: interrupted -> resume",
    "# mixing-temperature_temperature-5: needs_eval -> evals only",
    "# mixing-uniform_fail-true: new -> train",
    "# mixing-uniform: new -> train",
  ]
  assert lines[1:6] == [
    "# mixing-temperature_temperature-2: interrupted -> resume",
    shlex.join(runs[1].train),
    shlex.join(runs[1].evals[0]),
    "# mixing-temperature_temperature-5: needs_eval -> evals only",
    shlex.join(runs[2].evals[0]),
  ]


def test_tpu_pod_commands(fake_experiment):
  runs = sw.plan_runs(sw.load_experiment(fake_experiment), "/mnt/shared/mix")
  script = sw.tpu_pod_script(runs[:1], tpu_name="v5p-64", zone="us-east5-a", repo_dir="~/csft_jax")
  train = shlex.join(runs[0].train)
  assert script.splitlines() == [
    "# sources-cmb_only",
    f"gcloud compute tpus tpu-vm ssh v5p-64 --zone=us-east5-a --worker=all "
    f"--command={shlex.quote(f'cd ~/csft_jax && {train} --distributed')}",
    f"gcloud compute tpus tpu-vm ssh v5p-64 --zone=us-east5-a --worker=all "
    f"--command={shlex.quote('cd ~/csft_jax && ' + shlex.join(runs[0].evals[0]) + ' --distributed')}",
  ]
  assert "--workdir=/mnt/shared/mix/sources-cmb_only" in script


def test_sweep_skips_resumes_and_survives_a_failure(fake_experiment, tmp_path):
  experiment = sw.load_experiment(fake_experiment)
  workdir = str(tmp_path / "w")
  runs = {r.name: r for r in sw.plan_runs(experiment, workdir)}
  done, resumed, eval_only, failing, fresh = runs
  _write_run(runs[done].run_dir, "finished", 4, with_eval=True)
  _write_run(runs[resumed].run_dir, "interrupted", 2, with_eval=False)
  _write_run(runs[eval_only].run_dir, "finished", 4, with_eval=False)

  assert sw.run_sweep(experiment, workdir) == 1
  assert _calls(runs[done].run_dir) == []
  assert _calls(runs[resumed].run_dir) == ["train", "eval"]
  assert _calls(runs[eval_only].run_dir) == ["eval"]
  assert _calls(runs[failing].run_dir) == ["train"]
  assert _calls(runs[fresh].run_dir) == ["train", "eval"]  # the failure did not stop the sweep
  with open(os.path.join(runs[resumed].run_dir, "metrics.jsonl")) as f:
    assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4]  # resumed, not restarted

  with open(os.path.join(workdir, "sweep.json")) as f:
    record = json.load(f)
  assert [(p["name"], p["status"]) for p in record["points"]] == [
    (done, "finished"),
    (resumed, "finished"),
    (eval_only, "finished"),
    (failing, "failed"),
    (fresh, "finished"),
  ]
  assert "trainer exited with status 3" in record["points"][3]["error"]
  assert record["points"][1]["overrides"] == {"data.mixing": "temperature", "data.temperature": 2.0}
  assert record["points"][1]["commands"] == [shlex.join(runs[resumed].train), shlex.join(runs[resumed].evals[0])]
  with open(os.path.join(runs[fresh].run_dir, "sweep.log")) as f:
    log = f.read()
  assert f"$ {shlex.join(runs[fresh].train)}" in log and "exit status 0" in log

  # A second pass only retries the failed point.
  assert sw.run_sweep(experiment, workdir) == 1
  assert [len(_calls(r.run_dir)) for r in runs.values()] == [0, 2, 1, 2, 2]


def test_sweep_checks_fields_and_workdir_owner(fake_experiment, tmp_path):
  experiment = sw.load_experiment(fake_experiment)
  typo = sw.plan_run(experiment, {"data.mixng": "uniform"}, str(tmp_path / "w"))
  with pytest.raises(sw.SweepError, match=r"run mixng-uniform: .*fake_config.py has no field \['data.mixng'\]"):
    sw.check_overrides([typo])
  workdir = tmp_path / "other"
  workdir.mkdir()
  (workdir / "sweep.json").write_text(json.dumps({"experiment": "/elsewhere/x.py"}))
  with pytest.raises(sw.SweepError, match="holds a sweep of /elsewhere/x.py"):
    sw.run_sweep(experiment, str(workdir))


def test_cli_dry_run_of_the_tiny_ablation(tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "csft_jax.sweep",
      "--sweep=experiments/mixture_ablation_tiny.py",
      f"--workdir={tmp_path}",
      "--dry_run",
    ],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    check=True,
  )
  lines = result.stdout.splitlines()
  assert lines[:2] == [
    "# sources-cmb_only: new -> train",
    f"python -m csft_jax.train --config=configs/mixture_tiny.py:sources=cmb_only --workdir={tmp_path}/sources-cmb_only",
  ]
  assert [line for line in lines if line.startswith("#")][1:] == [
    "# sources-collection_mixing-proportional: new -> train",
    "# sources-collection_mixing-temperature_temperature-2: new -> train",
    "# sources-collection_mixing-temperature_temperature-5: new -> train",
    "# sources-collection_mixing-uniform: new -> train",
  ]
  assert not os.listdir(tmp_path)  # a dry run writes nothing


def test_mixture_tiny_config_keeps_the_cmb_split_comparable():
  from configs import mixture_tiny as module

  cmb_only = module.get_config("sources=cmb_only")
  collection = module.get_config("sources=collection")
  assert list(cmb_only.data.sources) == ["cmb_style_mcq"]
  assert list(collection.data.sources) == [
    "cmb_style_mcq",
    "cmeddialogue",
    "cmekg_triples",
    "huatuo_cmekg",
    "huatuo_liver_cancer",
    "medicalgpt_sft",
  ]
  # Same source index, seed and fraction: the same held-out CMB items in every arm.
  assert cmb_only.data.sources.cmb_style_mcq == collection.data.sources.cmb_style_mcq
  assert (cmb_only.data.val_fraction, cmb_only.data.seed) == (collection.data.val_fraction, collection.data.seed)
  with pytest.raises(ValueError, match="must be k=v"):
    module.get_config("cmb_only")
