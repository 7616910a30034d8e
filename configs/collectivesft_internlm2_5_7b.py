"""CollectiveSFT recipe: full fine-tune of InternLM2.5-7B on the 12-source medical collection.

Published settings (Zhu et al., 2024, trained with LLaMA-Factory): cutoff 1024, lr 2e-5, 3 epochs,
cosine schedule, warmup ratio 0.05, bf16, per-device batch 16 x gradient accumulation 2 on 8 GPUs
(global batch 256 sequences), the 12 sources concatenated (= proportional mixing).

  python -m csft_jax.train --config=configs/collectivesft_internlm2_5_7b.py:8xh100 --workdir=W \
      --config.init.from_hf=/models/internlm2_5-7b --config.data.tokenizer=/models/internlm2_5-7b \
      --config.data.sources.cmb.path=/data/CMB-train-merge.json ...

The argument is `k=v` pairs separated by commas (a bare name means `mesh=`): `mesh` picks a mesh
preset (v4-8, v5e-8, v5p-8 or 8xh100, the default) and `sources` is `collection` (the default) or
`cmb_only` (the single-source arm of experiments/mixture_ablation.py). Set each source path
with `--config.data.sources.<name>.path=...`, or place the files under data/collectivesft/ (relative
to the repository root) with the names below. Print the per-device memory plan without allocating anything:

  python -m csft_jax.train --config=configs/collectivesft_internlm2_5_7b.py:v5p-8 --plan_only
"""

import ml_collections

from csft_jax.data.config import default_data_config, source_config

# Device count of each slice (a TPU v4/v5p chip is one JAX device with megacore) and its mesh.
# Params (f32) + AdamW moments for 7.74B parameters are ~86.5 GiB in total, so FSDP over every
# device: per device ~10.8 GiB on 8 devices, ~21.6 GiB on 4 (v4: 32 GiB HBM, v5p: 95 GiB HBM).
# v5e chips have 16 GiB: 10.8 GiB of state leaves little for activations; prefer v5e-16 or larger
# (same preset with --config.mesh.fsdp=16) for this model.
MESH_PRESETS = {
    "v4-8": dict(data=1, fsdp=4, tensor=1),
    "v5e-8": dict(data=1, fsdp=8, tensor=1),
    "v5p-8": dict(data=1, fsdp=4, tensor=1),
    "8xh100": dict(data=1, fsdp=8, tensor=1),
}

# The 12 sources of CollectiveSFT, as prepared for LLaMA-Factory (Alpaca JSON), except CMB-train
# (raw CMB exam items, rendered as the paper did) and cmeddialogue (the original GB18030 CSV).
SOURCES = {
    "cmb": ("cmb/CMB-train-merge.json", "mcq", {}),
    "cmeddialogue": ("cmeddialogue", "columns",
                     dict(encoding="gb18030", columns={"user": "ask", "assistant": "answer"})),
    "cmedqa2": ("cmedqa2.json", "alpaca", {}),
    "cmid": ("cmid.json", "alpaca", {}),
    "discmed": ("discmed.json", "alpaca", {}),
    "headqa": ("headqa.json", "alpaca", {}),
    "medicaldialogue": ("medicaldialogue.json", "alpaca", {}),
    "medmcqa": ("medmcqa.json", "alpaca", {}),
    "medqajin": ("medqa_jin.json", "alpaca", {}),
    "mlecqa": ("mlecqa.json", "alpaca", {}),
    "nlpec": ("nlpec.json", "alpaca", {}),
    "webmedqa": ("webmedqa.json", "alpaca", {}),
}


def parse_arg(arg: str | None) -> dict[str, str]:
  """`mesh=v5p-8,sources=cmb_only` (or a bare mesh name) -> {"mesh": ..., "sources": ...}."""
  parsed = {"mesh": "8xh100", "sources": "collection"}
  for part in filter(None, (arg or "").split(",")):
    key, sep, value = part.partition("=")
    key, value = (key, value) if sep else ("mesh", key)
    if key not in parsed:
      raise ValueError(f"config arg {arg!r}: unknown key {key!r}; use mesh=... and/or sources=...")
    parsed[key] = value
  if parsed["mesh"] not in MESH_PRESETS:
    raise ValueError(f"Unknown mesh preset {parsed['mesh']!r}; choose one of {sorted(MESH_PRESETS)}.")
  if parsed["sources"] not in ("collection", "cmb_only"):
    raise ValueError(f"sources={parsed['sources']!r}; choose collection or cmb_only.")
  return parsed


def recipe(arg: str | None, *, model_preset: str, model_dir: str, chat_template: str,
           vocab_size: int) -> ml_collections.ConfigDict:
  """The CollectiveSFT recipe for one base model (shared by the configs of each model size)."""
  options = parse_arg(arg)
  preset = options["mesh"]
  config = ml_collections.ConfigDict()

  # Architecture comes from the HF checkpoint in init.from_hf; these are runtime choices.
  config.model = ml_collections.ConfigDict(dict(
      preset=model_preset, vocab_size=vocab_size, dtype="bfloat16", param_dtype="float32",
      remat_policy="full", scan_layers=True,
      # 'cudnn' (flash attention on NVIDIA GPUs) has not been validated against 'xla' yet; on
      # H100s try --config.model.attention_impl=cudnn after comparing a few losses.
      attention_impl="xla"))

  data = default_data_config()
  root = "data/collectivesft"
  names = ["cmb"] if options["sources"] == "cmb_only" else list(SOURCES)
  data.sources = ml_collections.ConfigDict(
      {name: source_config(f"{root}/{SOURCES[name][0]}", SOURCES[name][1], **SOURCES[name][2]) for name in names})
  data.mixing = "proportional"  # the paper concatenated the sources
  data.seq_len = 1024  # LLaMA-Factory cutoff_len
  data.overlong = "truncate"
  data.tokenizer = model_dir  # the model's own tokenizer (needs tokenizer.json)
  data.chat_template = chat_template
  data.val_fraction = 0.002
  config.data = data

  config.mesh = ml_collections.ConfigDict(MESH_PRESETS[preset])

  config.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=2e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, schedule="cosine",
      warmup_steps=0, warmup_fraction=0.05, min_lr_ratio=0.0, grad_clip_norm=1.0, z_loss=0.0))

  config.train = ml_collections.ConfigDict(dict(
      num_steps=0, num_epochs=3.0, global_batch_size=256, grad_accum_steps=2, log_every=10, eval_every=500,
      seed=0, peak_tflops=0.0, export_hf="hf_export", self_signal_at_step=-1))

  config.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, keep=3, async_save=True))
  config.init = ml_collections.ConfigDict(dict(from_hf=model_dir, from_checkpoint=""))
  return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the recipe for InternLM2.5-7B; see the module docstring for `arg`."""
  return recipe(arg, model_preset="internlm2_5_7b", model_dir="checkpoints/internlm2_5-7b",
                chat_template="internlm2", vocab_size=92544)
