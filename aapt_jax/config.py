"""Loading configs: `load_config("configs/atari.py:full", {"model.dim": 72})`,
or by name, `load_config("atari:full")`: the configs shipped with the package
(the top-level `configs` package: a checkout's `configs/` folder, installed
beside `aapt_jax` by the wheel)."""
from __future__ import annotations

import importlib.util
import os
import pkgutil
import re
import sys
from typing import Any
from collections.abc import Mapping

import ml_collections


def _import_config_module(file_path: str):
  file_path = os.path.abspath(file_path)
  if not os.path.isfile(file_path):
    raise FileNotFoundError(f"config file not found: {file_path}")
  # Variants import their base as `from configs import base`: the directory
  # holding `configs/` must be importable.
  root = os.path.dirname(os.path.dirname(file_path))
  if root not in sys.path:
    sys.path.insert(0, root)
  name = "_aapt_config_" + os.path.splitext(os.path.basename(file_path))[0]
  spec = importlib.util.spec_from_file_location(name, file_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"config file {file_path} defines no get_config(arg)")
  return module


def _configs_dir() -> str:
  """The folder of the shipped `configs` package."""
  spec = importlib.util.find_spec("configs")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("the shipped configs (the `configs` package) are not importable: "
                            "install the package (pip install .) or pass a config file path")
  return list(spec.submodule_search_locations)[0]


def config_names() -> list[str]:
  """Names of the shipped configs, each loadable as `load_config(name)`."""
  return sorted(m.name for m in pkgutil.iter_modules([_configs_dir()]))


def _config_file(name: str) -> str:
  """The file of the shipped config `name`; ValueError listing the names."""
  names = config_names()
  if name not in names:
    raise ValueError(f"unknown config name {name!r}: the shipped configs are "
                     f"{', '.join(names)} (or pass a path to a config file)")
  return os.path.join(_configs_dir(), name + ".py")


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Mapping[str, Any] | None) -> ml_collections.ConfigDict:
  """Sets dotted keys (`{"model.dim": 72}`); an unknown key raises ValueError."""
  for key, value in (overrides or {}).items():
    *parents, leaf = key.split(".")
    node = config
    for i, part in enumerate(parents):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        raise ValueError(
            f"unknown config field {'.'.join(parents[:i + 1])!r} "
            f"(in override {key!r})")
      node = node[part]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      raise ValueError(f"unknown config field {key!r}; known fields here: "
                       f"{sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []}")
    current = node[leaf]
    if isinstance(current, tuple) and isinstance(value, list):
      value = tuple(value)
    try:
      node[leaf] = value
    except TypeError as e:
      raise ValueError(f"config field {key!r} expects {type(current).__name__}, "
                       f"got {value!r}") from e
  return config


def load_config(path: str, overrides: Mapping[str, Any] | None = None
                ) -> ml_collections.ConfigDict:
  """Loads `file.py` or `file.py:arg` via its `get_config(arg)`, then overrides.

  A bare name (`"atari"`, `"atari:full"`) that is not a file names a shipped
  config (`config_names()`; an unknown one raises ValueError listing them).
  """
  file_path, arg = path, None
  if ":" in path and not os.path.isfile(path):
    file_path, arg = path.rsplit(":", 1)
  if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", file_path) and not os.path.isfile(file_path):
    file_path = _config_file(file_path)
  module = _import_config_module(file_path)
  config = module.get_config(arg)
  return apply_overrides(config, overrides)
