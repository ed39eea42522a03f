"""Loading configs: `load_config("configs/atari.py:full", {"model.dim": 72})`."""
from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any, Mapping

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
  """Loads `file.py` or `file.py:arg` via its `get_config(arg)`, then overrides."""
  file_path, arg = path, None
  if ":" in path and not os.path.isfile(path):
    file_path, arg = path.rsplit(":", 1)
  module = _import_config_module(file_path)
  config = module.get_config(arg)
  return apply_overrides(config, overrides)
