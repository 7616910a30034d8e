"""Benchmarks the evaluation engine against transformers `generate`, case by case.

  python tools/bench_eval.py [--num_questions=48] [--batch_size=16] [--max_new_tokens=32] [--json]

For each model (the demo model of configs/demo.py and the ~100M `llama_100m` preset), one random
Llama is built in transformers (float32), saved, and loaded by `csft_jax.convert.load_hf` with the
attention evaluation uses on CPU (blockwise prefill), so both engines run the same weights. Both
engines decode greedily with the same stop tokens, the same batch size (`--batch_size` rows, or
decode slots) and this process's CPU threads; tokens are checked identical between them. Times
exclude compilation (untimed passes first; compile time is reported) and are the fastest of
`--repeats` passes.

Cases:
- `cmb`: the shipped CMB sample (answer-only prompt, chatml template, demo tokenizer), repeated to
  `num_questions`, `--max_new_tokens`; batches of prompts sorted by length, the same for both.
  Log-likelihood mode scores every option letter instead of generating.
- `meds_3shot`: MedS-format tasks of `--meds_instances` instances each, built from the shared
  huatuo_cmekg records (definitions from the shared RewriteDefinitions.json), prompted as the
  official protocol (three shots drawn per instance from the task's own instances, then the
  definition, as the system turn), `--meds_max_new_tokens`. Our engine prefills a prefix common to
  a batch's prompts once (`engine.plan_generation`); HF runs the length-sorted batches.
- `varlen` (~100M model): the CMB questions with CMB's official 512-token budget and replies that
  stop at very different lengths. A random model does not stop by itself, and a model small enough
  to train here briefly does not either (a 1.5M model trained 500 steps on the shared collection
  ran 19 of 24 replies to 512 tokens), so the stop tokens are ones the model itself says: from an
  untimed free run, the few tokens (built up one at a time from its most frequent ones) whose first
  occurrence gives replies a median length nearest 48 with about 1/16 of them running to the budget
  (the shape of a chat model's CMB answers: most short, one in a batch rambling). Ours runs
  continuous batching (`--batch_size` slots); HF and our static batches run each batch to its
  longest reply. `ideal_speedup` is HF's time over HF's prefill plus its decode shrunk by the
  steps the lengths need (their sum / slots against every batch's rows x its longest reply).

Figures per case: questions/s both sides and their ratio; prefill alone (a pass with one new
token) and decode (the rest), ours as a fraction of this CPU's limits: prefill FLOPs (the real
prompt tokens' matmuls and causal attention, and the LM head at each row's last token) over the
measured float32 matmul peak (`matmul_peak_gflops`, a jitted 2048 x 2048 product); decode against
the larger of its two bounds per step, the bytes it must read (every weight once, and each row's
live keys and values) over the measured memory bandwidth (`memory_gbps`, a jitted product of one
vector with a 512 MiB matrix) and its FLOPs over the peak.

With --json the last line is one JSON object with `speedup_vs_hf_generate` (demo model),
`speedup_vs_hf_generate_100m`, `meds_speedup_vs_hf_generate`, `meds_speedup_vs_hf_generate_100m`
and `varlen_speedup_vs_hf_generate`.
"""

import collections
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
from csft_jax.models import ModelConfig, get_preset, model_config_from, with_runtime
from csft_jax.training.metrics import matmul_parameters

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
  return transformers.LlamaConfig(
    vocab_size=p.vocab_size,
    hidden_size=p.hidden_size,
    intermediate_size=p.intermediate_size,
    num_hidden_layers=p.num_layers,
    num_attention_heads=p.num_heads,
    num_key_value_heads=p.num_kv_heads,
    max_position_embeddings=p.max_position_embeddings,
    rms_norm_eps=p.rms_norm_eps,
  )


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


def hf_greedy(model, prompts: list[list[int]], stop_ids: list[int], max_new_tokens: int) -> list[list[int]]:
  """transformers `generate(do_sample=False)` on `prompts` as one left-padded batch, each row cut
  after its first id in `stop_ids` (none: `generate` stops at the model's own eos, and the rows come
  back whole, padded with 0 after it). The baseline here, and the reference the engine's tests
  compare with."""
  width = max(map(len, prompts))
  ids = torch.zeros((len(prompts), width), dtype=torch.long)
  mask = torch.zeros_like(ids)
  for row, prompt in enumerate(prompts):
    ids[row, width - len(prompt) :] = torch.tensor(prompt)
    mask[row, width - len(prompt) :] = 1
  with torch.no_grad():
    out = model.generate(
      input_ids=ids,
      attention_mask=mask,
      max_new_tokens=max_new_tokens,
      do_sample=False,
      eos_token_id=stop_ids or None,
      pad_token_id=0,
    )
  rows = []
  for row in out[:, width:].tolist():
    end = next((k + 1 for k, t in enumerate(row) if t in stop_ids), len(row))
    rows.append(row[:end])
  return rows


