"""The inference export format: what a user deploys and what ships with the
package (`aapt_jax.loading` finds and loads them).

An export directory holds::

    export.json        format version, source checkpoint, stage, parameter counts
    config.json        the full config the generator was trained with
    generator.msgpack  the EMA generator's bare params, bfloat16 (flax msgpack)
    vae.msgpack        the video VAE's params, bfloat16 (only for VAE-latent configs)
    start_frame.npy    uint8 [H, W, 3]: the stream's default first frame (optional)

A VAE export (`write_vae_export`, of a stage-"vae" run; stage "vae" in
export.json) holds only config.json and vae.msgpack, in float32: it is what
`vae.checkpoint` and `prepare_data --vae_checkpoint` name, and the
reconstructions it makes are not rounded to bf16.

No optimizer state, no discriminator. `read_export` checks every array against
the tree the config builds, so a corrupt export or one whose config.json does
not describe its params fails with the arrays that differ.
"""
from __future__ import annotations

import json
import os

import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from aapt_jax.checkpointing import config_to_dict
from aapt_jax.models import abstract_params

FORMAT = "aapt_jax.export/1"
EXPORT_FILE = "export.json"
CONFIG_FILE = "config.json"
GENERATOR_FILE = "generator.msgpack"
VAE_FILE = "vae.msgpack"
START_FRAME_FILE = "start_frame.npy"


def is_export(path: str) -> bool:
  return os.path.isfile(os.path.join(path, EXPORT_FILE))


def _leaves(tree) -> dict[str, tuple[tuple[int, ...], str]]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(p): tuple(x.shape) for p, x in flat}


def check_params(params, expected, what: str) -> None:
  """ValueError naming the arrays of `params` that `expected` (a tree of
  ShapeDtypeStructs) lacks, has, or shapes differently."""
  have, want = _leaves(params), _leaves(expected)
  problems = [f"{k}: missing" for k in want if k not in have]
  problems += [f"{k}: not in the model" for k in have if k not in want]
  problems += [f"{k}: {have[k]} vs model {want[k]}" for k in want
               if k in have and have[k] != want[k]]
  if problems:
    more = f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""
    raise ValueError(f"{what} does not match its config's model ({len(problems)} arrays "
                     f"differ: {'; '.join(problems[:4])}{more}): corrupt, or written for "
                     "another config")


def _to_bf16(tree):
  return jax.tree.map(lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16)), tree)


def _to32(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float32), tree)


def _write(out: str, config, trees: dict, meta: dict, start_frame=None) -> dict:
  """Writes config.json, each {file name: numpy tree} as msgpack, the start
  frame (if any) and export.json (`meta`) to `out`; returns meta with the
  directory's size in "bytes"."""
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, CONFIG_FILE), "w") as f:
    json.dump(config_to_dict(config), f, indent=1)
  for name, tree in trees.items():
    with open(os.path.join(out, name), "wb") as f:
      f.write(flax.serialization.msgpack_serialize(tree))
  if start_frame is not None:
    np.save(os.path.join(out, START_FRAME_FILE), start_frame)
  with open(os.path.join(out, EXPORT_FILE), "w") as f:
    json.dump(meta, f, indent=1)
  return dict(meta, bytes=sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out)))


def _count(tree) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def write_export(out: str, config, params, *, start_frame: np.ndarray | None = None,
                 vae_params=None, source: str = "") -> dict:
  """Writes an export of `params` (the bare generator tree) to the directory `out`.

  Returns export.json's contents."""
  check_params(params, abstract_params(config), "the generator params")
  if start_frame is not None:
    start_frame = np.asarray(start_frame)
    if start_frame.dtype != np.uint8 or start_frame.ndim != 3 or start_frame.shape[-1] != 3:
      raise ValueError(f"start frame must be uint8 [H, W, 3], got {start_frame.dtype} "
                       f"{start_frame.shape}")
  trees = {GENERATOR_FILE: _to_bf16(params)}
  if vae_params is not None:
    trees[VAE_FILE] = _to_bf16(vae_params)
  meta = dict(format=FORMAT, source=source, stage=str(config.stage), dtype="bfloat16",
              generator_params=_count(params), vae=vae_params is not None,
              start_frame=start_frame is not None)
  return _write(out, config, trees, meta, start_frame)


def write_vae_export(out: str, config, vae_params, *, source: str = "") -> dict:
  """Writes a VAE export (float32) of a stage-"vae" config's params to `out`;
  returns export.json's contents."""
  check_params(vae_params, abstract_params(config, "vae"), "the VAE params")
  meta = dict(format=FORMAT, source=source, stage="vae", dtype="float32",
              vae_params=_count(vae_params), vae=True)
  return _write(out, config, {VAE_FILE: _to32(vae_params)}, meta)


def _read_tree(path: str, what: str):
  try:
    with open(path, "rb") as f:
      return flax.serialization.msgpack_restore(f.read())
  except (OSError, ValueError, TypeError) as e:
    raise ValueError(f"export file {path} ({what}) is unreadable: {e}") from None


def _read_params(path: str, config, file: str, kind: str, what: str):
  """The float32 tree in `path`/`file`, checked against the `kind` ("generator"
  or "vae") the export's config builds; `what` names it in errors."""
  params = _to32(_read_tree(os.path.join(path, file), kind))
  try:
    expected = abstract_params(config, kind)
  except ValueError as e:
    raise ValueError(f"export {path}: its config.json is invalid: {e}") from None
  check_params(params, expected, what)
  return params


def _read_meta(path: str):
  try:
    with open(os.path.join(path, EXPORT_FILE)) as f:
      meta = json.load(f)
    with open(os.path.join(path, CONFIG_FILE)) as f:
      config = ml_collections.ConfigDict(json.load(f))
  except (OSError, ValueError) as e:
    raise ValueError(f"export {path} is unreadable: {e}") from None
  if meta.get("format") != FORMAT:
    raise ValueError(f"export {path} has format {meta.get('format')!r}; this version "
                     f"reads {FORMAT!r}")
  return config, meta


def export_stage(path: str) -> str:
  """The stage an export was made from ("vae" for a VAE export)."""
  return str(_read_meta(os.path.abspath(path))[1].get("stage"))


def read_vae_export(path: str):
  """(config, float32 VAE params) of the VAE export in `path`, checked against
  the VAE its config describes."""
  path = os.path.abspath(path)
  config, meta = _read_meta(path)
  if meta.get("stage") != "vae":
    raise ValueError(f"export {path} is a generator export (stage {meta.get('stage')!r}), "
                     "not a VAE export")
  return config, _read_params(path, config, VAE_FILE, "vae", f"VAE export {path}")


def read_export(path: str):
  """(config, generator params, vae params or None, start frame or None, meta)
  of the export in `path`; params are float32 numpy trees, checked against the
  config's model."""
  path = os.path.abspath(path)
  config, meta = _read_meta(path)
  if meta.get("stage") == "vae":
    raise ValueError(f"export {path} is a VAE export (no generator): name it as a run's "
                     "vae.checkpoint or prepare_data's --vae_checkpoint")
  params = _read_params(path, config, GENERATOR_FILE, "generator", f"export {path}")
  vae_params = None
  if meta.get("vae"):
    vae_params = _read_params(path, config, VAE_FILE, "vae", f"export {path} (VAE)")
  start_frame = None
  if meta.get("start_frame"):
    try:
      start_frame = np.load(os.path.join(path, START_FRAME_FILE))
    except (OSError, ValueError) as e:
      raise ValueError(f"export {path}: start frame unreadable: {e}") from None
  return config, params, vae_params, start_frame, meta
