"""Reads a checkpoint folder: `config.json` plus its safetensors, one file
(diffusers' `diffusion_pytorch_model.safetensors` or transformers'
`model.safetensors`) or sharded (`*.safetensors.index.json`), with the
safetensors numpy API (no torch).

Tensors are read lazily, one at a time, so converting a large model holds
one copy of it (the converted tree), not two.
"""
from __future__ import annotations

import glob
import json
import os

import numpy as np
from safetensors import safe_open

SINGLE_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")  # diffusers, transformers
INDEX_SUFFIX = ".safetensors.index.json"


def check_tensor_names(headline: str, missing, unknown, missing_note: str = "",
                       limit: int = 10) -> None:
  """Raises a ValueError starting with `headline` that names (at most `limit`
  of each, sorted) the `missing` and `unknown` tensor names, when there are any."""
  def listed(names):
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
  missing, unknown = set(missing), set(unknown)
  if not (missing or unknown):
    return
  lines = [headline]
  if missing:
    lines.append(f"missing ({len(missing)}{missing_note}): {listed(missing)}")
  if unknown:
    lines.append(f"unknown ({len(unknown)}): {listed(unknown)}")
  raise ValueError("\n".join(lines))


class SafetensorsFolder:
  """The tensors of a checkpoint folder by name: `names`, `shape(name)`, `get(name)`."""

  def __init__(self, path: str):
    self.path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(self.path):
      raise FileNotFoundError(f"checkpoint folder not found: {self.path}")
    config_file = os.path.join(self.path, "config.json")
    if not os.path.isfile(config_file):
      raise FileNotFoundError(f"{self.path} has no config.json: pass the folder that holds the "
                              "model's config.json and safetensors (a pipeline's transformer/, vae/ "
                              "or text_encoder/)")
    try:
      with open(config_file) as f:
        self.config = json.load(f)
    except ValueError as e:
      raise ValueError(f"{config_file} is not valid JSON: {e}") from None
    self._file_of = self._index()  # tensor name -> file
    self._shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(set(self._file_of.values())):
      with safe_open(file, framework="np") as f:
        for name in f.keys():
          if self._file_of.get(name) == file:
            self._shapes[name] = tuple(f.get_slice(name).get_shape())
    absent = sorted(set(self._file_of) - set(self._shapes))
    if absent:
      raise ValueError(f"{self.path}: the index lists {len(absent)} tensors that are not in "
                       f"their shard files: {', '.join(absent[:8])}"
                       + (" ..." if len(absent) > 8 else ""))

  def _index(self) -> dict[str, str]:
    indexes = sorted(glob.glob(os.path.join(self.path, "*" + INDEX_SUFFIX)))
    if len(indexes) > 1:
      raise ValueError(f"{self.path} holds {len(indexes)} safetensors index files "
                       f"({', '.join(os.path.basename(i) for i in indexes)}); expected one")
    if indexes:
      with open(indexes[0]) as f:
        weight_map = json.load(f).get("weight_map")
      if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{indexes[0]} has no 'weight_map'")
      files = {name: os.path.join(self.path, shard) for name, shard in weight_map.items()}
      missing = sorted({f for f in files.values() if not os.path.isfile(f)})
      if missing:
        raise FileNotFoundError(f"shard files listed in {os.path.basename(indexes[0])} are "
                                f"missing: {', '.join(os.path.basename(m) for m in missing)}")
      return files
    singles = [os.path.join(self.path, f) for f in SINGLE_FILES
               if os.path.isfile(os.path.join(self.path, f))]
    if not singles:
      raise FileNotFoundError(f"{self.path} has neither {' nor '.join(SINGLE_FILES)} nor a "
                              f"sharded *{INDEX_SUFFIX}")
    single = singles[0]
    with safe_open(single, framework="np") as f:
      return {name: single for name in f.keys()}

  @property
  def names(self) -> list[str]:
    return sorted(self._shapes)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._shapes[name]

  def get(self, name: str) -> np.ndarray:
    """The tensor as float32 (bfloat16 / float16 checkpoints are upcast)."""
    with safe_open(self._file_of[name], framework="np") as f:
      return np.asarray(f.get_tensor(name), dtype=np.float32)
