"""Benchmarks the evaluation engine against transformers `generate` on CMB-format questions.

  python tools/bench_eval.py [--num_questions=48] [--batch_size=16] [--max_new_tokens=32] [--json]

For each model (the demo model of configs/demo.py and the ~100M `llama_100m` preset), one random
Llama is built in transformers (float32), saved, and loaded by `csft_jax.convert.load_hf`, so both
engines run the same weights. The questions are the shipped CMB sample (answer-only prompt, chatml
template, demo tokenizer), repeated to `num_questions`. Both engines decode greedily with the
same stop tokens and `max_new_tokens`, in batches of `batch_size` prompts sorted by length (the
same batches for both, left-padded). Times exclude compilation / warm-up (untimed passes; compile
time is reported separately) and are the fastest of `--repeats` passes. Log-likelihood mode scores every option letter instead of
generating. Tokens are checked identical between the engines.

MedS-Bench 3-shot case: MedS-format tasks of `--meds_instances` instances each, built from the
shared huatuo_cmekg records (definitions from the shared RewriteDefinitions.json), prompted as the
official protocol (three shots drawn per instance from the task's own Instances, then the
definition, as the system turn), greedy, `--meds_max_new_tokens` on both sides. Our engine
prefills a prefix common to a batch's prompts once (`engine.plan_generation`); HF runs the
length-sorted batches. `shared_prefix` is the fraction of prompt tokens that sharing prefilled
only once.

Every row also gives our FLOP/s as a fraction of this CPU's measured float32 matmul peak
(`matmul_peak_gflops`, a jitted 2048 x 2048 matmul): the forward model FLOPs of the real prompt
and new tokens (2 x matmul parameters per token, plus the attention over the row), per second.

With --json the last line is one JSON object with `speedup_vs_hf_generate` (demo model),
`speedup_vs_hf_generate_100m`, `meds_speedup_vs_hf_generate` and `meds_speedup_vs_hf_generate_100m`.
"""

import json
import os
import tempfile
import time

import numpy as np
import torch
import transformers
from absl import flags, logging

from csft_jax import configuration
from csft_jax.console import run_cli
from csft_jax.convert import load_hf
from csft_jax.data.config import DEMO_TOKENIZER
from csft_jax.data.templates import load_chat_template
from csft_jax.data.tokenizer import load_tokenizer
from csft_jax.eval import cmb, engine, meds_bench, reporting
from csft_jax.models import ModelConfig, get_preset, model_config_from
from csft_jax.training.metrics import training_flops_per_token

FLAGS = flags.FLAGS
SAMPLE_EXAM = "pkg://csft_jax/assets/eval/cmb_sample/test.json"
SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")


def _demo_config(vocab_size: int) -> ModelConfig:
  """The demo model of configs/demo.py (vocab = the tokenizer's size padded to 128).

  Its context grows from the 1,024 it trains with to MedS-Bench's `model_max_length` of 2,048:
  3-shot prompts run to ~1,150 tokens, and both engines must see them whole.
  """
  config = model_config_from(configuration.load("configs/demo.py").model, vocab_size)
  return config.replace(max_position_embeddings=2048)


def _hf_llama_config(p: ModelConfig) -> transformers.LlamaConfig:
  return transformers.LlamaConfig(vocab_size=p.vocab_size, hidden_size=p.hidden_size,
                                  intermediate_size=p.intermediate_size, num_hidden_layers=p.num_layers,
                                  num_attention_heads=p.num_heads, num_key_value_heads=p.num_kv_heads,
                                  max_position_embeddings=p.max_position_embeddings, rms_norm_eps=p.rms_norm_eps)


def _questions(template, count: int) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
  """Prompt ids, and for log-likelihood mode (context, letter) pairs, `count` questions."""
  items = cmb.load_exam(configuration.resolve_path(SAMPLE_EXAM))
  items = [items[i % len(items)] for i in range(count)]
  prompts, contexts, letters = [], [], []
  for item in items:
    prompts.append(template.encode_prompt(cmb.build_messages(item)))
    messages, options = cmb.loglik_request(item)
    context = template.encode_prompt(messages)
    for letter in options:
      contexts.append(context)
      letters.append(template.tokenizer.backend_tokenizer.encode(letter, add_special_tokens=False).ids)
  return prompts, contexts, letters