def _hf_generate(model, prompts: list[list[int]], batches, stop_ids: list[int], max_new_tokens: int) -> list[list[int]]:
  outputs: list[list[int]] = [[] for _ in prompts]
  for rows, _, _ in batches:
    for i, tokens in zip(rows, hf_greedy(model, [prompts[i] for i in rows], stop_ids, max_new_tokens)):
      outputs[i] = tokens
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
    task = {
      "task_id": task_id,
      "Definition": [definitions[task_id]["original_def"]],
      "Instances": [
        {"id": f"{task_id}-{i}", "input": r["instruction"], "output": [r["output"]]}
        for i, r in enumerate(records[t * instances : (t + 1) * instances])
      ],
    }
    for instance in task["Instances"]:
      shots = meds_bench.select_shots(task, instance, meds_bench.NUM_SHOTS)
      prompts.append(template.encode_prompt(meds_bench.build_messages(task, instance, shots=shots)))
  return prompts


def _fastest_product(x, w, repeats: int) -> float:
  """Seconds of the fastest of `repeats` jitted `x @ w` (after one untimed call)."""
  import jax

  product = jax.jit(lambda a, b: a @ b)
  product(x, w).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    product(x, w).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return best


def _matmul_peak_flops() -> float:
  """This host's float32 matmul FLOP/s: the best of several jitted 2048 x 2048 products."""
  import jax.numpy as jnp

  n = 2048
  a = jnp.ones((n, n), jnp.float32)
  return 2 * n**3 / _fastest_product(a, a, 5)


def _memory_bandwidth() -> float:
  """This host's read bandwidth as decode sees it, bytes/s: one vector times a 512 MiB float32 matrix."""
  import jax.numpy as jnp

  weights = jnp.ones((8192, 16384), jnp.float32)
  return weights.size * 4 / _fastest_product(jnp.ones((1, 8192), jnp.float32), weights, 10)


def _prefill_flops(config: ModelConfig, prompts: list[list[int]]) -> float:
  """FLOPs a prefill must do: each real prompt token's layer matmuls and causal attention, and the LM
  head at each row's last token (generation needs no other logits)."""
  layers, head = matmul_parameters(config)
  attention_per_pair = 4 * config.num_layers * config.num_heads * config.head_dim  # QK^T and AV
  return sum(2 * layers * len(p) + 2 * head + attention_per_pair * len(p) * (len(p) + 1) / 2 for p in prompts)


def _decode_limit_s(config: ModelConfig, prompts, outputs, steps: int, peak: float, bandwidth: float) -> float:
  """Seconds `steps` decode steps need at this CPU's limits for these replies: per step every weight is
  read once; per new token after the first, its row's live keys and values are read, and its matmuls
  and attention computed. The larger of the bytes over the bandwidth and the FLOPs over the peak."""
  layers, head = matmul_parameters(config)
  itemsize = np.dtype(config.dtype).itemsize
  kv_bytes_per_slot = 2 * config.num_layers * config.num_kv_heads * config.head_dim * itemsize
  attention_per_slot = 4 * config.num_layers * config.num_heads * config.head_dim
  bytes_read = steps * (layers + head) * itemsize
  flops = 0.0
  for prompt, output in zip(prompts, outputs):
    live = len(prompt) + np.arange(1, len(output))  # the slots each decode step of this row attends over
    bytes_read += kv_bytes_per_slot * live.sum()
    flops += (len(output) - 1) * 2 * (layers + head) + attention_per_slot * live.sum()
  return max(bytes_read / bandwidth, flops / peak)


def _load_pair(hf_config: transformers.LlamaConfig):
  torch.manual_seed(0)
  hf_model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa").eval()
  with tempfile.TemporaryDirectory() as path:
    hf_model.save_pretrained(path)
    ours = load_hf(path, scan_layers=FLAGS.scan_layers)
  return hf_model, with_runtime(ours, attention_impl=FLAGS.attention)


