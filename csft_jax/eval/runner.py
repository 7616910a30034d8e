"""Benchmark loops: CMB-Exam, MedS-Bench and CMB-Clin from chat messages to written results.

`ChatModel` turns messages into text with the engine (prompt template in, stop tokens out);
`run_cmb`, `run_meds_bench` and `run_cmb_clin` build each benchmark's prompts with its own module,
generate, score, and write their files into `out_dir`. Files are written only after every
generation is done, each atomically (`reporting`), so a failed run leaves no partial results.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import ml_collections
import tqdm
from absl import logging
from jax.sharding import Mesh

from csft_jax.data.config import REPO_ROOT
from csft_jax.eval import cmb, cmb_clin, engine, meds_bench, reporting
from csft_jax.models import Decoder

Messages = list[dict[str, str]]
SHIPPED_SAMPLES = "csft_jax/assets/eval"


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
      out_dir="",  # Default: <checkpoint workdir>/eval/<benchmark>.
  ))


# Input files per benchmark, checked before the (slow) model load: (config field, needed when).
_INPUTS = {
    "cmb": (("exam", lambda c: True), ("val", lambda c: c.shots > 0), ("answer_key", lambda c: bool(c.answer_key))),
    "meds_bench": (("task_dir", lambda c: True),),
    "cmb_clin": (("clin", lambda c: True),),
}


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Fails fast, before loading a model, on a config that cannot run."""
  if config.benchmark not in _INPUTS:
    raise EvalConfigError(f"config.benchmark={config.benchmark!r}; choose one of {sorted(_INPUTS)}.")
  if not config.checkpoint:
    raise EvalConfigError("config.checkpoint is empty: pass --config.checkpoint=W (training workdir, "
                          "checkpoint step directory, or HF model directory).")
  if config.benchmark == "cmb" and config.mode not in ("answer", "cot", "loglik"):
    raise EvalConfigError(f"config.mode={config.mode!r}; choose answer, cot or loglik.")
  for field, needed in _INPUTS[config.benchmark]:
    if needed(config) and not os.path.exists(resolve_path(config[field])):
      raise EvalConfigError(f"config.{field}={config[field]!r} does not exist (looked in the current directory "
                            f"and in {REPO_ROOT}).")


def resolve_path(path: str) -> str:
  """`path` as given if it exists, else relative to the repository root (shipped samples)."""
  path = os.path.expanduser(path)
  if os.path.isabs(path) or os.path.exists(path):
    return path
  return os.path.join(REPO_ROOT, path)


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


def _sampling(config: ml_collections.ConfigDict) -> engine.Sampling:
  return engine.Sampling(temperature=config.temperature, top_p=config.top_p)


def _settings(config: ml_collections.ConfigDict, names: Sequence[str]) -> dict[str, Any]:
  return {"checkpoint": config.checkpoint, **{name: config[name] for name in names}}


# -------------------------------------------------------------------- CMB ----


def run_cmb(chat: ChatModel, config: ml_collections.ConfigDict, out_dir: str) -> tuple[dict | None, str]:
  """CMB-Exam: answer / cot (generation + official extraction, majority vote) or loglik.

  Writes `submission.json`, `generations.json` and, with an answer key, `results.json` +
  `results.md` (`cmb.score_submission`). Returns `(results or None, summary text)`.
  """
  items = cmb.load_exam(resolve_path(config.exam))
  if config.limit:
    items = items[:config.limit]
  val = cmb.load_exam(resolve_path(config.val), require_answer=True) if config.shots else []
  system = config.system_prompt or None
  shots = [cmb.select_shots(val, item, config.shots, seed=config.seed) for item in items]
  if config.mode == "loglik":
    requests = [cmb.loglik_request(item, shots=s, system_prompt=system) for item, s in zip(items, shots)]
    scores, counts = chat.score_options([m for m, _ in requests], [letters for _, letters in requests],
                                        desc="CMB loglik")
    submission = [{"id": item["id"], "model_answer": cmb.loglik_answer(s)} for item, s in zip(items, scores)]
    records = [{"id": item["id"], "option_scores": s} for item, s in zip(items, scores)]
    protocol = cmb.LOGLIK_PROTOCOL
  else:
    conversations = [cmb.build_messages(item, mode=config.mode, shots=s, system_prompt=system)
                     for item, s in zip(items, shots)]
    texts, counts = chat.generate(conversations, max_new_tokens=config.max_new_tokens, sampling=_sampling(config),
                                  num_samples=config.num_samples, seed=config.seed, desc=f"CMB {config.mode}")
    submission, extraction_counts = cmb.build_submission(items, texts)
    counts.update(extraction_counts)
    records = [{"id": item["id"], "samples": samples, "model_answer": entry["model_answer"]}
               for item, samples, entry in zip(items, texts, submission)]
    protocol = cmb.OFFICIAL_PROTOCOL
  reporting.write_json_atomic(os.path.join(out_dir, "generations.json"), records)
  cmb.write_submission(submission, os.path.join(out_dir, "submission.json"))
  if not config.answer_key:
    return None, (f"No answer key: wrote {out_dir}/submission.json ({len(submission)} answers); score it with "
                  "`python -m csft_jax.eval.cmb score`.\n")
  key = cmb.load_answer_key(resolve_path(config.answer_key))
  asked = {item["id"] for item in items}
  results = cmb.score_submission(submission, [e for e in key if e["id"] in asked], protocol=protocol,
                                 generation_stats=counts)
  results["settings"] = _settings(config, ("mode", "shots", "num_samples", "temperature", "top_p",
                                           "max_new_tokens", "exam"))
  cmb.write_results(results, os.path.join(out_dir, "results.json"))
  return results, _cmb_summary(results)


