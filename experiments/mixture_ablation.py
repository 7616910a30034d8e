"""The paper's mixture question at full scale: does the collection beat CMB-train alone, and how to mix it?

  python -m csft_jax.sweep --sweep=experiments/mixture_ablation.py --workdir=W --dry_run
  python -m csft_jax.sweep --sweep=experiments/mixture_ablation.py --workdir=/mnt/shared/W \
      --launcher=tpu_pod --tpu_name=NAME --zone=ZONE
  python -m csft_jax.report --workdir=W

Arms: CMB-train only (one source, so no mixing choice), and the whole collection mixed
proportionally (what concatenating the sources does, as CollectiveSFT did), by temperature
T = 2 and T = 5 (p_i ~ n_i ** (1/T)), and uniformly; crossed with the model size, one config
file per model (its preset, HF checkpoint, tokenizer, batch and mesh). Each config file takes
`sources=cmb_only|collection` as its config arg (see `configs/mixture_tiny.py` for the same
contract at CPU scale). Every run is scored on CMB and MedS-Bench.
"""

import ml_collections

from csft_jax.sweep import chain, product, sweep

# One trainer config per model size; the first is the paper's model.
MODEL_CONFIGS = ("configs/collectivesft_internlm2_5_7b.py", "configs/collectivesft_qwen2_5_0_5b.py")


def get_experiment() -> ml_collections.ConfigDict:
  exp = ml_collections.ConfigDict()
  exp.config = MODEL_CONFIGS[0]
  exp.evals = ("configs/eval/cmb.py", "configs/eval/meds_bench.py")
  return exp


def get_sweep() -> list[dict]:
  mixing = chain(
    sweep("data.mixing", ["proportional"]),
    product([sweep("data.mixing", ["temperature"]), sweep("data.temperature", [2.0, 5.0])]),
    sweep("data.mixing", ["uniform"]),
  )
  arms = chain(
    sweep("arg.sources", ["cmb_only"]),
    product([sweep("arg.sources", ["collection"]), mixing]),
  )
  return product([sweep("config", list(MODEL_CONFIGS)), arms])