def _compare(
  name: str,
  case: str,
  hf_model,
  ours,
  prompts: list[list[int]],
  stop_ids: list[int],
  new: int,
  peak: float,
  bandwidth: float,
  **options,
) -> tuple[dict, engine.Generation]:
  """Ours (`engine.generate(**options)`) against HF `generate` on length-sorted batches, whole and prefill
  alone; the figures every case reports."""
  batch = FLAGS.batch_size
  batches = engine.plan_batches([len(p) for p in prompts], batch, ours.config.max_position_embeddings)

  def run_ours(max_new_tokens: int = new):
    return engine.generate(ours, prompts, max_new_tokens, stop_ids, batch_size=batch, **options)

  compile_s = _first_call_overhead(run_ours) + _first_call_overhead(lambda: run_ours(1))
  generation, ours_s = _timed(run_ours)
  _, ours_prefill_s = _timed(lambda: run_ours(1))
  ours_tokens = [samples[0] for samples in generation.tokens]
  _hf_generate(hf_model, prompts, batches[:1], stop_ids, min(new, 32))  # warm-up
  hf_tokens, hf_s = _timed(lambda: _hf_generate(hf_model, prompts, batches, stop_ids, new))
  _, hf_prefill_s = _timed(lambda: _hf_generate(hf_model, prompts, batches, stop_ids, 1))
  identical = sum(a == b for a, b in zip(ours_tokens, hf_tokens))
  decode_s = max(ours_s - ours_prefill_s, 1e-9)
  result = {
    "model": name,
    "case": case,
    "params_m": round(sum(p.numel() for p in hf_model.parameters()) / 1e6, 1),
    "questions": len(prompts),
    "mean_prompt_tokens": round(float(np.mean([len(p) for p in prompts])), 1),
    "new_tokens": sum(map(len, ours_tokens)),
    "ours_generate_qps": len(prompts) / ours_s,
    "hf_generate_qps": len(prompts) / hf_s,
    "speedup": hf_s / ours_s,
    "ours_prefill_s": ours_prefill_s,
    "hf_prefill_s": hf_prefill_s,
    "ours_decode_s": decode_s,
    "hf_decode_s": max(hf_s - hf_prefill_s, 1e-9),
    "prefill_speedup": hf_prefill_s / ours_prefill_s,
    "decode_speedup": max(hf_s - hf_prefill_s, 1e-9) / decode_s,
    "prefill_of_peak": _prefill_flops(ours.config, prompts) / ours_prefill_s / peak,
    "decode_steps": generation.decode_steps,
    "decode_of_limit": _decode_limit_s(ours.config, prompts, ours_tokens, generation.decode_steps, peak, bandwidth)
    / decode_s,
    "compile_s": compile_s,
    "identical_answers": f"{identical}/{len(prompts)}",
  }
  return result, generation


def bench_model(name: str, hf_model, ours, template, num_questions: int, peak: float, bandwidth: float) -> dict:
  """CMB answer-only: our engine (generate, loglik) against transformers generate."""
  prompts, contexts, letters = _questions(template, num_questions)
  # The sample is repeated to `num_questions`: shared prefixes would prefill whole duplicate
  # prompts once, which real CMB questions never allow, so this case shares nothing.
  result, _ = _compare(
    name,
    "cmb",
    hf_model,
    ours,
    prompts,
    list(template.stop_token_ids),
    FLAGS.max_new_tokens,
    peak,
    bandwidth,
    share_prefixes=False,
  )

  def run_loglik():
    return engine.score_continuations(ours, contexts, letters, batch_size=FLAGS.batch_size)

  result["compile_s"] += _first_call_overhead(run_loglik)
  _, loglik_s = _timed(run_loglik)
  result["ours_loglik_qps"] = num_questions / loglik_s
  result["loglik_vs_generate"] = result["ours_loglik_qps"] / result["ours_generate_qps"]
  logging.info("%s: %s", name, result)
  return result


def bench_meds(name: str, hf_model, ours, template, num_tasks: int, peak: float, bandwidth: float) -> dict:
  """MedS-Bench 3-shot generation: our engine (shared prefixes) vs transformers generate."""
  prompts = _meds_prompts(template, num_tasks, FLAGS.meds_instances)
  stop_ids = list(template.stop_token_ids)
  batch = FLAGS.batch_size
  result, generation = _compare(
    name, "meds_3shot", hf_model, ours, prompts, stop_ids, FLAGS.meds_max_new_tokens, peak, bandwidth
  )
  unshared = engine.generate(ours, prompts, FLAGS.meds_max_new_tokens, stop_ids, batch_size=batch, share_prefixes=False)
  shared_once = sum(len(p) for p in prompts) - sum(
    len(prompts[i]) - plan.prefix_len
    for plan in engine.plan_generation(prompts, batch, ours.config.max_position_embeddings)
    for i in plan.rows
  )
  result.update(
    {
      "shared_prefix": shared_once / sum(len(p) for p in prompts),
      "prefill_slots": generation.prefill_slots,
      "prefill_slots_unshared": unshared.prefill_slots,
      "identical_to_unshared": (
        f"{sum(a[0] == b[0] for a, b in zip(generation.tokens, unshared.tokens))}/{len(prompts)}"
      ),
    }
  )
  logging.info("%s MedS: %s", name, result)
  return result


