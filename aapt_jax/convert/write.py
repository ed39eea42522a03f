"""Writes converted generator params as a checkpoint step directory.

    <out>/state/            Orbax PyTree checkpoint {"ema_params": p, "gen_params": p}
    <out>/config/metadata   the config (JSON)

the layout of a training step directory (`aapt_jax.checkpointing`), so
`loading.load_generator_params(out)`, `--config.init_from=out`,
`launch/generate.py --checkpoint=out` read it like a trained stage.
"""
from __future__ import annotations

import json
import os

import orbax.checkpoint as ocp

from aapt_jax.checkpointing import CONFIG, STATE, config_to_dict


def check_output_dir(out_dir: str) -> str:
  """The absolute `out_dir`; FileExistsError if it is a file or a non-empty directory."""
  out_dir = os.path.abspath(os.path.expanduser(out_dir))
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise FileExistsError(f"output path {out_dir} is a file, not a directory")
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    raise FileExistsError(f"output directory {out_dir} exists and is not empty: choose a new "
                          "--out (nothing was written)")
  return out_dir


def write_generator_checkpoint(out_dir: str, config, params) -> str:
  """Writes `params` (a bare float32 tree) and `config` to `out_dir` (new or
  empty); returns its absolute path."""
  out_dir = check_output_dir(out_dir)
  os.makedirs(os.path.join(out_dir, CONFIG), exist_ok=True)
  with ocp.PyTreeCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(out_dir, STATE), {"ema_params": params, "gen_params": params})
  with open(os.path.join(out_dir, CONFIG, "metadata"), "w") as f:
    json.dump(config_to_dict(config), f, indent=1)
  return out_dir
