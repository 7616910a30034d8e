"""Evaluates a checkpoint on a benchmark: CMB-Exam, MedS-Bench, CMB-Clin (csft_jax.eval.<name>).

  python -m csft_jax.evaluate --config=configs/eval/cmb.py --config.checkpoint=W
  python -m csft_jax.evaluate --config=configs/eval/meds_bench.py --config.checkpoint=W
  python -m csft_jax.evaluate --config=configs/eval/cmb.py --config.checkpoint=HF_DIR --config.out_dir=OUT
  python -m csft_jax.evaluate --config=configs/eval/cmb.py --config.checkpoint=BASE_HF_DIR --config.adapter=PEFT_DIR

`checkpoint` is a training workdir (latest step; the run's tokenizer and chat template), W/checkpoints,
a step directory, or an HF directory (its own tokenizer and template); see `csft_jax.loading`.
Results go to `W/eval/<name>/step_<N>/` for step N of a run W (a step directory, the workdir's latest
step, or the run's HF export at the step it was exported), `<dir>/eval/<name>/` for a directory
outside a run, or `--config.out_dir`; the name carries the mode (`cmb-answer`, `cmb-cot`,
`meds_bench`). A `--config.limit=K` run is partial: it writes `step_<N>-limit_K/` (`<name>-limit_K/`
outside a run), and reports keep it out of their columns. The output directory is checked for
writing and the benchmark's inputs are read and checked before the model loads. `results.json` is
what sweeps and reports read. A progress bar with ETA runs on stderr; a one-screen summary ends the
run. Ctrl-C (SIGINT) or SIGTERM finishes the batch in flight, keeps the finished generations in
`progress.jsonl` and exits 0; rerunning the same command generates only the rest.

Will it fit? `--compile_for=SLICE` compiles the generate program (prefill + decode on the KV cache)
for a TPU slice from this host, at the largest batch the evaluation compiles (`batch_size` rows of
`max_prompt_len` tokens + `max_new_tokens`), prints the per-device memory, ends with one JSON line
and exits 0 if it fits, 1 if not. The model's shape comes from `checkpoint` (its config only, no
weights are read) or `--compile_model=PRESET`; nothing is allocated:

  python -m csft_jax.evaluate --config=configs/eval/cmb.py --config.dtype=bfloat16 \
      --config.max_prompt_len=1024 --compile_for=v5p-8 --compile_model=internlm2_5_7b
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, NamedTuple

import jax
import ml_collections
from absl import app, flags, logging

from csft_jax import checkpointing, configuration, distributed, files, model_source, sharding
from csft_jax.console import run_cli
from csft_jax.convert.hf import is_hf_dir
from csft_jax.data.errors import DataError
from csft_jax.eval import judge, runner
from csft_jax.loading import LoadError, load_chat_model, weight_files
from csft_jax.models import PRESETS, ModelConfig, generation_attention, get_preset, lora, with_runtime
from csft_jax.stopping import StopRequest
from csft_jax.workdir import RunDir, model_tag


def evaluated_step(checkpoint: str, run: RunDir) -> int | str:
  """The step of run `run` that `checkpoint` holds: a step directory's, the latest one of the workdir,
  or for the run's HF or PEFT export the step it was exported at (another such directory: its name)."""
  if is_hf_dir(checkpoint) or lora.is_peft_dir(checkpoint):
    summary = run.read_summary() or {}
    exported = any(summary.get(k) and os.path.samefile(summary[k], checkpoint) for k in ("hf_export", "peft_export"))
    return summary["step"] if exported else os.path.basename(os.path.abspath(checkpoint))
  return int(os.path.basename(checkpointing.resolve_step_dir(checkpoint)))