def _varlen_stop(replies: list[list[int]], budget: int) -> tuple[list[int], list[int]]:
  """Stop tokens for the variable-length case and the reply lengths they give (see the docstring): built
  up from the model's most frequent tokens, one at a time, while a token brings the lengths nearer to a
  median of 48 with 1/16 of the replies at the budget."""

  def lengths_for(stops: list[int]) -> list[int]:
    return [next((k + 1 for k, t in enumerate(reply) if t in stops), budget) for reply in replies]

  def distance(lengths: list[int]) -> float:
    capped = sum(n == budget for n in lengths) / len(lengths)
    return abs(np.log(max(float(np.median(lengths)), 1) / 48)) + 4 * abs(capped - 1 / 16)

  candidates = [t for t, _ in collections.Counter(t for reply in replies for t in reply).most_common(40)]
  stops: list[int] = []
  while len(stops) < 4:
    best = min((t for t in candidates if t not in stops), key=lambda t: distance(lengths_for(stops + [t])))
    if stops and distance(lengths_for(stops + [best])) >= distance(lengths_for(stops)):
      break
    stops.append(best)
  return stops, lengths_for(stops)


def bench_varlen(name: str, hf_model, ours, template, num_questions: int, peak: float, bandwidth: float) -> dict:
  """CMB questions with a 512-token budget and replies of varied lengths: continuous batching vs HF."""
  prompts, _, _ = _questions(template, num_questions)
  budget = FLAGS.varlen_max_new_tokens
  free = engine.generate(ours, prompts, budget, None, batch_size=FLAGS.batch_size, share_prefixes=False)
  stops, lengths = _varlen_stop([samples[0] for samples in free.tokens], budget)
  result, generation = _compare(
    name, "varlen", hf_model, ours, prompts, stops, budget, peak, bandwidth, batching="continuous"
  )
  engine.generate(ours, prompts, budget, stops, batch_size=FLAGS.batch_size, share_prefixes=False)  # compiles
  static, static_s = _timed(
    lambda: engine.generate(ours, prompts, budget, stops, batch_size=FLAGS.batch_size, share_prefixes=False)
  )
  assert [len(s[0]) for s in generation.tokens] == lengths, "the stop token's lengths changed"
  batches = engine.plan_batches([len(p) for p in prompts], FLAGS.batch_size, ours.config.max_position_embeddings)
  batch_steps = sum(len(rows) * max(lengths[i] for i in rows) for rows, _, _ in batches)
  ideal_decode = batch_steps / sum(lengths)
  result.update(
    {
      "stop_tokens": stops,
      "reply_lengths": {
        "min": min(lengths),
        "median": float(np.median(lengths)),
        "p90": float(np.percentile(lengths, 90)),
        "max": max(lengths),
        "at_budget": sum(n == budget for n in lengths),
      },
      "ours_static_qps": len(prompts) / static_s,
      "continuous_vs_static": static_s / (len(prompts) / result["ours_generate_qps"]),
      "static_identical": f"{sum(a[0] == b[0] for a, b in zip(generation.tokens, static.tokens))}/{len(prompts)}",
      "static_decode_steps": static.decode_steps,
      "ideal_speedup": (result["hf_prefill_s"] + result["hf_decode_s"])
      / (result["hf_prefill_s"] + result["hf_decode_s"] / ideal_decode),
    }
  )
  logging.info("%s varlen: %s", name, result)
  return result


