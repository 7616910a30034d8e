"""What every benchmark shares: the `Benchmark` interface, the common eval config, `ChatModel`.

A benchmark is one module `csft_jax.eval.<name>` that defines `BENCHMARK = Benchmark(...)`, plus
one config file `configs/eval/<name>.py`; `get_benchmark(name)` finds it, so the entry point
(`python -m csft_jax.evaluate`), sweeps and reports need no change to add one.

`ChatModel` turns messages into text with the engine (prompt template in, stop tokens out). A
benchmark's `run` builds its prompts, generates, scores, and writes its files into `out_dir`,
only after every generation is done and each atomically (`csft_jax.files`), so a failed run
leaves no partial results.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import pkgutil
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ml_collections
import tqdm
from absl import logging
from jax.sharding import Mesh

from csft_jax.eval import engine
from csft_jax.models import Decoder

Messages = list[dict[str, str]]


class EvalConfigError(ValueError):
  """An evaluation config that cannot be run (missing checkpoint, tokenizer, bad mode...)."""


def default_eval_config(benchmark: str) -> ml_collections.ConfigDict:
  """Fields every `configs/eval/*.py` shares: model, tokenizer, batching, mesh, output."""
  return ml_collections.ConfigDict(dict(
      benchmark=benchmark,
      checkpoint="",  # HF directory, training workdir W, W/checkpoints or a step directory.
      tokenizer="",  # Override the checkpoint's tokenizer directory.
      chat_template="",  # Override the checkpoint's template: hf | chatml | internlm2 | llama3.
      system_prompt="",
      dtype="float32",  # 'bfloat16' on TPU/GPU for large models.
      # HF checkpoints only (Orbax ones keep their saved layout). Unrolled layers prefill ~2x faster
      # on CPU; scanned ones keep compile time flat for deep models.
      scan_layers=False,
      mesh=ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)),
      batch_size=16,  # Sequences per compiled batch.
      max_prompt_len=0,  # 0: the model's context minus max_new_tokens; longer prompts lose their start.
      max_new_tokens=32,
      seed=0,
      limit=0,  # Evaluate only the first `limit` items (0: all), for smoke runs.
      # Where results go. Default: W/eval/<name>/ for a training run W (its checkpoints and its HF
      # export), <dir>/eval/<name>/ for a directory outside a run. Checked before any work.
      out_dir="",
  ))


Results = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """One benchmark, as the entry point, sweeps and reports see it.

  Attributes:
    name: the module name under `csft_jax.eval` and `config.benchmark`.
    inputs: `(config field, needed(config))` of the files it reads, checked before the model loads.
    result_name: the evaluation's name from its config (`W/eval/<result_name>/`); it carries the
      mode when a benchmark has several (`cmb-answer`, `cmb-cot`), so they never overwrite each other.
    run: `run(chat, config, out_dir) -> (results or None when unscored, summary text)`; writes
      `out_dir/results.json` when scored.
    report_cells: `results.json` contents -> `{column: value}` for `python -m csft_jax.report`
      (percent), columns without the evaluation's name (the report prefixes it).
    validate: raises `EvalConfigError` for a config it cannot run (before the model loads).
  """

  name: str
  inputs: tuple[tuple[str, Callable[[ml_collections.ConfigDict], bool]], ...]
  result_name: Callable[[ml_collections.ConfigDict], str]
  run: Callable[["ChatModel", ml_collections.ConfigDict, str], tuple[Results | None, str]]
  report_cells: Callable[[Results], dict[str, float]]
  validate: Callable[[ml_collections.ConfigDict], None] = lambda config: None


def benchmark_names() -> list[str]:
  """Modules of `csft_jax.eval` that define a `BENCHMARK`."""
  package = importlib.import_module("csft_jax.eval")
  names = []
  for info in pkgutil.iter_modules(package.__path__):
    if hasattr(importlib.import_module(f"csft_jax.eval.{info.name}"), "BENCHMARK"):
      names.append(info.name)
  return sorted(names)


def get_benchmark(name: str) -> Benchmark:
  """The benchmark `name` (a module `csft_jax.eval.<name>` with a `BENCHMARK`)."""
  try:
    module = importlib.import_module(f"csft_jax.eval.{name}")
  except ModuleNotFoundError as e:
    if e.name != f"csft_jax.eval.{name}":
      raise  # the benchmark exists but needs a package that is missing
    module = None
  if module is None or not isinstance(getattr(module, "BENCHMARK", None), Benchmark):
    raise EvalConfigError(f"config.benchmark={name!r}; choose one of {benchmark_names()}.")
  return module.BENCHMARK


def benchmark_of_result(result_name: str) -> Benchmark:
  """The benchmark that wrote `W/eval/<result_name>/` (the name starts with the benchmark's)."""
  return get_benchmark(result_name.split("-", 1)[0])


def validate_config(config: ml_collections.ConfigDict) -> Benchmark:
  """Fails fast, before loading a model, on a config that cannot run; returns its benchmark."""
  benchmark = get_benchmark(config.benchmark)
  if not config.checkpoint:
    raise EvalConfigError("config.checkpoint is empty: pass --config.checkpoint=W (training workdir, "
                          "checkpoint step directory, or HF model directory).")
  benchmark.validate(config)
  for field, needed in benchmark.inputs:
    if needed(config) and not os.path.exists(config[field]):
      raise EvalConfigError(f"config.{field}={config[field]!r} does not exist.")
  return benchmark


class ChatModel:
  """A model with its tokenizer and chat template: chat messages in, text out."""

  def __init__(self, model: Decoder, tokenizer, template, *, mesh: Mesh | None, batch_size: int,
               max_prompt_len: int | None):
    self.model, self.tokenizer, self.template = model, tokenizer, template
    self.mesh, self.batch_size, self.max_prompt_len = mesh, batch_size, max_prompt_len

  def generate(self, conversations: Sequence[Messages], *, max_new_tokens: int,
               sampling: engine.Sampling = engine.GREEDY, num_samples: int = 1, seed: int = 0,
               desc: str = "generate") -> tuple[list[list[str]], dict[str, int]]:
    """Generates `num_samples` replies per conversation.

    Returns:
      `(texts[conversation][sample], counts)`; counts has prompts, truncated_prompts,
      empty_generations (blank replies, scored as wrong) and compilations.
    """
    prompts = [self.template.encode_prompt(messages) for messages in conversations]
    with _progress_bar(len(prompts), desc) as advance:
      result = engine.generate(
          self.model, prompts, max_new_tokens, self.template.stop_token_ids, sampling=sampling,
          num_samples=num_samples, seed=seed, batch_size=self.batch_size, max_prompt_len=self.max_prompt_len,
          mesh=self.mesh, progress=advance)
    texts = [[self._decode(tokens) for tokens in samples] for samples in result.tokens]
    empty = sum(not text.strip() for samples in texts for text in samples)
    _report(len(prompts), result.num_truncated, empty)
    return texts, {"prompts": len(prompts), "truncated_prompts": result.num_truncated,
                   "empty_generations": empty, "compilations": result.num_compilations}

  def score_options(self, conversations: Sequence[Messages], options: Sequence[Sequence[str]],
                    desc: str = "score") -> tuple[list[dict[str, float]], dict[str, int]]:
    """Log-likelihood of each option text as the start of the assistant reply.

    Returns:
      `(scores[conversation][option], counts)` with prompts, truncated_prompts and compilations.
    """
    contexts, continuations = [], []
    for messages, texts in zip(conversations, options):
      context = self.template.encode_prompt(messages)
      for text in texts:
        contexts.append(context)
        continuations.append(self.tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids)
    with _progress_bar(len(contexts), desc, unit="option") as advance:
      result = engine.score(self.model, contexts, continuations, batch_size=self.batch_size,
                            max_len=self.max_prompt_len, mesh=self.mesh, progress=advance)
    values = iter(result.values)
    scores = [{text: next(values) for text in texts} for texts in options]
    _report(len(contexts), result.num_truncated, 0)
    return scores, {"prompts": len(conversations), "truncated_prompts": result.num_truncated,
                    "compilations": result.num_compilations}

  def _decode(self, tokens: Sequence[int]) -> str:
    if tokens and tokens[-1] in self.template.stop_token_ids:
      tokens = tokens[:-1]
    return self.tokenizer.decode(tokens, skip_special_tokens=True)


@contextlib.contextmanager
def _progress_bar(total: int, desc: str, unit: str = "prompt") -> Iterator[Callable[[int], None]]:
  """A tqdm bar on stderr (rate and ETA); yields a callback that sets the finished count."""
  bar = tqdm.tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)
  try:
    yield lambda done: bar.update(done - bar.n)
  finally:
    bar.close()


def _report(total: int, truncated: int, empty: int) -> None:
  if truncated:
    logging.warning("%d of %d prompts exceeded max_prompt_len and were truncated from the left "
                    "(counted in results: truncated_prompts).", truncated, total)
  if empty:
    logging.warning("%d generations were empty and are scored as wrong (counted in results: "
                    "empty_generations).", empty)


def sampling(config: ml_collections.ConfigDict) -> engine.Sampling:
  return engine.Sampling(temperature=config.temperature, top_p=config.top_p)


def settings(config: ml_collections.ConfigDict, names: Sequence[str]) -> dict[str, Any]:
  """The config fields a results file records (with the checkpoint evaluated)."""
  return {"checkpoint": config.checkpoint, **{name: config[name] for name in names}}
