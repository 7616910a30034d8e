r"""Training throughput: our jitted step vs a transformers + PyTorch step (the LLaMA-Factory stack).

  python tools/bench_train.py [--model=demo|llama_100m] [--attention=blockwise:64,blockwise,xla] [--steps=6]
      [--batch=8] [--seq_len=1024] [--json]

Both sides train the same model (the demo model of `configs/demo.py` or the ~100M `llama_100m`
preset, float32; same weights: ours exported with `save_hf` and loaded by transformers) with
AdamW on batches from `configs/collection_shared.py`. Our step runs once per `--attention`
implementation (`model.attention_impl`, `blockwise:64` for 64-slot tiles; the first one gives the
top-level figures):
- same batch: the identical packed `[batch, seq_len]` batches through both steps (PyTorch sees them
  as plain causal rows; `xla` does their FLOPs, `blockwise` skips the blocks between segments)
  -> `same_batch_ratio`;
- effective: loss-bearing tokens/s of our packed pipeline vs PyTorch on the same examples padded
  to the longest in each batch (what LLaMA-Factory does without packing)
  -> `effective_speedup_vs_padded_torch`.
The steps take turns batch by batch, so a shared machine's changing load falls on every side alike.
Prints a table; with --json the last line is one JSON object (`by_attention` holds every
implementation's figures).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time

from absl import flags

from csft_jax import configuration
from csft_jax.console import run_cli

FLAGS = flags.FLAGS


def _batches(packing: str, count: int):
  from csft_jax.data.pipeline import DataPipeline

  data = configuration.load("configs/collection_shared.py").data
  data.seq_len = FLAGS.seq_len
  data.packing = packing
  data.val_fraction = 0.0
  pipeline = DataPipeline(data)
  it = iter(pipeline.train_dataset(FLAGS.batch))
  return pipeline, [next(it) for _ in range(count)]


def _trim_to_longest(batch):
  """Padded rows (one example each) cut to the longest example in the batch."""
  longest = int((batch["segment_ids"] > 0).sum(axis=1).max())
  return {k: v[:, :longest] for k, v in batch.items()}


def jax_stepper(config, start, num_sources):
  """One blocking call of the trainer's own jitted step (programs.jit_steps) per batch."""
  import jax

  from csft_jax.sharding import make_mesh
  from csft_jax.training import programs
  from csft_jax.training.optimizer import make_optimizer

  optimizer, schedule = make_optimizer(config.optim, 1000)
  mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
  step, _, _ = programs.jit_steps(config, start, optimizer, schedule, mesh, num_sources)
  state = start.state

  def run(batch):
    nonlocal state
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)

  return run


def torch_stepper(hf_dir):
  """One transformers + PyTorch AdamW step per batch (SDPA attention, as LLaMA-Factory runs it)."""
  import torch
  import transformers

  torch.set_num_threads(FLAGS.threads)
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="sdpa", dtype=torch.float32)
  model.train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)

  def run(batch):
    ids = torch.from_numpy(batch["input_ids"]).long()
    labels = torch.from_numpy(batch["target_ids"]).long()
    labels[torch.from_numpy(batch["loss_mask"]) == 0] = -100
    attention = torch.from_numpy((batch["segment_ids"] > 0).astype("int64"))
    logits = model(input_ids=ids, attention_mask=attention).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

  return run


def interleaved_seconds(runs: dict[str, tuple]) -> dict[str, float]:
  """Seconds of each `name: (step, batches)` over `batches[1:]` after a warm-up on `batches[0]`.

  The steps take turns batch by batch, so a load that comes and goes on a shared machine
  slows every side alike instead of whichever ran at the time.
  """
  for step, batches in runs.values():
    step(batches[0])
  seconds = dict.fromkeys(runs, 0.0)
  for i in range(1, FLAGS.steps + 1):
    for name, (step, batches) in runs.items():
      begin = time.perf_counter()
      step(batches[i])
      seconds[name] += time.perf_counter() - begin
  return seconds


def _model_config(config, tokenizer_size: int):
  """The benchmarked model: the demo config's, or the `llama_100m` preset (float32 both)."""
  from csft_jax.models import model_config_from

  if FLAGS.model == "llama_100m":
    config.model.update(
      preset="llama_100m", hidden_size=None, intermediate_size=None, num_layers=None, num_heads=None, num_kv_heads=None
    )
  config.model.update(dtype="float32", param_dtype="float32")
  return model_config_from(config.model, tokenizer_size).replace(max_position_embeddings=max(1024, FLAGS.seq_len))


