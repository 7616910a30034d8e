"""The mixture ablation at CPU scale: 5 runs of the demo model, about 11 minutes on 2 CPU cores.

  python -m csft_jax.sweep --sweep=experiments/mixture_ablation_tiny.py --workdir=workdirs/mixture_tiny
  python -m csft_jax.report --workdir=workdirs/mixture_tiny

Same question as `experiments/mixture_ablation.py`: the CMB-style items alone vs the whole
collection, and how to mix the collection. A model this small answers CMB at chance, so the
measure here is the held-out loss per source that the trainer logs; the CMB eval on the shipped
24-item sample (official prompts and extraction, ~15 s a run) shows the whole path to the report.
"""

import ml_collections

from csft_jax.sweep import chain, product, sweep


def get_experiment() -> ml_collections.ConfigDict:
  exp = ml_collections.ConfigDict()
  exp.config = "configs/mixture_tiny.py"
  exp.evals = ("configs/eval/cmb.py",)
  return exp


def get_sweep() -> list[dict]:
  return chain(
    sweep("arg.sources", ["cmb_only"]),
    product(
      [
        sweep("arg.sources", ["collection"]),
        chain(
          sweep("data.mixing", ["proportional"]),
          product([sweep("data.mixing", ["temperature"]), sweep("data.temperature", [2.0, 5.0])]),
          sweep("data.mixing", ["uniform"]),
        ),
      ]
    ),
  )