def _hf_generate(model, prompts: list[list[int]], batches, stop_ids: list[int], max_new_tokens: int
                 ) -> list[list[int]]:
  outputs: list[list[int]] = [[] for _ in prompts]
  for rows, _, _ in batches:
    width = max(len(prompts[i]) for i in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, i in enumerate(rows):
      ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
      mask[r, width - len(prompts[i]):] = 1
    with torch.no_grad():
      out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                           do_sample=False, eos_token_id=stop_ids, pad_token_id=stop_ids[-1])
    for r, i in enumerate(rows):
      row = out[r, width:].tolist()
      end = next((k + 1 for k, t in enumerate(row) if t in stop_ids), len(row))
      outputs[i] = row[:end]
  return outputs


def _timed(fn):
  """`(result, seconds)` of the fastest of `--repeats` calls: the machine is shared, noise only adds."""
  best = float("inf")
  for _ in range(FLAGS.repeats):
    start = time.perf_counter()
    result = fn()
    best = min(best, time.perf_counter() - start)
  return result, best


def _first_call_overhead(fn) -> float:
  """Seconds the first call takes beyond the second (compilation)."""
  start = time.perf_counter()
  fn()
  first = time.perf_counter() - start
  start = time.perf_counter()
  fn()
  return first - (time.perf_counter() - start)


def _meds_prompts(template, num_tasks: int, instances: int) -> list[list[int]]:
  """3-shot MedS-Bench prompts (official protocol) for synthetic MedS-format tasks."""
  with open(os.path.join(SHARED, "collection", "huatuo_cmekg", "llama_data.json"), encoding="utf-8") as f:
    records = [json.loads(line) for _, line in zip(range(num_tasks * instances), f)]
  with open(os.path.join(SHARED, "meds_bench", "RewriteDefinitions.json"), encoding="utf-8") as f:
    definitions = json.load(f)
  prompts = []
  # The file's task ids are not contiguous (task1-3, then task11, ...): the first `num_tasks` in order.
  task_ids = sorted(definitions, key=lambda name: int(name.removeprefix("task")))[:num_tasks]
  for t, task_id in enumerate(task_ids):
    task = {"task_id": task_id, "Definition": [definitions[task_id]["original_def"]],
            "Instances": [{"id": f"{task_id}-{i}", "input": r["instruction"], "output": [r["output"]]}
                          for i, r in enumerate(records[t * instances:(t + 1) * instances])]}
    for instance in task["Instances"]:
      shots = meds_bench.select_shots(task, instance, meds_bench.NUM_SHOTS)
      prompts.append(template.encode_prompt(meds_bench.build_messages(task, instance, shots=shots)))
  return prompts


