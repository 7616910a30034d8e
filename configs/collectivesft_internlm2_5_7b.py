"""CollectiveSFT recipe: full fine-tune of InternLM2.5-7B on the 12-source medical collection.

Published settings (Zhu et al., 2024, CollectiveSFT's train/collectivesft.yaml, LLaMA-Factory
v0.8.3): template intern2, cutoff 1024, max_samples 1000, val_size 0.1, lr 2e-5, 3 epochs, cosine
schedule, warmup ratio 0.05, bf16, per-device batch 16 x gradient accumulation 2 on 8 GPUs, the 12
sources concatenated (= proportional mixing), no packing. Two variants (`variant=`):

  paper  what the yaml ran: the first 1000 records of each source; 10% of their concatenation
         held out, the very examples LLaMA-Factory's split_dataset holds out (val_split=
         concatenation, seed 42); one example per padded row and 256 examples per optimizer step
         (16 x 2 x 8 GPUs, whatever the mesh preset), each example rendered with LLaMA-Factory's
         intern2 template (chat_template=llamafactory_intern2: efficient_eos labels) and cut
         to 1024 tokens by its infer_seqlen (overlong=infer_seqlen).
         10,800 training examples: about 42 steps an epoch.
  full   all records, 0.2% held out, packed rows of 1024 tokens, 64 rows per step: about the
         paper's 256 examples per step, as the collection packs about 4 examples into a row. The
         run's first log lines (mixture table, steps per epoch) give the real count; scale
         `--config.train.global_batch_size` (rows) to keep 256 examples per step on other data.

  python -m csft_jax.train --workdir=W \
      --config=configs/collectivesft_internlm2_5_7b.py:mesh=8xh100,model_dir=/models/internlm2_5-7b,data_dir=/data/csft

The argument is `k=v` pairs separated by commas (a bare name means `mesh=`):
  variant   `paper` (the default) or `full`, above;
  mesh      a preset (mesh + gradient accumulation, see MESH_PRESETS): v5p-8, v4-16, v5e-16, v6e-8,
            v4-8, v5e-8 or 8xh100 (the default);
  sources   `collection` (the default) or `cmb_only` (the single-source arm of experiments/mixture_ablation.py);
  model_dir the base model's HF directory (config.json, *.safetensors, tokenizer.json); it is both
            `init.from_hf` and the tokenizer. Default: checkpoints/internlm2_5-7b;
  data_dir  the folder holding the sources under the file names in SOURCES. Default: data/collectivesft;
  method    `full` (the default), `lora` or `offload` (configs/base.py METHODS): v4-8 and v5e-8,
            too small for a 7B full fine-tune, take `method=lora`.
Relative paths are relative to the current directory. A single source can still be moved
(`--config.data.sources.cmb.path=...`), capped (`.max_samples=1000`) or dropped (`.enabled=False`).
Print the per-device memory plan without devices or allocation:

  python -m csft_jax.train --config=configs/collectivesft_internlm2_5_7b.py:v5p-8 --plan_only
"""

import ml_collections

from configs import base
from csft_jax.data.config import source_config

# Each preset: the mesh (FSDP over every device), the gradient accumulation that makes a global
# batch of 256 rows of 1024 tokens (the paper variant's) fit in 90% of HBM, and the attention
# kernel, each checked with `--compile_for=<preset>`; the per-device memory of every preset is in the
# README, measured by tools/bench_memory.py. Accumulation 16 on the TPU presets: what stays beside
# the activations is per-parameter float32 state (params, AdamW moments, gradients, updates). v4-8
# and v5e-8 cannot fit a 7B full fine-tune: its float32 params and moments leave too little HBM for
# the gradients, updates and activations; they run method=lora or offload.
# The TPU presets use the Pallas splash kernel (tiles of SPLASH_TILE): equal to 'xla' in values and
# gradients (interpret-mode tests) and compiled for each slice, but not yet run on a TPU;
# --config.model.attention_impl=xla goes back. 8xh100 is the paper's setup (8 GPUs, per-device
# batch 16 x accum 2); not compiled here. The full variant's 64 rows take a quarter of the
# accumulation (at least 1): no more rows per device.
SPLASH_TILE = 512
MESH_PRESETS = {
  "v5p-8": (dict(data=1, fsdp=4, tensor=1), 16, "splash"),
  "v4-16": (dict(data=1, fsdp=8, tensor=1), 16, "splash"),
  "v5e-16": (dict(data=1, fsdp=16, tensor=1), 16, "splash"),
  "v6e-8": (dict(data=1, fsdp=8, tensor=1), 16, "splash"),
  "8xh100": (dict(data=1, fsdp=8, tensor=1), 2, "xla"),
  # The slices a 7B full fine-tune does not fit (above): with method=lora (or offload, measured).
  "v4-8": (dict(data=1, fsdp=4, tensor=1), 4, "splash"),
  "v5e-8": (dict(data=1, fsdp=8, tensor=1), 4, "splash"),
}