def _cmb_summary(results: Mapping[str, Any]) -> str:
  rows = [[exam_type, 100 * acc] for exam_type, acc in results["accuracy_per_category"].items()]
  rows += [["overall micro", 100 * results["overall"]["micro"]],
           ["overall macro", 100 * results["overall"]["macro"]]]
  counts = ", ".join(f"{k}={v}" for k, v in results["counts"].items())
  return (f"CMB-Exam ({results['protocol']})\n" + reporting.markdown_table(["exam_type", "accuracy (%)"], rows)
          + f"counts: {counts}\n")


# ------------------------------------------------------------- MedS-Bench ----


def run_meds_bench(chat: ChatModel, config: ml_collections.ConfigDict, out_dir: str) -> tuple[dict, str]:
  """MedS-Bench: 3-shot greedy generation per instance, `results.csv`, then scoring.

  Writes `results.csv` (task_id,input,GT,output), `results.json` (`meds_bench.score_rows` plus
  generation counts) and `results.md`. Returns `(results, summary text)`.
  """
  tasks = meds_bench.load_task_dir(resolve_path(config.task_dir))
  pairs = [(task, instance) for task in tasks.values() for instance in task["Instances"]]
  if config.limit:
    pairs = pairs[:config.limit]
  conversations = [meds_bench.build_messages(
      task, instance, shots=meds_bench.select_shots(task, instance, config.shots, seed=config.seed))
                   for task, instance in pairs]
  texts, counts = chat.generate(conversations, max_new_tokens=config.max_new_tokens, desc="MedS-Bench")
  rows = [{"task_id": task["task_id"], "input": chat.template.render_prompt(messages),
           "GT": meds_bench.gold_output(instance), "output": samples[0]}
          for (task, instance), messages, samples in zip(pairs, conversations, texts)]
  meds_bench.write_results_csv(rows, os.path.join(out_dir, "results.csv"))
  results = meds_bench.score_rows(rows, tasks=tasks)
  results["counts"] = counts
  results["settings"] = _settings(config, ("shots", "max_new_tokens", "task_dir"))
  reporting.write_json_atomic(os.path.join(out_dir, "results.json"), results)
  reporting.write_text_atomic(os.path.join(out_dir, "results.md"), meds_bench.summary_table(results))
  return results, _meds_summary(results)


def _meds_summary(results: Mapping[str, Any]) -> str:
  metrics = ("accuracy", "bleu1", "rougeL", "f1")
  rows = [[category, len(m["tasks"]), m["n"], *(f"{m[k]:.2f}" if k in m else "" for k in metrics)]
          for category, m in results["categories"].items()]
  counts = ", ".join(f"{k}={v}" for k, v in results["counts"].items())
  return ("MedS-Bench (3-shot, greedy)\n" + reporting.markdown_table(["category", "tasks", "n", *metrics], rows)
          + f"counts: {counts}\n")


# --------------------------------------------------------------- CMB-Clin ----


def run_cmb_clin(chat: ChatModel, config: ml_collections.ConfigDict, out_dir: str) -> tuple[dict, str]:
  """CMB-Clin: one greedy reply per (case, question), gold history; judge prompts + proxy scores.

  Writes `results.json` (`{"summary", "records"}`, `cmb_clin.write_outputs`). Returns
  `(summary dict, summary text)`.
  """
  cases = cmb_clin.load_clin(resolve_path(config.clin))
  if config.limit:
    cases = cases[:config.limit]
  system = config.system_prompt or None
  asks = [(c, t) for c, case in enumerate(cases) for t in range(len(case["QA_pairs"]))]
  conversations = [cmb_clin.build_messages(cases[c], t, system_prompt=system) for c, t in asks]
  texts, counts = chat.generate(conversations, max_new_tokens=config.max_new_tokens, desc="CMB-Clin")
  answers: list[list[str]] = [[] for _ in cases]
  for (c, _), samples in zip(asks, texts):
    answers[c].append(samples[0])
  records = cmb_clin.build_records(cases, answers)
  summary = cmb_clin.summarize(records)
  summary.update(counts=counts, settings=_settings(config, ("max_new_tokens", "clin")))
  reporting.write_json_atomic(os.path.join(out_dir, "results.json"), {"summary": summary, "records": records})
  rows = [["ROUGE-L", summary["rougeL"]], ["BLEU-1", summary["bleu1"]]]
  counts_text = ", ".join(f"{k}={v}" for k, v in counts.items())
  return summary, (f"CMB-Clin ({summary['protocol']})\n" + reporting.markdown_table(["metric", "%"], rows)
                   + f"questions={summary['n']}, {counts_text}\n")


RUNNERS = {"cmb": run_cmb, "meds_bench": run_meds_bench, "cmb_clin": run_cmb_clin}
