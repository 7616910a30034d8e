"""CollectiveSFT recipe: full fine-tune of InternLM2.5-7B on the 12-source medical collection.

Published settings (Zhu et al., 2024, trained with LLaMA-Factory): cutoff 1024, lr 2e-5, 3 epochs,
cosine schedule, warmup ratio 0.05, bf16, per-device batch 16 x gradient accumulation 2 on 8 GPUs
(global batch 256 sequences), the 12 sources concatenated (= proportional mixing).

  python -m csft_jax.train --workdir=W \
      --config=configs/collectivesft_internlm2_5_7b.py:mesh=8xh100,model_dir=/models/internlm2_5-7b,data_dir=/data/csft

The argument is `k=v` pairs separated by commas (a bare name means `mesh=`):
  mesh      a preset (mesh + gradient accumulation, see MESH_PRESETS): v5p-8, v4-16, v5e-16, v6e-8 or
            8xh100 (the default);
  sources   `collection` (the default) or `cmb_only` (the single-source arm of experiments/mixture_ablation.py);
  model_dir the base model's HF directory (config.json, *.safetensors, tokenizer.json); it is both
            `init.from_hf` and the tokenizer. Default: checkpoints/internlm2_5-7b;
  data_dir  the folder holding the sources under the file names in SOURCES. Default: data/collectivesft.
Relative paths are relative to the current directory. A single source can still be moved
(`--config.data.sources.cmb.path=...`), capped (`.max_samples=1000`) or dropped (`.enabled=False`).
Print the per-device memory plan without devices or allocation:

  python -m csft_jax.train --config=configs/collectivesft_internlm2_5_7b.py:v5p-8 --plan_only
"""

import ml_collections

from configs import base
from csft_jax.data.config import source_config

# Each preset: the mesh (FSDP over every device) and the gradient accumulation that makes the
# recipe's global batch of 256 sequences fit, checked with `--compile_for=<preset>` (GiB per device,
# total of 90% of HBM allowed; tools/bench_memory.py measures all of them):
#   v5p-8  4 devices x 95 GiB, accum 2:  77.1
#   v4-16  8 devices x 32 GiB, accum 16: 26.8. v4-8 cannot hold a 7B full fine-tune: 4 x 32 GiB
#          leave 10 GiB per device beside 21.6 GiB of f32 params + AdamW moments (79.8 at accum 2).
#   v5e-16 16 devices x 16 GiB, accum 16: 13.5. v5e-8 cannot: 10.8 GiB of state per 16 GiB chip
#          leave too little for gradients and activations (40.7 at accum 2).
#   v6e-8  8 devices x 32 GiB, accum 16: 26.4
# 8xh100 is the paper's setup (8 GPUs, per-device batch 16 x accum 2); not compiled here.
MESH_PRESETS = {
    "v5p-8": (dict(data=1, fsdp=4, tensor=1), 2),
    "v4-16": (dict(data=1, fsdp=8, tensor=1), 16),
    "v5e-16": (dict(data=1, fsdp=16, tensor=1), 16),
    "v6e-8": (dict(data=1, fsdp=8, tensor=1), 16),
    "8xh100": (dict(data=1, fsdp=8, tensor=1), 2),
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


def parse_arg(arg: str | None, *, model_dir: str) -> dict[str, str]:
  """`mesh=v5p-8,sources=cmb_only,model_dir=M,data_dir=D` (a bare name is a mesh) -> options."""
  return base.parse_arg(arg, {"mesh": "8xh100", "sources": "collection", "model_dir": model_dir,
                              "data_dir": "data/collectivesft"},
                        where="the CollectiveSFT recipe", bare="mesh",
                        choices={"mesh": tuple(MESH_PRESETS), "sources": ("collection", "cmb_only")})


def recipe(arg: str | None, *, model_preset: str, model_dir: str, chat_template: str,
           vocab_size: int) -> ml_collections.ConfigDict:
  """The CollectiveSFT recipe for one base model (shared by the configs of each model size)."""
  options = parse_arg(arg, model_dir=model_dir)
  config = base.get_config()

  # Architecture comes from the HF checkpoint in init.from_hf; these are runtime choices.
  # 'cudnn' (flash attention on NVIDIA GPUs) has not been validated against 'xla' yet; on H100s try
  # --config.model.attention_impl=cudnn after comparing a few losses.
  config.model.update(preset=model_preset, vocab_size=vocab_size, dtype="bfloat16", param_dtype="float32",
                      remat_policy="full", scan_layers=True, attention_impl="xla")

  data = config.data
  root = options["data_dir"]
  names = ["cmb"] if options["sources"] == "cmb_only" else list(SOURCES)
  data.sources = ml_collections.ConfigDict(
      {name: source_config(f"{root}/{SOURCES[name][0]}", SOURCES[name][1], **SOURCES[name][2]) for name in names})
  data.mixing = "proportional"  # the paper concatenated the sources
  data.seq_len = 1024  # LLaMA-Factory cutoff_len
  data.overlong = "truncate"
  data.tokenizer = ""  # empty: the tokenizer of init.from_hf, the model's own (needs tokenizer.json)
  data.chat_template = chat_template
  data.val_fraction = 0.002

  mesh, grad_accum_steps = MESH_PRESETS[options["mesh"]]
  config.mesh.update(mesh)
  config.optim.update(lr=2e-5, b2=0.999, weight_decay=0.0, warmup_fraction=0.05, min_lr_ratio=0.0)
  config.train.update(num_epochs=3.0, global_batch_size=256, grad_accum_steps=grad_accum_steps, log_every=10,
                      eval_every=500, export_hf="hf_export")
  config.checkpoint.update(every_steps=500, keep=3)
  config.init.from_hf = options["model_dir"]
  return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the recipe for InternLM2.5-7B; see the module docstring for `arg`."""
  return recipe(arg, model_preset="internlm2_5_7b", model_dir="checkpoints/internlm2_5-7b",
                chat_template="internlm2", vocab_size=92544)