# The paper's schedule (its LLaMA-Factory run), for base.published_run.
HYPERPARAMETERS = dict(lr=2e-5, warmup_fraction=0.05, num_epochs=3.0, save_every=500)
PAPER_EXAMPLES_PER_STEP = 256  # 16 per device x 2 accumulation x 8 GPUs
PAPER_MAX_SAMPLES = 1000
FULL_ROWS_PER_STEP = 64  # packed rows of ~4 examples: ~PAPER_EXAMPLES_PER_STEP examples

# The 12 sources of CollectiveSFT, as its preprocess/*.py prepare them for LLaMA-Factory (Alpaca
# JSON), except CMB-train (raw CMB exam items, rendered as cmb_to_sft.py does) and cmeddialogue
# (the original GB18030 CSVs, mapped as cmeddialogue_to_sft.py maps them).
CMEDDIALOGUE_COLUMNS = {"instruction": "title", "input": "ask", "output": "answer"}
SOURCES = {
  "cmb": ("cmb/CMB-train-merge.json", "mcq", {}),
  "cmeddialogue": ("cmeddialogue", "alpaca", dict(encoding="gb18030", columns=CMEDDIALOGUE_COLUMNS)),
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
  """`variant=full,mesh=v5p-8,sources=cmb_only,model_dir=M,data_dir=D` (a bare name is a mesh) -> options."""
  return base.parse_arg(
    arg,
    {
      "variant": "paper",
      "mesh": "8xh100",
      "sources": "collection",
      "model_dir": model_dir,
      "data_dir": "data/collectivesft",
      "method": "full",
    },
    where="the CollectiveSFT recipe",
    bare="mesh",
    choices={
      "variant": ("paper", "full"),
      "mesh": tuple(MESH_PRESETS),
      "sources": ("collection", "cmb_only"),
      "method": base.METHODS,
    },
  )


def recipe(
  arg: str | None, *, model_preset: str, model_dir: str, chat_template: str, vocab_size: int
) -> ml_collections.ConfigDict:
  """The CollectiveSFT recipe for one base model (shared by the configs of each model size)."""
  options = parse_arg(arg, model_dir=model_dir)
  paper = options["variant"] == "paper"
  config = base.get_config()

  mesh, grad_accum_steps, attention_impl = MESH_PRESETS[options["mesh"]]
  # Architecture comes from the HF checkpoint in init.from_hf; these are runtime choices.
  # 'cudnn' (flash attention on NVIDIA GPUs) has not been validated against 'xla' yet; on H100s try
  # --config.model.attention_impl=cudnn after comparing a few losses.
  config.model.update(
    preset=model_preset,
    vocab_size=vocab_size,
    dtype="bfloat16",
    param_dtype="float32",
    remat_policy="full",
    scan_layers=True,
    attention_impl=attention_impl,
    attention_block_q=SPLASH_TILE,
    attention_block_kv=SPLASH_TILE,
  )

  data = config.data
  root = options["data_dir"]
  names = ["cmb"] if options["sources"] == "cmb_only" else list(SOURCES)
  cap = dict(max_samples=PAPER_MAX_SAMPLES) if paper else {}
  data.sources = ml_collections.ConfigDict(
    {name: source_config(f"{root}/{SOURCES[name][0]}", SOURCES[name][1], **SOURCES[name][2], **cap) for name in names}
  )
  data.mixing = "proportional"  # the paper concatenated the sources
  data.seq_len = 1024  # LLaMA-Factory cutoff_len
  data.overlong = "infer_seqlen"
  data.tokenizer = ""  # empty: the tokenizer of init.from_hf, the model's own (needs tokenizer.json)
  data.chat_template = chat_template
  data.packing = "padded" if paper else "packed"
  data.val_fraction = 0.1 if paper else 0.002
  if paper:  # val_size 0.1 of the concatenation, as LLaMA-Factory's split_dataset with its seed
    data.val_split, data.seed = "concatenation", 42

  rows = PAPER_EXAMPLES_PER_STEP if paper else FULL_ROWS_PER_STEP
  grad_accum_steps = max(1, grad_accum_steps * rows // PAPER_EXAMPLES_PER_STEP)
  base.published_run(config, options, mesh, rows, grad_accum_steps, **HYPERPARAMETERS)
  return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the recipe for InternLM2.5-7B; see the module docstring for `arg`."""
  return recipe(
    arg,
    model_preset="internlm2_5_7b",
    model_dir="checkpoints/internlm2_5-7b",
    chat_template="llamafactory_intern2",
    vocab_size=92544,
  )
