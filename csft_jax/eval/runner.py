"""What every benchmark shares: the `Benchmark` interface, the common eval config, the runner.

A benchmark is one module `csft_jax.eval.<name>` that defines `BENCHMARK = Benchmark(...)`, plus
one config file `configs/eval/<name>.py`; `get_benchmark(name)` finds it, so the entry point
(`python -m csft_jax.evaluate`), the `python -m csft_jax.score` CLI, sweeps and reports need no
change to add one.

Roles. A benchmark says what to ask and how to score: its `requests` (conversations, with option
texts for log-likelihood, samples per prompt, an official prompt cut), its `sampling` rule, and its
`score` of the answers (results, summary, the files to write). The runner (`run`) owns the rest:
`ChatModel` generates (prompt template in, stop tokens out, truncation, progress), and the result
files are written only after every generation is done, each atomically (`csft_jax.files`), so a
failed run leaves no partial results.

Interruption: every finished prompt's generations go to `out_dir/progress.jsonl` as they finish
(`GenerationJournal`). SIGINT/SIGTERM ends the batch in flight and raises `EvaluationInterrupted`;
rerunning the same command reads the journal back and generates only the prompts still to do, with
the same sampling keys, so its results equal an uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import json
import os
import pkgutil
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ml_collections
import tqdm
from absl import logging
from jax.sharding import Mesh

from csft_jax import configuration, files
from csft_jax.eval import engine, judge
from csft_jax.models import Decoder
from csft_jax.models.config import ATTENTION_IMPLEMENTATIONS

Messages = list[dict[str, str]]


class EvalConfigError(ValueError):
  """An evaluation config that cannot be run (missing checkpoint, tokenizer, bad mode...)."""


class EvaluationInterrupted(Exception):
  """A signal stopped the evaluation between batches; its finished generations are in the journal."""

  def __init__(self, done: int, total: int, kept: str):
    super().__init__(f"{done} of {total} prompts done; {kept}")
    self.done, self.total = done, total


class GenerationJournal(files.JsonlJournal):
  """`progress.jsonl` of an evaluation: one line per finished prompt, flushed as it finishes.

  Guarantee: every prompt whose line was written is never generated again by a rerun with the same
  settings (`fingerprint`); a line is matched by (generation call, prompt index, prompt tokens), so a
  changed prompt is generated anew. A journal of other settings is set aside as `.old`, and a line
  cut off by a kill is ignored. Only the primary process writes.
  """

  def __init__(self, path: str, fingerprint: str, *, primary: bool = True):
    super().__init__(path, fingerprint, primary=primary)
    self._done: dict[tuple[str, int], tuple[str, list[list[int]]]] = {
      (entry["call"], entry["index"]): (entry["prompt_sha"], entry["samples"]) for entry in self.records
    }

  def finished(self, call: str, index: int, prompt: Sequence[int]) -> list[list[int]] | None:
    entry = self._done.get((call, index))
    return entry[1] if entry is not None and entry[0] == _sha(prompt) else None

  def add(self, call: str, index: int, prompt: Sequence[int], samples: list[list[int]]) -> None:
    digest = _sha(prompt)
    self._done[(call, index)] = (digest, samples)
    self.write({"call": call, "index": index, "prompt_sha": digest, "samples": samples})


def _sha(prompt: Sequence[int]) -> str:
  return hashlib.sha1(json.dumps(list(prompt)).encode()).hexdigest()


configuration.declare_path_fields("checkpoint", "adapter", "tokenizer", "out_dir")


def default_eval_config(benchmark: str) -> ml_collections.ConfigDict:
  """Fields every `configs/eval/*.py` shares: model, tokenizer, batching, mesh, output. Imports the
  benchmark's module, so the path fields it declares are known when the config's paths resolve."""
  importlib.import_module(f"csft_jax.eval.{benchmark}")
  return ml_collections.ConfigDict(
    dict(
      benchmark=benchmark,
      checkpoint="",  # HF directory, training workdir W, W/checkpoints or a step directory.
      # A LoRA adapter on `checkpoint` (its base): a PEFT directory, or a LoRA run's workdir / step.
      # Added to the weights in memory; nothing is merged on disk.
      adapter="",
      tokenizer="",  # Override the checkpoint's tokenizer directory.
      chat_template="",  # Override the checkpoint's template: a name in csft_jax.data.templates.TEMPLATES.
      system_prompt="",
      dtype="float32",  # 'bfloat16' on TPU/GPU for large models.
      # HF checkpoints only (Orbax ones keep their saved layout). Unrolled layers prefill faster on
      # CPU; scanned ones keep compile time flat for deep models.
      scan_layers=False,
      # Prefill attention: auto = splash on TPU, blockwise elsewhere (only the causal blocks of each
      # row are computed); or one of xla | cudnn | blockwise | splash. Decode steps attend densely.
      attention_impl="auto",
      mesh=ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)),
      batch_size=16,  # Sequences per compiled batch (decode slots with continuous batching).
      # continuous: a decode slot takes the next prompt as soon as its reply stops (for replies of
      # very different lengths; the README has measured speeds); static: a batch decodes until its
      # longest reply stops (a few % faster when every reply runs to max_new_tokens). Both share
      # common prompt starts' prefill, and give the same tokens.
      batching="continuous",
      max_prompt_len=0,  # 0: the model's context minus max_new_tokens; longer prompts lose their start.
      max_new_tokens=32,
      seed=0,
      limit=0,  # Evaluate only the first `limit` items (0: all), for smoke runs.
      # Where results go. Default: W/eval/<name>/ for a training run W (its checkpoints and its HF
      # export), <dir>/eval/<name>/ for a directory outside a run. Checked before any work.
      out_dir="",
    )
  )


Results = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Requests:
  """What a benchmark asks the model, one entry per conversation.

  Attributes:
    conversations: the chat messages of each prompt.
    desc: the progress bar's and the journal's name for these requests.
    options: None to generate `num_samples` replies per conversation (with the benchmark's
      `sampling`, `config.max_new_tokens`, `config.seed`); else the option texts of each
      conversation, scored by their log-likelihood as the start of the reply.
    official_ids: `official_ids(prompt text, ids) -> ids`: the token ids an official script feeds
      for a rendered prompt, where they differ from the chat template's (e.g. a second BOS).
    cut: `(limit, side)`: a prompt longer than `limit` tokens loses its 'right' or 'left' end, as an
      official script's tokenizer truncation does (counted as `cut_at_limit`); None keeps prompts
      whole (the engine's `max_prompt_len` still applies).
  """

  conversations: list[Messages]
  desc: str
  options: list[list[str]] | None = None
  num_samples: int = 1
  official_ids: Callable[[str, list[int]], list[int]] | None = None
  cut: tuple[int, str] | None = None


@dataclasses.dataclass(frozen=True)
class Answers:
  """The model's answers to `Requests`: `texts[conversation][sample]` for generation, or
  `option_scores[conversation][option]` for log-likelihood; `prompts`, each conversation as the
  chat template renders it (whole, before any cut); `counts` of prompts, truncations, empty replies
  and compiled programs; with a judge, `judged`: its record of each of `Judging.prompts`."""

  prompts: list[str]
  texts: list[list[str]] | None
  option_scores: list[dict[str, float]] | None
  counts: dict[str, int]
  judged: list[dict[str, Any]] | None = None  # the judge's record of each judge prompt (`judge.judge_all`)


@dataclasses.dataclass(frozen=True)
class Scored:
  """A benchmark's score of its answers: `results` (None when unscored, e.g. no answer key), the
  summary text to print, and `files` (name in the output directory -> text) for the runner to write,
  in order (results.json last)."""

  results: Results | None
  summary: str
  files: dict[str, str]


def sampling_of(config: ml_collections.ConfigDict) -> engine.Sampling:
  """The decoding rule of the `engine.Sampling` fields the config has (temperature, top_p,
  repetition_penalty, min_new_tokens); greedy where it has none."""
  fields = {field.name: config[field.name] for field in dataclasses.fields(engine.Sampling) if field.name in config}
  try:
    return engine.Sampling(**fields)
  except ValueError as error:
    raise EvalConfigError(f"config: {error}") from error


@dataclasses.dataclass(frozen=True)
class OfflineScoring:
  """`python -m csft_jax.score <name>`: scoring saved outputs without a model. `define_flags()`
  defines its absl flags, `main(flags.FLAGS)` runs it and returns the exit status."""

  define_flags: Callable[[], None]
  main: Callable[[Any], int]


@dataclasses.dataclass(frozen=True)
class Judging:
  """Scoring by an LLM judge (`csft_jax.eval.judge`, on when `config.judge.model` or `.endpoint` is
  set): `prompts(config, inputs, answers)` gives `(key, prompt)` per answer, `parse(reply)` the
  scores in a reply (None: unreadable); the benchmark's `score` reads them in `answers.judged`."""

  prompts: Callable[[ml_collections.ConfigDict, Any, Answers], list[tuple[str, str]]]
  parse: Callable[[str], dict[str, int] | None]


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """One benchmark, as the entry point, the score CLI, sweeps and reports see it.

  Attributes:
    name: the module name under `csft_jax.eval` and `config.benchmark`.
    requests: `requests(config, inputs) -> Requests`: what to ask.
    score: `score(config, inputs, answers) -> Scored`: how the answers score, and the files to write.
    report_cells: `results.json` contents -> `{column: value}` for `python -m csft_jax.report`
      (percent), columns without the evaluation's name (the report prefixes it).
    inputs: the config fields naming the files it reads, checked before the model loads: a field
      name (always read), or `(field, needed(config))` for a file read only in some configs.
    result_name: the evaluation's name from its config (`W/eval/<result_name>/`); it carries the
      mode when a benchmark has several (`cmb-answer`, `cmb-cot`), so they never overwrite each
      other. None: the benchmark's name.
    validate: raises `EvalConfigError` for a config it cannot run (before the model loads; the
      runner builds the `sampling` rule then too, so a bad sampling setting also fails early).
    load: reads and checks the benchmark's input files (before the model loads: a bad item is
      reported in seconds, not after minutes of loading weights); its value is the `inputs` above.
    sampling: the decoding rule its generations use (default: `sampling_of(config)`): the runner
      generates with it and `evaluate --compile_for` compiles it, so both are the same program.
    offline: its `python -m csft_jax.score` command (None: no offline scoring).
    judging: how an LLM judge scores it (None: not judged).
  """

  name: str
  requests: Callable[[ml_collections.ConfigDict, Any], Requests]
  score: Callable[[ml_collections.ConfigDict, Any, Answers], Scored]
  report_cells: Callable[[Results], dict[str, float]]
  inputs: tuple[str | tuple[str, Callable[[ml_collections.ConfigDict], bool]], ...] = ()
  result_name: Callable[[ml_collections.ConfigDict], str] | None = None
  validate: Callable[[ml_collections.ConfigDict], None] = lambda config: None
  load: Callable[[ml_collections.ConfigDict], Any] = lambda config: None
  sampling: Callable[[ml_collections.ConfigDict], engine.Sampling] = sampling_of
  offline: OfflineScoring | None = None
  judging: Judging | None = None

  def __post_init__(self):
    configuration.declare_path_fields(*(field for field, _ in self.input_fields()))  # its inputs are paths

  def input_fields(self) -> list[tuple[str, Callable[[ml_collections.ConfigDict], bool]]]:
    """`inputs` as `(field, needed(config))` pairs."""
    return [(entry, lambda config: True) if isinstance(entry, str) else entry for entry in self.inputs]

  def evaluation_name(self, config: ml_collections.ConfigDict) -> str:
    """The evaluation's directory name under `W/eval/` (see `result_name`)."""
    return self.name if self.result_name is None else self.result_name(config)


def run(
  benchmark: Benchmark,
  chat: ChatModel,
  config: ml_collections.ConfigDict,
  out_dir: str,
  inputs: Any,
  *,
  local_judge: Callable[[], ChatModel] | None = None,
) -> tuple[Results | None, str]:
  """Asks `benchmark`'s requests, has a judge read the answers when the benchmark is judged and
  `config.judge` names one (`local_judge` builds a local judge's ChatModel), scores the answers, and
  writes the files into `out_dir` (after every answer is in, each atomically).

  Returns:
    `(results or None, summary text)`.
  """
  requests = benchmark.requests(config, inputs)
  prompts = [chat.template.render_prompt(messages) for messages in requests.conversations]
  if requests.options is None:
    texts, counts = chat.generate(
      requests.conversations,
      max_new_tokens=config.max_new_tokens,
      sampling=benchmark.sampling(config),
      num_samples=requests.num_samples,
      seed=config.seed,
      desc=requests.desc,
      official_ids=requests.official_ids,
      cut=requests.cut,
    )
    answers = Answers(prompts, texts, None, counts)
  else:
    scores, counts = chat.score_options(requests.conversations, requests.options, desc=requests.desc)
    answers = Answers(prompts, None, scores, counts)
  if benchmark.judging is not None and judge.enabled(config):
    judged = judge.judge_all(
      config,
      benchmark.judging.prompts(config, inputs, answers),
      benchmark.judging.parse,
      out_dir,
      local_chat=local_judge,
      should_stop=chat.should_stop,
      primary=chat.journal is None or chat.journal.primary,
    )
    answers = dataclasses.replace(answers, judged=judged)
  scored = benchmark.score(config, inputs, answers)
  for name, text in scored.files.items():
    files.write_text_atomic(os.path.join(out_dir, name), text)
  return scored.results, scored.summary


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
    raise EvalConfigError(
      "config.checkpoint is empty: pass --config.checkpoint=W (training workdir, "
      "checkpoint step directory, or HF model directory)."
    )
  implementations = ("auto",) + ATTENTION_IMPLEMENTATIONS
  if config.attention_impl not in implementations:
    raise EvalConfigError(f"config.attention_impl={config.attention_impl!r}; choose one of {implementations}.")
  benchmark.validate(config)
  benchmark.sampling(config)
  if judge.enabled(config):
    if benchmark.judging is None:
      raise EvalConfigError(f"config.judge: benchmark {benchmark.name!r} is not scored by a judge.")
    judge.validate(config)
  for field, needed in benchmark.input_fields():
    if needed(config) and not os.path.exists(config[field]):
      raise EvalConfigError(f"config.{field}={config[field]!r} does not exist.")
  return benchmark


class ChatModel:
  """A model with its tokenizer and chat template: chat messages in, text out."""

  def __init__(
    self,
    model: Decoder,
    tokenizer,
    template,
    *,
    mesh: Mesh | None,
    batch_size: int,
    max_prompt_len: int | None,
    journal: GenerationJournal | None = None,
    should_stop: Callable[[], bool] | None = None,
    batching: str = "static",
  ):
    self.model, self.tokenizer, self.template = model, tokenizer, template
    self.mesh, self.batch_size, self.max_prompt_len = mesh, batch_size, max_prompt_len
    self.journal, self.should_stop, self.batching = journal, should_stop, batching

  def generate(
    self,
    conversations: Sequence[Messages],
    *,
    max_new_tokens: int,
    sampling: engine.Sampling = engine.GREEDY,
    num_samples: int = 1,
    seed: int = 0,
    desc: str = "generate",
    official_ids: Callable[[str, list[int]], list[int]] | None = None,
    cut: tuple[int, str] | None = None,
    on_reply: Callable[[int, list[str]], None] | None = None,
  ) -> tuple[list[list[str]], dict[str, int]]:
    """Generates `num_samples` replies per conversation, prompted with `prompt_ids`; `on_reply(i,
    texts)` is called as conversation i's replies are done (not for those the journal had).

    Returns:
      `(texts[conversation][sample], counts)`; counts has prompts, truncated_prompts (by the
      engine's `max_prompt_len`), cut_at_limit (with `cut`), empty_generations (blank replies,
      scored as wrong) and compilations.
    """
    prompts, num_cut = self.prompt_ids(conversations, official_ids=official_ids, cut=cut)
    limit = engine.prompt_limit(self.model, max_new_tokens, self.max_prompt_len)
    tokens = [self.journal.finished(desc, i, p) if self.journal else None for i, p in enumerate(prompts)]
    todo = [i for i, done in enumerate(tokens) if done is None]
    if len(todo) < len(prompts):
      logging.info(
        "%s: %d of %d prompts were done before (%s); generating the other %d.",
        desc,
        len(prompts) - len(todo),
        len(prompts),
        self.journal.path,
        len(todo),
      )

    def finished(j: int, samples: list[list[int]]) -> None:
      tokens[todo[j]] = samples
      if self.journal:
        self.journal.add(desc, todo[j], prompts[todo[j]], samples)
      if on_reply is not None:
        on_reply(todo[j], [self._decode(sample) for sample in samples])

    compilations = 0
    if todo:
      with progress_bar(len(prompts), desc, initial=len(prompts) - len(todo)) as advance:
        result = engine.generate(
          self.model,
          [prompts[i] for i in todo],
          max_new_tokens,
          self.template.stop_token_ids,
          sampling=sampling,
          num_samples=num_samples,
          seed=seed,
          batch_size=self.batch_size,
          max_prompt_len=self.max_prompt_len,
          mesh=self.mesh,
          progress=lambda done: advance(len(prompts) - len(todo) + done),
          key_ids=todo,
          on_prompt_done=finished,
          should_stop=self.should_stop,
          batching=self.batching,
        )
      compilations = result.num_compilations
      if result.stopped:
        raise EvaluationInterrupted(
          sum(t is not None for t in tokens),
          len(prompts),
          f"kept in {self.journal.path}" if self.journal else "not kept (no journal)",
        )
    texts = [[self._decode(sample) for sample in samples] for samples in tokens]
    empty = sum(not text.strip() for samples in texts for text in samples)
    truncated = sum(len(prompt) > limit for prompt in prompts)
    _report(len(prompts), truncated, empty)
    return texts, {
      "prompts": len(prompts),
      "truncated_prompts": truncated,
      **({"cut_at_limit": num_cut} if cut is not None else {}),
      "empty_generations": empty,
      "compilations": compilations,
    }

  def prompt_ids(
    self,
    conversations: Sequence[Messages],
    *,
    official_ids: Callable[[str, list[int]], list[int]] | None = None,
    cut: tuple[int, str] | None = None,
  ) -> tuple[list[list[int]], int]:
    """The token ids of each conversation's prompt (chat template, then `official_ids` of the rendered
    text, then `cut=(limit, side)`: `cut_prompt`), and how many prompts were cut."""
    texts = [self.template.render_prompt(messages) for messages in conversations]
    prompts = [
      encoding.ids
      for encoding in self.template.tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    ]
    if official_ids is not None:
      prompts = [official_ids(text, ids) for text, ids in zip(texts, prompts)]
    if cut is None:
      return prompts, 0
    return [cut_prompt(prompt, *cut) for prompt in prompts], sum(len(prompt) > cut[0] for prompt in prompts)

  def score_options(
    self, conversations: Sequence[Messages], options: Sequence[Sequence[str]], desc: str = "score"
  ) -> tuple[list[dict[str, float]], dict[str, int]]:
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
    with progress_bar(len(contexts), desc, unit="option") as advance:
      result = engine.score(
        self.model,
        contexts,
        continuations,
        batch_size=self.batch_size,
        max_len=self.max_prompt_len,
        mesh=self.mesh,
        progress=advance,
        should_stop=self.should_stop,
      )
    if result is None:  # log-likelihoods are cheap next to generation: none are kept
      raise EvaluationInterrupted(
        0, len(conversations), "log-likelihoods are not kept (scoring is fast): the rerun starts over"
      )
    values = iter(result.values)
    scores = [{text: next(values) for text in texts} for texts in options]
    _report(len(contexts), result.num_truncated, 0)
    return scores, {
      "prompts": len(conversations),
      "truncated_prompts": result.num_truncated,
      "compilations": result.num_compilations,
    }

  def _decode(self, tokens: Sequence[int]) -> str:
    if tokens and tokens[-1] in self.template.stop_token_ids:
      tokens = tokens[:-1]
    return self.tokenizer.decode(tokens, skip_special_tokens=True)


def cut_prompt(tokens: Sequence[int], limit: int, side: str) -> list[int]:
  """`tokens` cut to `limit`, losing the `side` ('right': the end, as HF tokenizers truncate by
  default; 'left': the start)."""
  if side not in ("right", "left"):
    raise ValueError(f"cut side {side!r}; expected 'right' or 'left'.")
  if len(tokens) <= limit:
    return list(tokens)
  return list(tokens[:limit]) if side == "right" else list(tokens[len(tokens) - limit :])


@contextlib.contextmanager
def progress_bar(total: int, desc: str, unit: str = "prompt", initial: int = 0) -> Iterator[Callable[[int], None]]:
  """A tqdm bar on stderr (rate and ETA); yields a callback that sets the finished count."""
  bar = tqdm.tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, initial=initial)
  try:
    yield lambda done: bar.update(done - bar.n)
  finally:
    bar.close()


