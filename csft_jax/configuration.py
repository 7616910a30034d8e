"""Config files: the one way to load them, and the one rule for the paths they name.

A config file is Python with `get_config(arg=None) -> ConfigDict` (big_vision style); `file:arg`
passes `arg`. Every entry point loads configs through `load` (or the `--config` flag of
`define_config_flag`, which takes the same files plus `--config.FIELD=VALUE` overrides), and the
result goes through `resolve_paths` once:

  * `pkg://csft_jax/assets/...` names a file shipped inside the installed package (found with
    importlib.resources, so it works from a wheel as from a checkout);
  * `~` is expanded;
  * any other relative path is relative to the current directory: run commands from the
    directory your config's relative paths assume (the README runs everything from the
    repository root).

Resolved paths are absolute, so a run's stored config (W/config.json) names the same files from
any directory. The fields that hold paths are those the components declare (`declare_path_fields`).
"""

from __future__ import annotations

import fnmatch
import importlib.resources
import importlib.util
import os
import sys

import ml_collections
from ml_collections import config_flags

PACKAGE_PREFIX = "pkg://"

# Dotted config fields that hold paths ('*' matches one level, e.g. a source name), declared by the
# component whose default config has them (`declare_path_fields`, beside that default config).
_PATH_FIELDS: list[str] = []


def declare_path_fields(*patterns: str) -> None:
  """Makes `resolve_paths` resolve the config fields `patterns` (dotted, '*' for one level)."""
  _PATH_FIELDS.extend(p for p in patterns if p not in _PATH_FIELDS)


def path_fields() -> tuple[str, ...]:
  """The declared path fields."""
  return tuple(_PATH_FIELDS)


class ConfigError(ValueError):
  """A config file or field that cannot be used as given."""


def resolve_path(path: str) -> str:
  """`path` made absolute by the rule of this module's docstring ('' stays '')."""
  if not path:
    return path
  if path.startswith(PACKAGE_PREFIX):
    package, _, inner = path[len(PACKAGE_PREFIX) :].partition("/")
    try:
      root = importlib.resources.files(package)
    except ModuleNotFoundError:
      raise ConfigError(f"{path}: no installed package {package!r}.") from None
    return os.fspath(root.joinpath(inner))
  return os.path.abspath(os.path.expanduser(path))


def _path_fields(config: ml_collections.ConfigDict, prefix: str = ""):
  for key in list(config.keys()):
    dotted = f"{prefix}{key}"
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict):
      yield from _path_fields(value, dotted + ".")
    elif isinstance(value, str) and any(fnmatch.fnmatchcase(dotted, p) for p in _PATH_FIELDS):
      yield config, key


def resolve_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` with every declared path field resolved (idempotent)."""
  config = config.copy_and_resolve_references()
  for node, key in _path_fields(config):
    node[key] = resolve_path(node[key])
  return config


def _make_configs_importable() -> None:
  """Config files import shared pieces as `configs.X`: the current directory must be importable
  (it is with `python -m`, not with `python tools/X.py`)."""
  if os.getcwd() not in sys.path:
    sys.path.insert(0, os.getcwd())


def load_module(path: str):
  """The config file `path` as a module (for what it defines beside `get_config`, e.g. presets)."""
  if not os.path.isfile(path):
    raise ConfigError(
      f"config file {path} does not exist (relative paths are relative to the current directory, {os.getcwd()})."
    )
  name = "_csft_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  _make_configs_importable()
  spec.loader.exec_module(module)
  if not callable(getattr(module, "get_config", None)):
    raise ConfigError(f"{path}: defines no get_config(arg=None).")
  return module


def load(spec: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
  """Loads `file.py[:arg]`, applies `{dotted.field: value}` overrides, resolves paths."""
  path, _, arg = spec.partition(":")
  module = load_module(path)
  config = module.get_config(arg) if arg else module.get_config()
  for key, value in (overrides or {}).items():
    set_field(config, key, value)
  return resolve_paths(config)


def set_field(config: ml_collections.ConfigDict, dotted: str, value) -> None:
  """`config.a.b = value`, with an error naming the missing field."""
  *parents, leaf = dotted.split(".")
  node = config
  for part in parents:
    if part not in node:
      raise ConfigError(f"config has no field {dotted!r} (no {part!r}).")
    node = node[part]
  if leaf not in node:
    raise ConfigError(f"config has no field {dotted!r}; fields there: {sorted(node.keys())}.")
  node[leaf] = value


def define_config_flag(help_text: str) -> None:
  """`--config=file.py[:arg]` with `--config.FIELD=VALUE` overrides (read it with `from_flags`)."""
  _make_configs_importable()
  config_flags.DEFINE_config_file("config", None, help_text, lock_config=True)


def from_flags() -> ml_collections.ConfigDict:
  """The `--config` flag's config, overrides applied, paths resolved."""
  from absl import flags

  config = flags.FLAGS.config
  if config is None:
    raise ConfigError("--config is required (a config file, e.g. configs/demo.py).")
  return resolve_paths(config)


def training_data_config(
  config: ml_collections.ConfigDict, own_tokenizer: str | None = None
) -> ml_collections.ConfigDict:
  """`config.data` with the tokenizer a training run of `config` uses, by one rule for every command
  (train, prepare, inspect, the data benchmarks): `own_tokenizer` (a run's copy) when it exists, else
  `data.tokenizer`, else the tokenizer of `init.from_hf` (the model's own, as the recipes do).

  Raises:
    ConfigError when none of them is set.
  """
  data = config.data.copy_and_resolve_references()
  if own_tokenizer and os.path.isdir(own_tokenizer):
    data.tokenizer = own_tokenizer
  elif not data.tokenizer:
    from_hf = config.get("init", {}).get("from_hf", "")
    if not from_hf:
      raise ConfigError(
        "config.data.tokenizer is empty and there is no config.init.from_hf to take one from; "
        "name a tokenizer directory (--config.data.tokenizer=DIR)."
      )
    data.tokenizer = from_hf
  return data
