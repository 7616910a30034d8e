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

With --json the last line is one JSON object with `speedup_vs_hf_generate` (demo model) and
`speedup_vs_hf_generate_100m`.
"""

import json
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
from csft_jax.eval import cmb, engine, reporting
from csft_jax.models import ModelConfig, get_preset, model_config_from

FLAGS = flags.FLAGS
SAMPLE_EXAM = "pkg://csft_jax/assets/eval/cmb_sample/test.json"


def _demo_config(vocab_size: int) -> ModelConfig:
  """The demo model of configs/demo.py (vocab = the tokenizer's size padded to 128)."""
  return model_config_from(configuration.load("configs/demo.py").model, vocab_size)


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


def _hf_generate(model, prompts: list[list[int]], batches, stop_ids: list[int]) -> list[list[int]]:
  outputs: list[list[int]] = [[] for _ in prompts]
  for rows, _, _ in batches:
    width = max(len(prompts[i]) for i in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, i in enumerate(rows):
      ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
      mask[r, width - len(prompts[i]):] = 1
    with torch.no_grad():
      out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=FLAGS.max_new_tokens,
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


def bench_model(name: str, hf_config: transformers.LlamaConfig, template, num_questions: int) -> dict:
  """Questions/s of our engine (generate, loglik) and of transformers generate for one model."""
  torch.manual_seed(0)
  hf_model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa").eval()
  with tempfile.TemporaryDirectory() as path:
    hf_model.save_pretrained(path)
    ours = load_hf(path, scan_layers=FLAGS.scan_layers)
  prompts, contexts, letters = _questions(template, num_questions)
  stop_ids = list(template.stop_token_ids)
  batch = FLAGS.batch_size
  batches = engine.plan_batches([len(p) for p in prompts], batch, ours.config.max_position_embeddings)

  def run_ours():
    return engine.greedy_generate(ours, prompts, FLAGS.max_new_tokens, stop_ids, batch_size=batch)

  def run_loglik():
    return engine.score_continuations(ours, contexts, letters, batch_size=batch)

  compile_s = _first_call_overhead(run_ours) + _first_call_overhead(run_loglik)
  ours_tokens, ours_s = _timed(run_ours)
  _, loglik_s = _timed(run_loglik)
  _hf_generate(hf_model, prompts, batches[:1], stop_ids)  # warm-up
  hf_tokens, hf_s = _timed(lambda: _hf_generate(hf_model, prompts, batches, stop_ids))
  identical = sum(a == b for a, b in zip(ours_tokens, hf_tokens))
  result = {
      "model": name,
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
      "identical_answers": f"{identical}/{num_questions}",
  }
  logging.info("%s: %s", name, result)
  return result


def main(argv: list[str]) -> None:
  del argv
  tokenizer = load_tokenizer(DEMO_TOKENIZER)
  template = load_chat_template("chatml", tokenizer)
  results = [
      bench_model("demo", _hf_llama_config(_demo_config(len(tokenizer))), template, FLAGS.num_questions),
      bench_model("llama_100m", _hf_llama_config(get_preset("llama_100m")), template, FLAGS.num_questions_100m),
  ]
  header = ["model", "params (M)", "questions", "prompt tok", "ours gen q/s", "HF generate q/s", "speedup",
            "ours loglik q/s", "loglik / gen", "compile s", "same tokens"]
  rows = [[r["model"], r["params_m"], r["questions"], r["mean_prompt_tokens"], r["ours_generate_qps"],
           r["hf_generate_qps"], r["speedup"], r["ours_loglik_qps"], r["loglik_vs_generate"], r["compile_s"],
           r["identical_answers"]] for r in results]
  print(f"CMB answer-only, greedy, max_new_tokens={FLAGS.max_new_tokens}, batch_size={FLAGS.batch_size}, "
        f"scan_layers={FLAGS.scan_layers}, CPU threads: torch {torch.get_num_threads()}")
  print(reporting.markdown_table(header, rows), end="")
  if FLAGS.json:
    demo, big = results
    print(json.dumps({
        "speedup_vs_hf_generate": round(demo["speedup"], 2),
        "speedup_vs_hf_generate_100m": round(big["speedup"], 2),
        "loglik_vs_generate": round(demo["loglik_vs_generate"], 2),
        "loglik_vs_generate_100m": round(big["loglik_vs_generate"], 2),
        "max_new_tokens": FLAGS.max_new_tokens, "batch_size": FLAGS.batch_size,
        "scan_layers": FLAGS.scan_layers,
        "models": results,
    }))


def define_flags() -> None:
  """Command-line flags, defined only when run as a program."""
  flags.DEFINE_integer("num_questions", 48, "CMB questions (the 24 samples, repeated).")
  flags.DEFINE_integer("num_questions_100m", 32, "Questions for the ~100M model.")
  flags.DEFINE_integer("batch_size", 16, "Prompts per batch, both engines.")
  flags.DEFINE_integer("max_new_tokens", 32, "New tokens per answer (CMB answer-only default).")
  flags.DEFINE_integer("repeats", 3, "Timed passes per engine and mode; the fastest counts.")
  flags.DEFINE_bool("scan_layers", False, "Load our model with scanned layers (eval default: unrolled).")
  flags.DEFINE_bool("json", False, "Print a JSON summary as the last line.")


if __name__ == "__main__":
  define_flags()
  run_cli(main)
