"""Evaluates a checkpoint on a benchmark: CMB-Exam, MedS-Bench, CMB-Clin (csft_jax.eval.<name>).

  python -m csft_jax.evaluate --config=configs/eval/cmb.py --config.checkpoint=W
  python -m csft_jax.evaluate --config=configs/eval/meds_bench.py --config.checkpoint=W
  python -m csft_jax.evaluate --config=configs/eval/cmb.py --config.checkpoint=HF_DIR --config.out_dir=OUT

`checkpoint` is a training workdir (latest step; the run's tokenizer and chat template), W/checkpoints,
a step directory, or an HF directory (its own tokenizer and template); see `csft_jax.loading`.
Results go to `W/eval/<name>/` for a run W (its checkpoints and its HF export alike),
`<dir>/eval/<name>/` for a directory outside a run, or `--config.out_dir`; the name carries the mode (`cmb-answer`, `cmb-cot`, `meds_bench`). The output
directory is checked for writing before the model loads. `results.json` is what sweeps and reports
read. A progress bar with ETA runs on stderr; a one-screen summary ends the run.
"""

from __future__ import annotations

import time
from typing import Any

import ml_collections
from absl import app, logging

from csft_jax import configuration, distributed, files, sharding
from csft_jax.console import run_cli
from csft_jax.loading import load_chat_model
from csft_jax.eval import runner
from csft_jax.workdir import RunDir


def output_dir(config: ml_collections.ConfigDict, benchmark: runner.Benchmark) -> str:
  """Where the evaluation of `config` writes (see the module docstring)."""
  if config.out_dir:
    return config.out_dir
  home = RunDir.containing(config.checkpoint) or RunDir(config.checkpoint)
  return home.eval_dir(benchmark.result_name(config))


def run(config: ml_collections.ConfigDict) -> tuple[dict[str, Any] | None, str, str]:
  """Loads the model named by `config.checkpoint`, runs `config.benchmark`, writes its results.

  Returns:
    `(results or None when unscored, summary text, output directory)`.
  """
  config = configuration.resolve_paths(config)
  benchmark = runner.validate_config(config)
  out_dir = output_dir(config, benchmark)
  files.check_writable(out_dir, "config.out_dir (the evaluation's output directory)")
  mesh = sharding.make_mesh(**config.mesh)
  start = time.perf_counter()
  loaded = load_chat_model(config.checkpoint, dtype=config.dtype, mesh=mesh, tokenizer=config.tokenizer,
                           chat_template=config.chat_template, scan_layers=config.scan_layers)
  logging.info("Loaded %s checkpoint %s in %.1fs.", loaded.kind, loaded.path, time.perf_counter() - start)
  chat = runner.ChatModel(loaded.model, loaded.tokenizer, loaded.template, mesh=mesh,
                          batch_size=config.batch_size, max_prompt_len=config.max_prompt_len or None)
  results, summary = benchmark.run(chat, config, out_dir)
  return results, summary, out_dir


def main(argv: list[str]) -> None:
  """Runs the eval config and prints its summary."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}; settings go in --config.FIELD=VALUE.")
  distributed.initialize_from_flags()
  start = time.perf_counter()
  _, summary, out_dir = run(configuration.from_flags())
  print(summary, end="")
  print(f"Results in {out_dir} ({time.perf_counter() - start:.1f}s).")


def define_flags() -> None:
  """Command-line flags, defined only when run as a program (so modules can import each other)."""
  configuration.define_config_flag("An eval config from configs/eval/.")
  distributed.define_flags()


if __name__ == "__main__":
  define_flags()
  run_cli(main)