def main(argv: list[str]) -> None:
  del argv
  tokenizer = load_tokenizer(DEMO_TOKENIZER)
  template = load_chat_template("chatml", tokenizer)
  peak = _matmul_peak_flops()
  bandwidth = _memory_bandwidth()
  results = []
  for name, config, questions, tasks in (
    ("demo", _demo_config(len(tokenizer)), FLAGS.num_questions, FLAGS.meds_tasks),
    ("llama_100m", get_preset("llama_100m"), FLAGS.num_questions_100m, FLAGS.meds_tasks_100m),
  ):
    if name not in FLAGS.models:
      continue
    hf_model, ours = _load_pair(_hf_llama_config(config))
    results.append(bench_model(name, hf_model, ours, template, questions, peak, bandwidth))
    results.append(bench_meds(name, hf_model, ours, template, tasks, peak, bandwidth))
    if name == "llama_100m" and FLAGS.varlen_questions:
      results.append(bench_varlen(name, hf_model, ours, template, FLAGS.varlen_questions, peak, bandwidth))
  header = [
    "model",
    "case",
    "params (M)",
    "questions",
    "prompt tok",
    "ours q/s",
    "HF generate q/s",
    "speedup",
    "prefill: ours / HF s",
    "prefill of peak",
    "decode: ours / HF s",
    "decode of limit",
    "shared prefix",
    "ours loglik q/s",
    "compile s",
    "same tokens",
  ]
  rows = [
    [
      r["model"],
      r["case"],
      r["params_m"],
      r["questions"],
      r["mean_prompt_tokens"],
      r["ours_generate_qps"],
      r["hf_generate_qps"],
      r["speedup"],
      f"{r['ours_prefill_s']:.2f} / {r['hf_prefill_s']:.2f}",
      r["prefill_of_peak"],
      f"{r['ours_decode_s']:.2f} / {r['hf_decode_s']:.2f}",
      r["decode_of_limit"],
      r.get("shared_prefix", ""),
      r.get("ours_loglik_qps", ""),
      r["compile_s"],
      r["identical_answers"],
    ]
    for r in results
  ]
  print(
    f"greedy; CMB answer-only max_new_tokens={FLAGS.max_new_tokens}, MedS 3-shot "
    f"max_new_tokens={FLAGS.meds_max_new_tokens}, variable-length max_new_tokens={FLAGS.varlen_max_new_tokens}; "
    f"batch_size={FLAGS.batch_size} both sides (decode slots in the varlen case), attention={FLAGS.attention}, "
    f"scan_layers={FLAGS.scan_layers}, CPU threads: torch {torch.get_num_threads()}, XLA {os.cpu_count()}; "
    f"float32 matmul peak {peak / 1e9:.0f} GFLOP/s, memory {bandwidth / 1e9:.1f} GB/s"
  )
  print(reporting.markdown_table(header, rows), end="")
  varlen = next((r for r in results if r["case"] == "varlen"), None)
  if varlen:
    print(
      f"varlen: reply lengths {varlen['reply_lengths']} (stop tokens {varlen['stop_tokens']}); ideal speed-up "
      f"{varlen['ideal_speedup']:.2f}x; ours continuous vs our static batches {varlen['continuous_vs_static']:.2f}x "
      f"({varlen['static_identical']} identical)"
    )
  if FLAGS.json:
    case = {(r["model"], r["case"]): r for r in results}

    def figure(model: str, name: str, key: str):
      return round(case[(model, name)][key], 2) if (model, name) in case else None

    print(
      json.dumps(
        {
          "speedup_vs_hf_generate": figure("demo", "cmb", "speedup"),
          "speedup_vs_hf_generate_100m": figure("llama_100m", "cmb", "speedup"),
          "meds_speedup_vs_hf_generate": figure("demo", "meds_3shot", "speedup"),
          "meds_speedup_vs_hf_generate_100m": figure("llama_100m", "meds_3shot", "speedup"),
          "varlen_speedup_vs_hf_generate": figure("llama_100m", "varlen", "speedup"),
          "loglik_vs_generate": figure("demo", "cmb", "loglik_vs_generate"),
          "loglik_vs_generate_100m": figure("llama_100m", "cmb", "loglik_vs_generate"),
          "prefill_of_peak_100m": figure("llama_100m", "cmb", "prefill_of_peak"),
          "decode_of_limit_100m": figure("llama_100m", "cmb", "decode_of_limit"),
          "matmul_peak_gflops": round(peak / 1e9, 1),
          "memory_gbps": round(bandwidth / 1e9, 1),
          "max_new_tokens": FLAGS.max_new_tokens,
          "meds_max_new_tokens": FLAGS.meds_max_new_tokens,
          "varlen_max_new_tokens": FLAGS.varlen_max_new_tokens,
          "batch_size": FLAGS.batch_size,
          "scan_layers": FLAGS.scan_layers,
          "attention": FLAGS.attention,
          "models": results,
        }
      )
    )


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
  flags.DEFINE_string("attention", "blockwise", "Our prefill attention (evaluate's attention_impl=auto on CPU).")
  flags.DEFINE_list("models", ["demo", "llama_100m"], "Which models' cases to run.")
  flags.DEFINE_integer("varlen_questions", 48, "CMB questions of the variable-length case (0: skip it).")
  flags.DEFINE_integer("varlen_max_new_tokens", 512, "The variable-length case's budget (CMB's official one).")
  flags.DEFINE_bool("json", False, "Print a JSON summary as the last line.")


if __name__ == "__main__":
  define_flags()
  run_cli(main)
