"""Shared pieces of the config files: the base config and the config-argument parser.

The base config is every component's `default_config()`; an experiment config starts from it
and states only what differs (big_vision style):

  config = base.get_config()
  config.model.update(preset="tiny", hidden_size=128)
  config.data = sample_collection_config()
"""

import ml_collections

from csft_jax import checkpointing, sharding, train
from csft_jax.data import config as data_config
from csft_jax.models import config as model_config
from csft_jax.models import lora
from csft_jax.training import optimizer


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Every section with its component's defaults: model, lora, data, mesh, optim, train, checkpoint, init."""
  del arg
  config = ml_collections.ConfigDict()
  config.model = model_config.default_config()
  config.lora = lora.default_config()
  config.data = data_config.default_config()
  config.mesh = sharding.default_config()
  config.optim = optimizer.default_config()
  config.train = train.default_train_config()
  config.checkpoint = checkpointing.default_config()
  config.init = train.default_init_config()
  return config


# `method=` of the recipes: how much of the model trains, and where its optimizer state lives.
#   full     every parameter, f32 master weights and AdamW moments on the device (the papers' runs);
#   lora     LoRA adapters of rank 16 (alpha 32) on every linear projection of every layer, the base
#            frozen in bf16; lr 1e-4 (LLaMA-Factory's LoRA examples); the adapters are also exported
#            as a PEFT directory (W/peft) beside the merged HF export;
#   offload  every parameter, the AdamW moments in host memory (optim.offload=host).
METHODS = ("full", "lora", "offload")


def apply_method(config: ml_collections.ConfigDict, method: str) -> None:
  """Sets `config` for a `method` of METHODS (in place)."""
  if method == "lora":
    config.lora.update(rank=16, alpha=32.0, dropout=0.0, targets="")
    config.optim.lr = 1e-4
    config.train.export_peft = "peft"
  elif method == "offload":
    config.optim.offload = "host"
  elif method != "full":
    raise ValueError(f"method={method!r}; choose one of {METHODS}.")


def published_run(
  config: ml_collections.ConfigDict,
  options: dict[str, str],
  mesh: dict,
  global_batch_size: int,
  grad_accum_steps: int,
  *,
  lr: float,
  warmup_fraction: float,
  num_epochs: float,
  save_every: int,
) -> None:
  """Sets (in place) what the papers' fine-tuning runs share, then `options["method"]` (`apply_method`).

  AdamW with beta2 0.999 and no weight decay, warmup then cosine decay to 0 (LLaMA-Factory's
  `cosine` scheduler); the loss logged every 10 steps; validated and saved every `save_every`
  steps, the last 3 kept; started from the HF checkpoint `options["model_dir"]` and exported as
  `W/hf_export`.
  """
  config.mesh.update(mesh)
  config.optim.update(lr=lr, b2=0.999, weight_decay=0.0, warmup_fraction=warmup_fraction, min_lr_ratio=0.0)
  config.train.update(
    num_epochs=num_epochs,
    global_batch_size=global_batch_size,
    grad_accum_steps=grad_accum_steps,
    log_every=10,
    eval_every=save_every,
    export_hf="hf_export",
  )
  config.checkpoint.update(every_steps=save_every, keep=3)
  config.init.from_hf = options["model_dir"]
  apply_method(config, options["method"])


def parse_arg(
  arg: str | None,
  defaults: dict[str, str],
  *,
  where: str,
  bare: str | None = None,
  choices: dict[str, tuple[str, ...]] | None = None,
) -> dict[str, str]:
  """`k=v,k2=v2` (a bare value means `bare=value`) over `defaults`; errors name the config file.

  Args:
    arg: the part after `:` in `--config=file.py:arg`.
    defaults: the keys this config takes, with their defaults.
    where: the config file, for errors.
    bare: the key a value without `k=` sets.
    choices: allowed values per key, where restricted.
  """
  parsed = dict(defaults)
  for part in filter(None, (arg or "").split(",")):
    key, sep, value = part.partition("=")
    if not sep:
      if bare is None:
        raise ValueError(f"{where}: config arg {part!r} must be k=v with k in {sorted(defaults)}.")
      key, value = bare, key
    if key not in parsed:
      raise ValueError(f"{where}: config arg {arg!r}: unknown key {key!r}; known: {sorted(defaults)}.")
    parsed[key] = value
  for key, allowed in (choices or {}).items():
    if parsed[key] not in allowed:
      raise ValueError(f"{where}: {key}={parsed[key]!r}; choose one of {list(allowed)}.")
  return parsed