def main(argv):
  del argv
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from csft_jax.convert import save_hf
  from csft_jax.sharding import make_mesh
  from csft_jax.training import programs
  from csft_jax.training.optimizer import make_optimizer

  count = FLAGS.steps + 1
  pipeline, packed = _batches("packed", count)
  _, padded = _batches("padded", count)
  padded = [_trim_to_longest(b) for b in padded]
  # The demo trainer; a constant learning rate, as the PyTorch side uses.
  config = configuration.load("configs/demo.py")
  config.optim.update(lr=1e-4, schedule="constant", warmup_steps=1, weight_decay=0.0)
  model_config = _model_config(config, len(pipeline.tokenizer))
  optimizer, _ = make_optimizer(config.optim, 1000)
  mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
  start = programs.random_init(model_config, optimizer, 0, mesh)
  hf_dir = tempfile.mkdtemp(prefix="bench_train_hf_")
  save_hf(nnx.merge(start.graphdef, start.state.params), hf_dir)

  runs = {}
  for implementation in FLAGS.attention:
    # `name` or `name:tile` (model.attention_block_q = attention_block_kv = tile).
    name, _, tile = implementation.partition(":")
    impl_config = model_config.replace(attention_impl=name)
    if tile:
      impl_config = impl_config.replace(attention_block_q=int(tile), attention_block_kv=int(tile))
    # A fresh copy of the state for each run: the step donates it.
    with_impl = dataclasses.replace(
      start,
      graphdef=programs.graphdef_of(impl_config),
      model_config=impl_config,
      state=jax.tree.map(jnp.copy, start.state),
    )
    runs[implementation] = (jax_stepper(config, with_impl, len(pipeline.source_names)), packed)
  runs["torch"] = (torch_stepper(hf_dir), packed)
  runs["torch_padded"] = (torch_stepper(hf_dir), padded)
  seconds = interleaved_seconds(runs)
  torch_seconds, torch_padded_seconds = seconds.pop("torch"), seconds.pop("torch_padded")
  jax_seconds = seconds

  slots = sum(b["input_ids"].size for b in packed[1:])
  packed_loss_tokens = sum(int(b["loss_mask"].sum()) for b in packed[1:])
  padded_loss_tokens = sum(int(b["loss_mask"].sum()) for b in padded[1:])
  padded_slots = sum(b["input_ids"].size for b in padded[1:])
  torch_padded_loss_tokens_per_s = padded_loss_tokens / torch_padded_seconds
  by_attention = {
    implementation: {
      "jax_tokens_per_s": slots / seconds,
      "same_batch_ratio": torch_seconds / seconds,
      "jax_packed_loss_tokens_per_s": packed_loss_tokens / seconds,
      "effective_speedup_vs_padded_torch": packed_loss_tokens / seconds / torch_padded_loss_tokens_per_s,
    }
    for implementation, seconds in jax_seconds.items()
  }
  result = {
    "model": FLAGS.model,
    "model_params_m": round(model_config.num_params() / 1e6, 2),
    "batch": FLAGS.batch,
    "seq_len": FLAGS.seq_len,
    "steps": FLAGS.steps,
    "attention": FLAGS.attention[0],
    **by_attention[FLAGS.attention[0]],
    "torch_tokens_per_s": slots / torch_seconds,
    "torch_padded_loss_tokens_per_s": torch_padded_loss_tokens_per_s,
    "torch_padded_mean_row_len": padded_slots / (FLAGS.batch * FLAGS.steps),
    "by_attention": by_attention,
  }
  print(
    f"model {FLAGS.model} ({result['model_params_m']}M params), batch {FLAGS.batch} x {FLAGS.seq_len}, "
    f"{FLAGS.steps} timed steps (torch padded rows average {result['torch_padded_mean_row_len']:.0f} tokens)"
  )
  print(f"{'measure':<58} {'jax':>10} {'torch':>10} {'ratio':>8}")
  for implementation, row in by_attention.items():
    print(
      f"{'same packed batches, token slots/s (' + implementation + ')':<58} {row['jax_tokens_per_s']:>10,.0f} "
      f"{result['torch_tokens_per_s']:>10,.0f} {row['same_batch_ratio']:>7.2f}x"
    )
    print(
      f"{'loss tokens/s: packed (ours, ' + implementation + ') vs padded (torch)':<58} "
      f"{row['jax_packed_loss_tokens_per_s']:>10,.0f} {torch_padded_loss_tokens_per_s:>10,.0f} "
      f"{row['effective_speedup_vs_padded_torch']:>7.2f}x"
    )
  if FLAGS.json:
    print(json.dumps(result))


def define_flags() -> None:
  """Command-line flags, defined only when run as a program."""
  flags.DEFINE_enum("model", "demo", ["demo", "llama_100m"], "The demo model or the ~100M preset.")
  flags.DEFINE_list(
    "attention",
    ["blockwise:64", "blockwise", "xla"],
    "Our step's attention, each `model.attention_impl` or `impl:tile` (tile sizes, default 128).",
  )
  flags.DEFINE_integer("steps", 6, "Timed steps per measurement (after one warm-up step).")
  flags.DEFINE_integer("batch", 8, "Sequences per batch.")
  flags.DEFINE_integer("seq_len", 1024, "Packed row length (collection_shared.py's cutoff is 1024).")
  flags.DEFINE_integer("threads", 2, "CPU threads for PyTorch (XLA uses all cores).")
  flags.DEFINE_bool("json", False, "Print one JSON object as the last line.")


if __name__ == "__main__":
  define_flags()
  run_cli(main)
