"""LoRA: `config.lora`, the family's module names, merging, and PEFT adapter directories.

The adapters themselves live on `decoder.Projection` (`lora_a` `[*in, r]`, `lora_b` `[r, *out]`,
`nnx.LoRAParam`). Here they are named the way the family's HF checkpoints name their modules, so
that `targets` reads like PEFT's `target_modules`, and written and read as a PEFT adapter
directory (`adapter_config.json` + `adapter_model.safetensors`) that `peft.PeftModel` loads onto
the transformers model.

InternLM2's attention is one fused `wqkv`: its adapter has one A for q, k and v (the decoder's
`shared_qkv_a`) and a B whose rows follow wqkv's interleaved layout, exactly as PEFT puts it there.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from csft_jax import files
from csft_jax.models.config import ModelConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def default_config() -> ml_collections.ConfigDict:
  """`config.lora`: rank 0 trains every parameter; rank r > 0 trains adapters on a frozen base."""
  return ml_collections.ConfigDict(
    dict(
      rank=0,  # 0: off (full fine-tuning).
      alpha=16.0,  # scale alpha / rank (alpha / sqrt(rank) with rslora)
      dropout=0.0,  # dropout on the adapters' input while training
      # The family's own module names, comma-separated (Llama/Qwen/Mistral: q_proj,k_proj,v_proj,
      # o_proj,gate_proj,up_proj,down_proj; InternLM2: wqkv,wo,w1,w2,w3), or a regex matched
      # against them; "": every linear projection of every layer.
      targets="",
      rslora=False,
    )
  )


@dataclasses.dataclass(frozen=True)
class Module:
  """One HF module of a layer that can carry an adapter, and our projection(s) it is."""

  hf: str  # e.g. "self_attn.q_proj", relative to `model.layers.{i}.`
  ours: tuple[str, ...]  # e.g. ("attn.q_proj",)

  @property
  def short(self) -> str:
    return self.hf.rsplit(".", 1)[-1]


_LLAMA = tuple(Module(f"self_attn.{n}", (f"attn.{n}",)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) + tuple(
  Module(f"mlp.{n}", (f"mlp.{n}",)) for n in ("gate_proj", "up_proj", "down_proj")
)
_INTERNLM2 = (
  Module("attention.wqkv", ("attn.q_proj", "attn.k_proj", "attn.v_proj")),
  Module("attention.wo", ("attn.o_proj",)),
  Module("feed_forward.w1", ("mlp.gate_proj",)),
  Module("feed_forward.w3", ("mlp.up_proj",)),
  Module("feed_forward.w2", ("mlp.down_proj",)),
)


def modules(arch: str) -> tuple[Module, ...]:
  """The adaptable modules of a layer of `arch`, under the family's HF names."""
  return _INTERNLM2 if arch == "internlm2" else _LLAMA