def _matmul_peak_flops() -> float:
  """This host's float32 matmul FLOP/s: the best of several jitted 2048 x 2048 products."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  n = 2048
  a = jnp.ones((n, n), jnp.float32)
  product = jax.jit(lambda x: x @ x)
  product(a).block_until_ready()
  best = float("inf")
  for _ in range(5):
    start = time.perf_counter()
    product(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n ** 3 / best


def _forward_flops(config: ModelConfig, prompts: list[list[int]], outputs: list[list[int]]) -> float:
  """Forward model FLOPs of every real prompt and new token (training FLOPs / 3)."""
  total = 0.0
  for prompt, output in zip(prompts, outputs):
    length = len(prompt) + len(output)
    total += length * training_flops_per_token(config, length) / 3
  return total


def _load_pair(hf_config: transformers.LlamaConfig):
  torch.manual_seed(0)
  hf_model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa").eval()
  with tempfile.TemporaryDirectory() as path:
    hf_model.save_pretrained(path)
    ours = load_hf(path, scan_layers=FLAGS.scan_layers)
  return hf_model, ours


def bench_model(name: str, hf_model, ours, template, num_questions: int, peak: float) -> dict:
  """Questions/s of our engine (generate, loglik) and of transformers generate for one model."""
  prompts, contexts, letters = _questions(template, num_questions)
  stop_ids = list(template.stop_token_ids)
  batch = FLAGS.batch_size
  batches = engine.plan_batches([len(p) for p in prompts], batch, ours.config.max_position_embeddings)

  def run_ours():
    # The sample is repeated to `num_questions`: shared prefixes would prefill whole duplicate
    # prompts once, which real CMB questions never allow, so this case shares nothing.
    return engine.greedy_generate(ours, prompts, FLAGS.max_new_tokens, stop_ids, batch_size=batch,
                                  share_prefixes=False)

  def run_loglik():
    return engine.score_continuations(ours, contexts, letters, batch_size=batch)

  compile_s = _first_call_overhead(run_ours) + _first_call_overhead(run_loglik)
  ours_tokens, ours_s = _timed(run_ours)
  _, loglik_s = _timed(run_loglik)
  _hf_generate(hf_model, prompts, batches[:1], stop_ids, FLAGS.max_new_tokens)  # warm-up
  hf_tokens, hf_s = _timed(lambda: _hf_generate(hf_model, prompts, batches, stop_ids, FLAGS.max_new_tokens))
  identical = sum(a == b for a, b in zip(ours_tokens, hf_tokens))
  result = {
      "model": name, "case": "cmb",
      "params_m": round(sum(p.numel() for p in hf_model.parameters()) / 1e6, 1),
      "questions": num_questions,
      "mean_prompt_tokens": round(float(np.mean([len(p) for p in prompts])), 1),
      "new_tokens": sum(map(len, ours_tokens)),
      "ours_generate_qps": num_questions / ours_s,
      "hf_generate_qps": num_questions / hf_s,
      "ours_loglik_qps": num_questions / loglik_s,
      "speedup": hf_s / ours_s,
      "loglik_vs_generate": ours_s / loglik_s,
      "compile_s": compile_s,
      "peak_fraction": _forward_flops(ours.config, prompts, ours_tokens) / ours_s / peak,
      "identical_answers": f"{identical}/{num_questions}",
  }
  logging.info("%s: %s", name, result)
  return result


def bench_meds(name: str, hf_model, ours, template, num_tasks: int, peak: float) -> dict:
  """MedS-Bench 3-shot generation: our engine (shared prefixes) vs transformers generate."""
  prompts = _meds_prompts(template, num_tasks, FLAGS.meds_instances)
  stop_ids = list(template.stop_token_ids)
  batch, new = FLAGS.batch_size, FLAGS.meds_max_new_tokens
  batches = engine.plan_batches([len(p) for p in prompts], batch, ours.config.max_position_embeddings)

  def run_ours():
    return engine.generate(ours, prompts, new, stop_ids, batch_size=batch)

  compile_s = _first_call_overhead(run_ours)
  generation, ours_s = _timed(run_ours)
  ours_tokens = [samples[0] for samples in generation.tokens]
  unshared = engine.generate(ours, prompts, new, stop_ids, batch_size=batch, share_prefixes=False)
  _hf_generate(hf_model, prompts, batches[:1], stop_ids, new)  # warm-up
  hf_tokens, hf_s = _timed(lambda: _hf_generate(hf_model, prompts, batches, stop_ids, new))
  identical = sum(a == b for a, b in zip(ours_tokens, hf_tokens))
  shared_once = sum(len(p) for p in prompts) - sum(
      len(prompts[i]) - plan.prefix_len
      for plan in engine.plan_generation(prompts, batch, ours.config.max_position_embeddings) for i in plan.rows)
  result = {
      "model": name, "case": "meds_3shot",
      "params_m": round(sum(p.numel() for p in hf_model.parameters()) / 1e6, 1),
      "questions": len(prompts),
      "mean_prompt_tokens": round(float(np.mean([len(p) for p in prompts])), 1),
      "new_tokens": sum(map(len, ours_tokens)),
      "ours_generate_qps": len(prompts) / ours_s,
      "hf_generate_qps": len(prompts) / hf_s,
      "speedup": hf_s / ours_s,
      "compile_s": compile_s,
      "shared_prefix": shared_once / sum(len(p) for p in prompts),
      "prefill_slots": generation.prefill_slots,
      "prefill_slots_unshared": unshared.prefill_slots,
      "peak_fraction": _forward_flops(ours.config, prompts, ours_tokens) / ours_s / peak,
      "identical_answers": f"{identical}/{len(prompts)}",
      "identical_to_unshared": f"{sum(a == b[0] for a, b in zip(ours_tokens, unshared.tokens))}/{len(prompts)}",
  }
  logging.info("%s MedS: %s", name, result)
  return result


def main(argv: list[str]) -> None:
  del argv
  tokenizer = load_tokenizer(DEMO_TOKENIZER)
  template = load_chat_template("chatml", tokenizer)
  peak = _matmul_peak_flops()
  results = []
  for name, config, questions, tasks in (
      ("demo", _demo_config(len(tokenizer)), FLAGS.num_questions, FLAGS.meds_tasks),
      ("llama_100m", get_preset("llama_100m"), FLAGS.num_questions_100m, FLAGS.meds_tasks_100m)):
    hf_model, ours = _load_pair(_hf_llama_config(config))
    results.append(bench_model(name, hf_model, ours, template, questions, peak))
    results.append(bench_meds(name, hf_model, ours, template, tasks, peak))
  header = ["model", "case", "params (M)", "questions", "prompt tok", "ours gen q/s", "HF generate q/s",
            "speedup", "shared prefix", "of CPU peak", "ours loglik q/s", "loglik / gen", "compile s",
            "same tokens"]
  rows = [[r["model"], r["case"], r["params_m"], r["questions"], r["mean_prompt_tokens"], r["ours_generate_qps"],
           r["hf_generate_qps"], r["speedup"], r.get("shared_prefix", ""), r["peak_fraction"],
           r.get("ours_loglik_qps", ""), r.get("loglik_vs_generate", ""), r["compile_s"],
           r["identical_answers"]] for r in results]
  print(f"greedy; CMB answer-only max_new_tokens={FLAGS.max_new_tokens}, MedS 3-shot "
        f"max_new_tokens={FLAGS.meds_max_new_tokens}; batch_size={FLAGS.batch_size}, "
        f"scan_layers={FLAGS.scan_layers}, CPU threads: torch {torch.get_num_threads()}, "
        f"float32 matmul peak {peak / 1e9:.0f} GFLOP/s")
  print(reporting.markdown_table(header, rows), end="")
  if FLAGS.json:
    demo, demo_meds, big, big_meds = results
    print(json.dumps({
        "speedup_vs_hf_generate": round(demo["speedup"], 2),
        "speedup_vs_hf_generate_100m": round(big["speedup"], 2),
        "meds_speedup_vs_hf_generate": round(demo_meds["speedup"], 2),
        "meds_speedup_vs_hf_generate_100m": round(big_meds["speedup"], 2),
        "loglik_vs_generate": round(demo["loglik_vs_generate"], 2),
        "loglik_vs_generate_100m": round(big["loglik_vs_generate"], 2),
        "matmul_peak_gflops": round(peak / 1e9, 1),
        "max_new_tokens": FLAGS.max_new_tokens, "meds_max_new_tokens": FLAGS.meds_max_new_tokens,
        "batch_size": FLAGS.batch_size, "scan_layers": FLAGS.scan_layers,
        "models": results,
    }))


def define_flags() -> None:
  """Command-line flags, defined only when run as a program."""
  flags.DEFINE_integer("num_questions", 48, "CMB questions (the 24 samples, repeated).")
  flags.DEFINE_integer("num_questions_100m", 32, "Questions for the ~100M model.")
  flags.DEFINE_integer("batch_size", 16, "Prompts per batch, both engines.")
  flags.DEFINE_integer("max_new_tokens", 32, "New tokens per answer (CMB answer-only default).")
  flags.DEFINE_integer("meds_tasks", 4, "MedS-format tasks for the demo model's 3-shot case.")
  flags.DEFINE_integer("meds_tasks_100m", 2, "MedS-format tasks for the ~100M model's 3-shot case.")
  flags.DEFINE_integer("meds_instances", 16, "Instances per MedS-format task.")
  flags.DEFINE_integer("meds_max_new_tokens", 32, "New tokens per MedS answer, both engines.")
  flags.DEFINE_integer("repeats", 3, "Timed passes per engine and mode; the fastest counts.")
  flags.DEFINE_bool("scan_layers", False, "Load our model with scanned layers (eval default: unrolled).")
  flags.DEFINE_bool("json", False, "Print a JSON summary as the last line.")


if __name__ == "__main__":
  define_flags()
  run_cli(main)
