"""The demo job: a tiny Llama-style model SFT'd on the project's sample collection (CPU, minutes).

  python -m csft_jax.train --config=configs/demo.py --workdir=workdirs/demo

Every field can be overridden on the command line, e.g. `--config.train.num_steps=50`.
"""

import ml_collections

from csft_jax.data.config import sample_collection_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the demo config; `arg` is unused."""
  del arg
  config = ml_collections.ConfigDict()

  # A preset plus field overrides; vocab_size=-1 takes the tokenizer's size (padded to 128).
  config.model = ml_collections.ConfigDict(dict(
      preset="tiny", vocab_size=-1, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4,
      num_kv_heads=2, max_position_embeddings=1024, dtype="float32", param_dtype="float32",
      remat_policy="none", scan_layers=True, attention_impl="xla"))

  config.data = sample_collection_config()
  config.data.seq_len = 256

  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

  config.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=3e-3, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.01, schedule="cosine",
      warmup_steps=0, warmup_fraction=0.05, min_lr_ratio=0.1, grad_clip_norm=1.0, z_loss=0.0))

  config.train = ml_collections.ConfigDict(dict(
      num_steps=150, num_epochs=0.0, global_batch_size=8, grad_accum_steps=1, log_every=10, eval_every=50,
      seed=0, peak_tflops=0.0, export_hf="", self_signal_at_step=-1))

  config.checkpoint = ml_collections.ConfigDict(dict(every_steps=50, keep=2, async_save=True))
  config.init = ml_collections.ConfigDict(dict(from_hf="", from_checkpoint=""))
  return config