def _report(total: int, truncated: int, empty: int) -> None:
  if truncated:
    logging.warning(
      "%d of %d prompts exceeded max_prompt_len and were truncated from the left "
      "(counted in results: truncated_prompts).",
      truncated,
      total,
    )
  if empty:
    logging.warning("%d generations were empty and are scored as wrong (counted in results: empty_generations).", empty)


def settings(config: ml_collections.ConfigDict, names: Sequence[str]) -> dict[str, Any]:
  """The config fields a results file records: the checkpoint evaluated, `limit` (> 0: a partial
  evaluation of the first `limit` items, which reports keep out of their full columns), and `names`."""
  return {
    "checkpoint": config.checkpoint,
    **({"adapter": config.adapter} if config.get("adapter") else {}),
    "limit": config.limit,
    **{name: config[name] for name in names},
  }


def fingerprint(config: ml_collections.ConfigDict, weights: Sequence[str]) -> str:
  """What decides an evaluation's generations: the config less batching, mesh, output place and
  judge (greedy answers do not depend on them; sampled ones are keyed by prompt and sample), and the
  size and modification time of the model's weight files `weights` (a model rewritten in place is
  a different model)."""
  fields = {
    k: v for k, v in config.to_dict().items() if k not in ("batch_size", "batching", "mesh", "out_dir", "judge")
  }
  return files.fingerprint(fields, weights)