def output_dir(config: ml_collections.ConfigDict, benchmark: runner.Benchmark) -> str:
  """Where the evaluation of `config` writes (see the module docstring)."""
  if config.out_dir:
    return config.out_dir
  name = benchmark.evaluation_name(config)
  # With an adapter, the adapter is what was trained: results go beside it, not beside the base.
  model = config.adapter or config.checkpoint
  run = RunDir.containing(model)
  if run is None:  # one model per directory: <dir>/eval/<name>/, or <name>-limit_<k>/ for a partial run
    return os.path.join(model, "eval", name + (f"-limit_{config.limit}" if config.limit else ""))
  return run.eval_dir(name, model_tag(evaluated_step(model, run), config.limit))


class Interrupted(NamedTuple):
  """What an evaluation stopped by a signal leaves: its journal, to continue from."""

  signal_name: str
  error: runner.EvaluationInterrupted


def _load_for_generation(
  config: ml_collections.ConfigDict,
  path: str,
  mesh,
  *,
  dtype: str,
  tokenizer: str,
  chat_template: str,
  adapter: str = "",
):
  """`path`'s model, tokenizer and template (`load_chat_model`, layers as `config.scan_layers`), the
  model set to the attention generation uses on this platform (`config.attention_impl`)."""
  start = time.perf_counter()
  loaded = load_chat_model(
    path, dtype=dtype, mesh=mesh, tokenizer=tokenizer, chat_template=chat_template, adapter=adapter,
    scan_layers=config.scan_layers,
  )  # fmt: skip
  logging.info("Loaded %s checkpoint %s in %.1fs.", loaded.kind, loaded.path, time.perf_counter() - start)
  attention = generation_attention(config.attention_impl, jax.default_backend())
  return dataclasses.replace(loaded, model=with_runtime(loaded.model, attention_impl=attention))


def run(config: ml_collections.ConfigDict) -> tuple[dict[str, Any] | None | Interrupted, str, str]:
  """Loads the model named by `config.checkpoint`, runs `config.benchmark`, writes its results.

  The benchmark's inputs are read and checked before the model loads. SIGINT/SIGTERM ends the batch
  in flight, keeps every finished generation (`runner.GenerationJournal`) and returns `Interrupted`;
  rerunning continues from there.

  Returns:
    `(results, None when unscored, or Interrupted; summary text; output directory)`.
  """
  config = configuration.resolve_paths(config)
  benchmark = runner.validate_config(config)
  out_dir = output_dir(config, benchmark)
  files.check_writable(out_dir, "config.out_dir (the evaluation's output directory)")
  inputs = benchmark.load(config)
  mesh = sharding.make_mesh(**config.mesh)
  loaded = _load_for_generation(
    config, config.checkpoint, mesh, dtype=config.dtype, tokenizer=config.tokenizer,
    chat_template=config.chat_template, adapter=config.adapter,
  )  # fmt: skip
  journal = runner.GenerationJournal(
    os.path.join(out_dir, "progress.jsonl"),
    runner.fingerprint(
      config, weight_files(config.checkpoint) + (weight_files(config.adapter) if config.adapter else [])
    ),
    primary=jax.process_index() == 0,
  )
  stop = StopRequest()
  chat = runner.ChatModel(
    loaded.model,
    loaded.tokenizer,
    loaded.template,
    mesh=mesh,
    batch_size=config.batch_size,
    max_prompt_len=config.max_prompt_len or None,
    journal=journal,
    should_stop=stop.requested,
    batching=config.batching,
  )

  def local_judge() -> runner.ChatModel:
    """The judge model named by `config.judge.model` (loaded only when an answer is left to judge)."""
    try:
      judged = _load_for_generation(
        config, config.judge.model, mesh, dtype=config.judge.dtype, tokenizer=config.judge.tokenizer,
        chat_template=config.judge.chat_template,
      )  # fmt: skip
    except (LoadError, DataError) as error:  # its advice names the evaluated model's fields: name the judge's
      message = str(error).replace("--config.", "--config.judge.")
      if isinstance(error, DataError):  # the template or tokenizer
        message += " (--config.judge.chat_template, --config.judge.tokenizer)"
      raise judge.JudgeError(f"config.judge.model={config.judge.model!r}: {message}") from None
    return runner.ChatModel(
      judged.model,
      judged.tokenizer,
      judged.template,
      mesh=mesh,
      batch_size=config.batch_size,
      max_prompt_len=None,
      should_stop=stop.requested,
      batching=config.batching,
    )

  try:
    results, summary = runner.run(benchmark, chat, config, out_dir, inputs, local_judge=local_judge)
  except runner.EvaluationInterrupted as e:
    return (
      Interrupted(stop.signal_name or "stop", e),
      (f"{stop.signal_name or 'stop'} received: {e}. Rerun the same command to continue.\n"),
      out_dir,
    )
  finally:
    stop.close()
    journal.close()
  return results, summary, out_dir