def resolve_targets(arch: str, targets: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
  """`config.lora.targets` (HF names, comma-separated, or a regex) -> our projection paths.

  Raises:
    ValueError naming the family's modules when a name is unknown or the regex matches none.
  """
  family = modules(arch)
  names = [m.short for m in family]
  if isinstance(targets, str):
    targets = targets.strip()
    if not targets:
      chosen = names
    elif re.fullmatch(r"[\w,\s]+", targets):
      chosen = [t.strip() for t in targets.split(",") if t.strip()]
    else:
      try:
        pattern = re.compile(targets)
      except re.error as e:
        raise ValueError(
          f"config.lora.targets={targets!r} is neither a list of module names nor a regex ({e})."
        ) from None
      chosen = [
        n
        for n in names
        if pattern.fullmatch(n) or any(pattern.fullmatch(f"model.layers.0.{m.hf}") for m in family if m.short == n)
      ]
  else:
    chosen = list(targets)
  unknown = [t for t in chosen if t not in names]
  if unknown or not chosen:
    raise ValueError(
      f"config.lora.targets={targets!r}: {'unknown module(s) ' + str(unknown) if unknown else 'matches no module'}"
      f"; {arch} layers have {names}."
    )
  return tuple(p for m in family if m.short in chosen for p in m.ours)


def model_fields(lora: ml_collections.ConfigDict | None, arch: str) -> dict[str, Any]:
  """The `ModelConfig` fields of `config.lora` for a model of `arch` (empty when LoRA is off)."""
  if lora is None or not lora.rank:
    return {}
  return dict(
    lora_rank=int(lora.rank),
    lora_alpha=float(lora.alpha),
    lora_dropout=float(lora.dropout),
    lora_rslora=bool(lora.rslora),
    lora_targets=resolve_targets(arch, lora.targets),
  )


def hf_target_names(config: ModelConfig) -> list[str]:
  """The family's names of the modules that carry adapters (PEFT's `target_modules`)."""
  return [m.short for m in modules(config.arch) if m.ours[0] in config.lora_targets]


# ------------------------------------------------------------- state views ----


def split(state: nnx.State) -> tuple[nnx.State, nnx.State]:
  """(adapters, everything else) of a model's parameter state."""
  adapters, base = nnx.split_state(state, nnx.LoRAParam, ...)
  return adapters, base


def _flat(model: nnx.Module) -> dict[tuple, Any]:
  return {tuple(str(k) for k in path): v[...] for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _layer_view(config: ModelConfig, flat: dict[tuple, Any], layer: int, path: tuple[str, ...]):
  """The array of `path` (relative to a layer) for `layer`, in either layer layout."""
  if config.scan_layers:
    return flat[("layers", *path)][layer]
  return flat[("layers", str(layer), *path)]


def deltas(model: nnx.Module) -> dict[tuple[int, str], jax.Array]:
  """`{(layer, "attn.q_proj"): scale * A @ B}` in float32, shaped like that projection's kernel."""
  config: ModelConfig = model.config
  flat = _flat(model)
  out = {}
  for layer in range(config.num_layers):
    for path in config.lora_targets:
      a = _down(config, flat, layer, path)
      b = _layer_view(config, flat, layer, (*path.split("."), "lora_b")).astype(jnp.float32)
      out[(layer, path)] = config.lora_scale * jnp.tensordot(a.astype(jnp.float32), b, axes=1)
  return out


def _down(config: ModelConfig, flat: dict[tuple, Any], layer: int, path: str) -> jax.Array:
  module = path.split(".")
  if config.arch == "internlm2" and module[0] == "attn" and module[1] != "o_proj":
    return _layer_view(config, flat, layer, ("attn", "shared_qkv_a"))
  return _layer_view(config, flat, layer, (*module, "lora_a"))


def merged(model: nnx.Module) -> nnx.Module:
  """A model without adapters whose kernels are `W + scale * A @ B` (PEFT's `merge_and_unload`),
  each in its kernel's dtype."""
  from csft_jax.models.decoder import Decoder, rebuilt_from

  config: ModelConfig = model.config
  base_config = config.replace(lora_rank=0, lora_targets=())
  target = nnx.eval_shape(lambda: Decoder(base_config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(target)
  source = {tuple(str(k) for k in path): v for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  changes = deltas(model)
  for path, variable in nnx.to_flat_state(state):
    key = tuple(str(k) for k in path)
    value = source[key][...]
    if key[-1] == "kernel" and key[0] == "layers":
      module = ".".join(key[-3:-1])
      if module in config.lora_targets:
        if config.scan_layers:
          delta = jnp.stack([changes[(i, module)] for i in range(config.num_layers)])
        else:
          delta = changes[(int(key[1]), module)]
        value = (value.astype(jnp.float32) + delta).astype(value.dtype)
    variable.set_value(value)
  return rebuilt_from(model, nnx.merge(graphdef, state))


# ---------------------------------------------------------------- PEFT I/O ----

_PREFIX = "base_model.model.model.layers.{i}."


def _to_hf(array: np.ndarray, kind: str, rank: int) -> np.ndarray:
  # Ours: A [*in, r], B [r, *out]; PEFT (torch Linear weights): A [r, in], B [out, r].
  return np.ascontiguousarray(array.reshape(-1, rank).T if kind == "A" else array.reshape(rank, -1).T)


def _wqkv_b_to_hf(config: ModelConfig, bq: np.ndarray, bk: np.ndarray, bv: np.ndarray) -> np.ndarray:
  # wqkv rows interleave per KV group: [q_0 .. q_{g-1}, k, v] x kv_heads (convert.layouts).
  r, k, hd = config.lora_rank, config.num_kv_heads, config.head_dim
  g = config.num_heads // k
  grouped = np.concatenate([bq.reshape(r, k, g, hd), bk.reshape(r, k, 1, hd), bv.reshape(r, k, 1, hd)], axis=2)
  return np.ascontiguousarray(grouped.reshape(r, -1).T)


def _wqkv_b_from_hf(config: ModelConfig, b: np.ndarray) -> tuple[np.ndarray, ...]:
  r, k, hd = config.lora_rank, config.num_kv_heads, config.head_dim
  g = config.num_heads // k
  grouped = b.T.reshape(r, k, g + 2, hd)
  return grouped[:, :, :g].reshape(r, k * g, hd), grouped[:, :, g], grouped[:, :, g + 1]


def _host(value: jax.Array) -> np.ndarray:
  if not value.is_fully_addressable:
    value = jax.experimental.multihost_utils.process_allgather(value, tiled=True)
  return np.asarray(jax.device_get(value), np.float32)


def peft_tensors(model: nnx.Module) -> dict[str, np.ndarray]:
  """The adapters under PEFT's names for the family (`...layers.{i}.self_attn.q_proj.lora_A.weight`)."""
  config: ModelConfig = model.config
  flat = {k: _host(v) for k, v in _flat(model).items() if k[-1] in ("lora_a", "lora_b", "shared_qkv_a")}
  r = config.lora_rank
  tensors = {}
  for layer in range(config.num_layers):
    for module in modules(config.arch):
      if module.ours[0] not in config.lora_targets:
        continue
      name = _PREFIX.format(i=layer) + module.hf
      bs = [_layer_view(config, flat, layer, (*p.split("."), "lora_b")) for p in module.ours]
      tensors[f"{name}.lora_A.weight"] = _to_hf(_down(config, flat, layer, module.ours[0]), "A", r)
      tensors[f"{name}.lora_B.weight"] = _wqkv_b_to_hf(config, *bs) if len(bs) == 3 else _to_hf(bs[0], "B", r)
  return tensors


def save_peft(model: nnx.Module, path: str, base_model: str = "") -> None:
  """Writes `model`'s adapters as a PEFT LoRA directory (process 0 writes; all gather)."""
  from safetensors.numpy import save_file

  config: ModelConfig = model.config
  if not config.lora_rank:
    raise ValueError("this model has no LoRA adapters (config.lora.rank=0); export it with train.export_hf.")
  tensors = peft_tensors(model)
  if jax.process_index() != 0:
    return
  os.makedirs(path, exist_ok=True)
  adapter_config = {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "base_model_name_or_path": base_model,
    "r": config.lora_rank,
    "lora_alpha": config.lora_alpha,
    "lora_dropout": config.lora_dropout,
    "use_rslora": config.lora_rslora,
    "target_modules": hf_target_names(config),
    "bias": "none",
    "fan_in_fan_out": False,
    "inference_mode": True,
    "init_lora_weights": True,
    "modules_to_save": None,
  }
  temporary = os.path.join(path, ADAPTER_WEIGHTS + ".tmp")
  save_file(tensors, temporary, metadata={"format": "pt"})
  os.replace(temporary, os.path.join(path, ADAPTER_WEIGHTS))
  files.write_json_atomic(os.path.join(path, ADAPTER_CONFIG), adapter_config)


def is_peft_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def read_peft_config(path: str, arch: str) -> dict[str, Any]:
  """The `ModelConfig` LoRA fields of a PEFT adapter directory.

  Raises:
    ValueError naming the file and the setting csft_jax cannot represent.
  """
  config_path = os.path.join(path, ADAPTER_CONFIG)
  try:
    with open(config_path) as f:
      adapter = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{config_path}: cannot read the adapter config ({e}).") from e
  if adapter.get("peft_type", "LORA") != "LORA":
    raise ValueError(f"{config_path}: peft_type={adapter.get('peft_type')!r}; only LORA adapters load.")
  unsupported = {
    k: adapter[k] for k in ("rank_pattern", "alpha_pattern", "layers_to_transform", "modules_to_save") if adapter.get(k)
  }
  if adapter.get("bias", "none") != "none":
    unsupported["bias"] = adapter["bias"]
  if adapter.get("use_dora"):
    unsupported["use_dora"] = True
  if unsupported:
    raise ValueError(
      f"{config_path}: {unsupported} is not supported (one rank and alpha for every module of "
      "every layer, no trained biases or extra modules)."
    )
  targets = adapter.get("target_modules") or []
  if isinstance(targets, str):
    targets = [m.short for m in modules(arch) if re.fullmatch(targets, m.short)]
  targets = sorted({t.rsplit(".", 1)[-1] for t in targets})
  try:
    ours = resolve_targets(arch, targets)
  except ValueError as e:
    raise ValueError(f"{config_path}: target_modules: {e}") from None
  return dict(
    lora_rank=int(adapter["r"]),
    lora_alpha=float(adapter["lora_alpha"]),
    lora_dropout=float(adapter.get("lora_dropout", 0.0)),
    lora_rslora=bool(adapter.get("use_rslora")),
    lora_targets=ours,
  )


def load_peft(path: str, config: ModelConfig) -> dict[tuple[str, ...], np.ndarray]:
  """The adapters of a PEFT directory as `{our flat state path: array}` for a model of `config`.

  Raises:
    ValueError naming the file and the tensors that are missing or have another shape.
  """
  from safetensors.numpy import load_file

  weights = os.path.join(path, ADAPTER_WEIGHTS)
  if not os.path.isfile(weights):
    raise ValueError(f"{path}: no {ADAPTER_WEIGHTS} (a PEFT adapter directory holds it beside {ADAPTER_CONFIG}).")
  tensors = {
    k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v
    for k, v in load_file(weights).items()
  }
  r = config.lora_rank
  per_layer: dict[tuple[str, ...], list[np.ndarray]] = {}
  missing = []
  for layer in range(config.num_layers):
    for module in modules(config.arch):
      if module.ours[0] not in config.lora_targets:
        continue
      name = _PREFIX.format(i=layer) + module.hf
      if f"{name}.lora_A.weight" not in tensors or f"{name}.lora_B.weight" not in tensors:
        missing.append(name)
        continue
      a, b = tensors.pop(f"{name}.lora_A.weight"), tensors.pop(f"{name}.lora_B.weight")
      if a.shape[0] != r or b.shape[1] != r:
        raise ValueError(f"{weights}: {name} has rank {a.shape[0]}, adapter_config.json says r={r}.")
      first = module.ours[0].split(".")
      if len(module.ours) == 3:
        arrays = {("attn", "shared_qkv_a"): a.T}
        arrays.update({(*p.split("."), "lora_b"): x for p, x in zip(module.ours, _wqkv_b_from_hf(config, b))})
      else:
        arrays = {(*first, "lora_a"): a.T, (*first, "lora_b"): b.T}
      for key, value in arrays.items():
        per_layer.setdefault(key, []).append(value)
  if missing:
    raise ValueError(f"{weights}: no adapter for {len(missing)} targeted module(s), e.g. {missing[:4]}.")
  if tensors:
    raise ValueError(f"{weights}: {len(tensors)} tensor(s) this model has no place for, e.g. {sorted(tensors)[:4]}.")
  out = {}
  for key, arrays in per_layer.items():
    if config.scan_layers:
      out[("layers", *key)] = np.stack(arrays)
    else:
      out.update({("layers", str(i), *key): x for i, x in enumerate(arrays)})
  return out


def fill(abstract: nnx.State, arrays: dict[tuple[str, ...], np.ndarray], source: str) -> nnx.State:
  """`abstract` (the adapters' state, with shardings) filled from `arrays`, reshaped to our shapes.

  Raises:
    ValueError naming the parameter whose size differs.
  """
  state = jax.tree.map(lambda x: x, abstract)
  for path, variable in nnx.to_flat_state(state):
    key = tuple(str(k) for k in path)
    value = arrays[key]
    if value.size != int(np.prod(variable.shape)):
      raise ValueError(
        f"{source}: adapter {'/'.join(key)} has {value.size} values, this model's has shape {tuple(variable.shape)}."
      )
    value = np.asarray(value.reshape(variable.shape), variable.dtype)
    sharding = getattr(variable.get_value(), "sharding", None)
    variable.set_value(jax.device_put(value, sharding) if sharding is not None else jnp.asarray(value))
  return state
