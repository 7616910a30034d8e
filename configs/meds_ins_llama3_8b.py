"""MedS-Ins recipe: MMedIns-Llama 3, a full fine-tune of Llama-3-8B on the 122 MedS-Ins tasks.

Published settings (Wu et al., 2024, "Towards Evaluating and Building Versatile Large Language
Models for Medicine"): Llama-3-8B, sequence length 2048, batch 128, lr 1e-5, 5 epochs. Not
published, so ours: cosine decay after 3% warmup, packed rows, bf16 compute with f32 master
weights, and the prompt mix below.

Data: every `task*.json` of MedS-Ins in `data_dir` (format `meds_ins`, csft_jax/data/meds_ins.py)
whose Split Type is Train or Train/Test (the Test-only tasks are MedS-Bench's), built as the
official `InsDataset` builds them: with probability 0.5 the 3-shot prompt that MedS-Bench
evaluates, else zero-shot; with probability 0.5 a rewritten definition from
`data_dir/RewriteDefinitions.json` (the file of the MedS-Ins repository, Evaluation/), else
`Definition[0]`. The draws are seeded per (config.data.seed, task, instance). Examples over 2048
tokens are cut at the end; a 3-shot prompt so long that nothing of the answer is left is dropped
(the mixture table at the start of a run counts both).

  python -m csft_jax.train --workdir=W \
      --config=configs/meds_ins_llama3_8b.py:mesh=v5p-8,model_dir=/models/Meta-Llama-3-8B,data_dir=/data/meds_ins

The argument is `k=v` pairs separated by commas (a bare name means `mesh=`):
  mesh      a preset (mesh + gradient accumulation, see MESH_PRESETS); default 8xh100;
  model_dir the base model's HF directory (config.json, *.safetensors, tokenizer.json): both
            `init.from_hf` and the tokenizer. Default: checkpoints/Meta-Llama-3-8B;
  data_dir  the folder of the MedS-Ins task files and RewriteDefinitions.json. Default: data/meds_ins;
  method    `full` (the default), `lora` or `offload` (configs/base.py METHODS); v4-8 and v5e-8 take
            `method=lora`.
The prompt mix is `--config.data.sources.meds_ins.few_shot_prob=...`, `.rewrite_prob=...`,
`.split_types=...`. Will it fit?

  python -m csft_jax.train --config=configs/meds_ins_llama3_8b.py:mesh=v5p-8 --compile_for=v5p-8
"""

import ml_collections

from configs import base
from csft_jax.data import meds_ins

# Each preset: the mesh (FSDP over every device) and the gradient accumulation that makes the
# recipe's global batch of 128 x 2048 fit in 90% of HBM, checked with `--compile_for=<preset>` (the
# README has each preset's memory). Accumulation 16 on 8 devices is the most they allow (one
# sequence per device per micro-batch); v5e-16 does not fit even at its most (8), so v5e-32 it is.
# 8xh100: 8 GPUs, per-device batch 4 x accum 4; not compiled here.
MESH_PRESETS = {
  "v5p-8": (dict(data=1, fsdp=4, tensor=1), 4),
  "v4-16": (dict(data=1, fsdp=8, tensor=1), 16),
  "v5e-32": (dict(data=1, fsdp=32, tensor=1), 4),
  "v6e-8": (dict(data=1, fsdp=8, tensor=1), 16),
  "8xh100": (dict(data=1, fsdp=8, tensor=1), 4),
  # Too small for the full fine-tune; with method=lora.
  "v4-8": (dict(data=1, fsdp=4, tensor=1), 8),
  "v5e-8": (dict(data=1, fsdp=8, tensor=1), 8),
}
# The MedS-Ins schedule, for base.published_run.
HYPERPARAMETERS = dict(lr=1e-5, warmup_fraction=0.03, num_epochs=5.0, save_every=1000)
# Llama-3-8B's vocabulary (128,000 tokens + 256 reserved specials).
VOCAB_SIZE = 128256


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the recipe; see the module docstring for `arg`."""
  options = base.parse_arg(
    arg,
    {"mesh": "8xh100", "model_dir": "checkpoints/Meta-Llama-3-8B", "data_dir": "data/meds_ins", "method": "full"},
    where="configs/meds_ins_llama3_8b.py",
    bare="mesh",
    choices={"mesh": tuple(MESH_PRESETS), "method": base.METHODS},
  )
  config = base.get_config()
  # The architecture comes from the HF checkpoint in init.from_hf (Llama-3-8B: rope theta 5e5, no
  # rope scaling, 8k positions). Without one (--compile_for, --plan_only) the Llama-3.1-8B preset
  # stands in: the same shapes, so the same memory.
  config.model.update(
    preset="llama3_1_8b",
    vocab_size=VOCAB_SIZE,
    max_position_embeddings=8192,
    dtype="bfloat16",
    param_dtype="float32",
    remat_policy="full",
    scan_layers=True,
    attention_impl="xla",
  )

  data = config.data
  root = options["data_dir"]
  data.sources = ml_collections.ConfigDict(
    dict(
      meds_ins=meds_ins.source_config(
        f"{root}/task*.json",
        split_types=("Train", "Train/Test"),
        rewrite_definitions=f"{root}/RewriteDefinitions.json",
        rewrite_prob=0.5,
        few_shot_prob=0.5,
        seed=data.get_ref("seed"),
      )
    )
  )
  data.mixing = "proportional"  # one source: every instance once per epoch
  data.seq_len = 2048
  data.overlong = "truncate"
  data.tokenizer = ""  # empty: the tokenizer of init.from_hf (needs tokenizer.json)
  data.chat_template = "llama3"
  data.val_fraction = 0.001

  mesh, grad_accum_steps = MESH_PRESETS[options["mesh"]]
  base.published_run(config, options, mesh, 128, grad_accum_steps, **HYPERPARAMETERS)
  return config