def model_config_for_compile(config: ml_collections.ConfigDict, preset: str | None) -> ModelConfig:
  """The evaluated model's shape in the dtype it runs in: the `preset`, else `config.checkpoint`'s
  config (an HF config.json or a checkpoint's model config; no weights are read)."""
  if preset:
    if preset not in PRESETS:
      raise ValueError(f"--compile_model={preset!r} is not a model preset; known presets: {', '.join(PRESETS)}.")
    return get_preset(
      preset,
      dtype=config.dtype,
      param_dtype=config.dtype,
      scan_layers=config.scan_layers,
      attention_impl=generation_attention(config.attention_impl, "tpu"),
    )
  if not config.checkpoint:
    raise ValueError(
      "--compile_for needs the model's shape: pass --config.checkpoint=DIR or "
      f"--compile_model=PRESET (one of {', '.join(PRESETS)})."
    )
  # Loaded in config.dtype, as load_chat_model does (a checkpoint keeps its layer layout); adapters
  # are merged before generation, so the program is the base's.
  overrides = dict(param_dtype=config.dtype, scan_layers=config.scan_layers) if is_hf_dir(config.checkpoint) else {}
  return model_source.resolve(config.checkpoint, dtype=config.dtype, **overrides).model_config.replace(
    lora_rank=0, lora_targets=(), attention_impl=generation_attention(config.attention_impl, "tpu")
  )


def compile_for(config: ml_collections.ConfigDict, slice_name: str, preset: str | None) -> None:
  """`--compile_for`: prints the generate program's per-device memory on `slice_name`; exits 0 or 1."""
  from csft_jax import aot

  config = configuration.resolve_paths(config)
  report = aot.check_generate_fit(config, slice_name, model_config_for_compile(config, preset))
  print(report.table())
  if not report.fits:
    print(aot.generate_advice(config))
  print(json.dumps(report.as_json()))
  sys.exit(0 if report.fits else 1)


def main(argv: list[str]) -> None:
  """Runs the eval config and prints its summary (or, with --compile_for, its memory on a slice)."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}; settings go in --config.FIELD=VALUE.")
  if flags.FLAGS.compile_for:
    compile_for(configuration.from_flags(), flags.FLAGS.compile_for, flags.FLAGS.compile_model)
  distributed.initialize_from_flags()
  start = time.perf_counter()
  outcome, summary, out_dir = run(configuration.from_flags())
  print(summary, end="")
  if isinstance(outcome, Interrupted):
    print(f"Interrupted after {time.perf_counter() - start:.1f}s.")
    return
  print(f"Results in {out_dir} ({time.perf_counter() - start:.1f}s).")


def define_flags() -> None:
  """Command-line flags, defined only when run as a program (so modules can import each other)."""
  configuration.define_config_flag("An eval config from configs/eval/.")
  distributed.define_flags()
  flags.DEFINE_string(
    "compile_for",
    None,
    "Will it fit? Compile the generate program for a TPU slice (v4-8, "
    "v5p-8, v5e-16, v6e-8, ...) from this host and report per-device "
    "memory; exit 0 if it fits, 1 if not. Needs the `tpu` extra.",
  )
  flags.DEFINE_string(
    "compile_model",
    None,
    "With --compile_for and no checkpoint at hand: the model preset (e.g. internlm2_5_7b) whose shape to compile.",
  )


if __name__ == "__main__":
  define_flags()
  run_cli(main)
