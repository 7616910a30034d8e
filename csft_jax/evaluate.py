"""Evaluates a checkpoint on CMB-Exam, MedS-Bench or CMB-Clin.

  python -m csft_jax.evaluate --config=configs/eval/cmb.py --config.checkpoint=W
  python -m csft_jax.evaluate --config=configs/eval/meds_bench.py --config.checkpoint=W
  python -m csft_jax.evaluate --config=configs/eval/cmb_clin.py --config.checkpoint=HF_DIR

`checkpoint` is a training workdir (latest step; tokenizer and chat template from W/config.json),
W/checkpoints, a step directory, or an HF directory (its own tokenizer, template 'hf'). Results
go to `<workdir>/eval/<benchmark>/` (or `--config.out_dir`): `results.json` is what sweeps and
reports read. A progress bar with ETA runs on stderr; a one-screen summary ends the run.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from csft_jax import distributed, sharding
from csft_jax.console import quiet_library_info_logs
from csft_jax.data.config import REPO_ROOT
from csft_jax.data.errors import DataError
from csft_jax.data.templates import ChatTemplate, load_chat_template
from csft_jax.data.tokenizer import load_tokenizer
from csft_jax.eval import cmb, cmb_clin, engine, meds_bench, runner


# Problems with the inputs a person can fix; reported as one line, without a traceback.
INPUT_ERRORS = (runner.EvalConfigError, cmb.CMBInputError, meds_bench.MedSInputError, cmb_clin.ClinInputError,
                DataError, FileNotFoundError)


def run(config: ml_collections.ConfigDict) -> tuple[dict[str, Any] | None, str, str]:
  """Loads the model named by `config.checkpoint`, runs `config.benchmark`, writes its results.

  Returns:
    `(results or None when unscored, summary text, output directory)`.
  """
  runner.validate_config(config)
  mesh = sharding.make_mesh(**config.mesh)
  start = time.perf_counter()
  model, source = engine.load_model(runner.resolve_path(config.checkpoint), dtype=config.dtype, mesh=mesh,
                                    scan_layers=config.scan_layers)
  logging.info("Loaded %s checkpoint %s in %.1fs.", source.kind, source.path, time.perf_counter() - start)
  chat = runner.ChatModel(model, *_tokenizer_and_template(config, source, model.config.vocab_size), mesh=mesh,
                          batch_size=config.batch_size, max_prompt_len=config.max_prompt_len or None)
  out_dir = config.out_dir or os.path.join(source.workdir, "eval", config.benchmark)
  results, summary = runner.RUNNERS[config.benchmark](chat, config, out_dir)
  return results, summary, out_dir


def _tokenizer_and_template(config: ml_collections.ConfigDict, source: engine.ModelSource,
                            vocab_size: int) -> tuple[Any, ChatTemplate]:
  """The eval config's tokenizer/template, else the checkpoint's; checked against the model."""
  tokenizer_dir = config.tokenizer or source.tokenizer
  if not tokenizer_dir:
    raise runner.EvalConfigError(
        f"No tokenizer for checkpoint {source.path}: it has no tokenizer files and no training config.json "
        "naming one; pass --config.tokenizer=DIR.")
  tokenizer = load_tokenizer(tokenizer_dir, REPO_ROOT)
  if len(tokenizer) > vocab_size:
    raise runner.EvalConfigError(
        f"Tokenizer {tokenizer_dir} has {len(tokenizer)} tokens but the model's vocab_size is {vocab_size}: "
        "they do not belong together; pass the model's own tokenizer with --config.tokenizer=DIR.")
  template_name = config.chat_template or source.chat_template
  if not template_name:
    raise runner.EvalConfigError(
        f"No chat template known for checkpoint {source.path}; pass --config.chat_template=hf|chatml|internlm2|llama3.")
  return tokenizer, load_chat_template(template_name, tokenizer)


def main(argv: list[str]) -> None:
  """Runs the eval config and prints its summary; input problems exit with one `error:` line."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}; settings go in --config.FIELD=VALUE.")
  if not flags.FLAGS["verbosity"].present:
    quiet_library_info_logs()
  distributed.initialize_from_flags()
  start = time.perf_counter()
  try:
    _, summary, out_dir = run(flags.FLAGS.config)
  except INPUT_ERRORS as error:
    sys.exit(f"error: {error}")
  print(summary, end="")
  print(f"Results in {out_dir} ({time.perf_counter() - start:.1f}s).")


def define_flags() -> None:
  """Command-line flags, defined only when run as a program (so modules can import each other)."""
  config_flags.DEFINE_config_file("config", None, "An eval config from configs/eval/.")
  distributed.define_flags()


if __name__ == "__main__":
  define_flags()
  app.run(main)
