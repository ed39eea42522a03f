"""The one room where trained weights are loaded from: training checkpoints,
inference exports (`aapt_jax.export`, the format) and the exports shipped
with the package, for the generator and the video VAE.

    config, params = load_generator_params("runs/atari")        # EMA params
    config, vae, params = load_trained_vae("runs/atari_vae")    # stage "vae"
    config, params, vae_params, start_frame, source = load_world_model(None)

A checkpoint source is a run directory (its last stage's latest complete
step), a stage directory, a step directory, an export directory, or the name
of an export shipped inside the package (`shipped_exports()`: "atari", the
Pong world model; "atari_vae", its VAE; "doom", the camera-steered ViZDoom
world) when no directory of that name exists. Training
(`init_from`), data (`encode_records`), inference (sessions, `generate`) and
the launch scripts all load through here, so none of them imports another's
package to read weights.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from aapt_jax import export as export_lib
from aapt_jax.checkpointing import (STATE, config_diff, config_to_dict, named_leaves,
                                    read_config)

STAGE_ORDER = ("vae", "diffusion", "consistency", "adversarial")
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
DEFAULT_EXPORT = "atari"  # what StreamingSession.load(None) streams


# ----------------------------------------------------------------------------
# The exports shipped inside the package (package data under aapt_jax/assets/).

def shipped_exports() -> list[str]:
  """Names of the exports shipped with the package."""
  if not os.path.isdir(SHIPPED_DIR):
    return []
  return sorted(n for n in os.listdir(SHIPPED_DIR)
                if export_lib.is_export(os.path.join(SHIPPED_DIR, n)))


def shipped_export(name: str = DEFAULT_EXPORT) -> str:
  """The directory of the shipped export `name`; ValueError listing the names."""
  names = shipped_exports()
  if name not in names:
    raise ValueError(f"no shipped export named {name!r}: the shipped exports are "
                     f"{', '.join(names) or '(none)'}; or pass a run, stage, step or export "
                     "directory")
  return os.path.join(SHIPPED_DIR, name)


def _source_path(source: str) -> str:
  """`source` as an absolute path; a bare name that is no directory here is a
  shipped export's name."""
  path = os.path.abspath(os.path.expanduser(source))
  if not os.path.exists(path) and os.sep not in source and "/" not in source:
    return shipped_export(source)
  return path


# ----------------------------------------------------------------------------
# Training checkpoints.

def resolve_step_dir(path: str) -> str:
  """A step directory from a run, stage, checkpoints or step directory: the
  last stage's latest complete step. FileNotFoundError says what was looked for."""
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint not found: {path} is not a directory")
  if os.path.isdir(os.path.join(path, STATE)):
    return path
  for stage in reversed(STAGE_ORDER):  # a run directory: its last stage
    if os.path.isdir(os.path.join(path, stage, "checkpoints")):
      return resolve_step_dir(os.path.join(path, stage))
  if os.path.isdir(os.path.join(path, "checkpoints")):  # a stage directory
    path = os.path.join(path, "checkpoints")
  steps = sorted(int(s) for s in os.listdir(path)
                 if s.isdigit() and os.path.isdir(os.path.join(path, s, STATE)))
  if not steps:
    raise FileNotFoundError(
        f"no complete checkpoint under {path}: expected a run directory (with "
        f"{'/'.join(STAGE_ORDER)} stages), a stage directory, or a step directory holding "
        f"'{STATE}/'")
  return os.path.join(path, str(steps[-1]))


def generator_location(path: str) -> str:
  """The directory `load_generator_params(path)` reads: an export directory
  (or a shipped export's), else the checkpoint's step directory."""
  source = _source_path(path)
  return source if export_lib.is_export(source) else resolve_step_dir(source)


def load_generator_params(path: str, which: str = "ema_params"):
  """(config, params) of the generator in a checkpoint: the config it was saved
  with (a ConfigDict) and its bare `which` tree ("ema_params" — what inference
  uses — or "gen_params") on the first local device.

  `path` may also be an export directory or a shipped export's name: an export
  holds only the EMA params (stored in bfloat16, returned as float32 numpy)."""
  location = generator_location(path)
  if export_lib.is_export(location):
    if which != "ema_params":
      raise ValueError(f"export {location} holds only the EMA generator params, not {which!r}")
    config, params, _, _, _ = export_lib.read_export(location)
    return config, params
  step_dir = location
  config = read_config(step_dir)
  checkpointer = ocp.PyTreeCheckpointer()
  try:
    meta = checkpointer.metadata(os.path.join(step_dir, STATE)).item_metadata
  except Exception as e:  # noqa: BLE001 - orbax raises several kinds for a corrupt dir
    raise ValueError(f"checkpoint {step_dir} is unreadable: {e}") from None
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  tree = meta.tree if hasattr(meta, "tree") else meta
  if which not in tree or tree[which] is None:
    raise ValueError(f"checkpoint {step_dir} holds no {which!r}")
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device),
                        dict(tree[which]))
  restored = checkpointer.restore(
      os.path.join(step_dir, STATE),
      args=ocp.args.PyTreeRestore(item={which: target}, restore_args=ocp.checkpoint_utils
                                  .construct_restore_args({which: target}),
                                  partial_restore=True))
  return config, restored[which]


# ----------------------------------------------------------------------------
# Fitting loaded params to a model of another shape (init_from, weight import).

@dataclasses.dataclass
class LeafFit:
  """How the leaves of a params tree fit a target tree (`fit_leaves`); keys
  are "a/b/c" paths."""
  values: dict[str, np.ndarray]   # target leaves found: as is, or zero-padded
  padded: list[str]               # "path (old)->(new)", subset of values
  missing: list[str]              # target leaves the params lack
  extra: list[str]                # params leaves the target lacks
  bad: list[tuple[str, tuple, tuple]]  # misfits: (path, checkpoint shape, target shape)


def fit_leaves(params, target, can_pad=lambda name, axis: True) -> LeafFit:
  """Matches `params`' leaves to `target`'s (arrays or ShapeDtypeStructs) by
  path: equal shapes are taken as is (cast to the target dtype); a leaf
  smaller on exactly one axis is zero-padded there when `can_pad(name, axis)`
  (new input columns: zeros leave the output unchanged); the rest is sorted
  into missing, extra and bad for the caller's policy."""
  have = named_leaves(params)
  fit = LeafFit({}, [], [], [], [])
  for name, t in named_leaves(target).items():
    shape = tuple(t.shape)
    if name not in have:
      fit.missing.append(name)
      continue
    v = np.asarray(have.pop(name))
    diff = [i for i, (a, b) in enumerate(zip(v.shape, shape)) if a != b]
    if v.shape == shape:
      fit.values[name] = v.astype(t.dtype)
    elif (v.ndim == len(shape) and len(diff) == 1 and v.shape[diff[0]] < shape[diff[0]]
          and can_pad(name, diff[0])):
      widths = [(0, 0)] * v.ndim
      widths[diff[0]] = (0, shape[diff[0]] - v.shape[diff[0]])
      fit.values[name] = np.pad(v, widths).astype(t.dtype)
      fit.padded.append(f"{name} {v.shape}->{shape}")
    else:
      fit.bad.append((name, v.shape, shape))
  fit.extra = sorted(have)
  return fit


def adapt_params(params, target) -> tuple[Any, list[str]]:
  """`params` (a bare tree, e.g. a previous stage's or a converted checkpoint's)
  fitted to `target` (a tree of arrays or ShapeDtypeStructs: this config's
  params), for `init_from`. Returns (params as numpy, notes).

  `fit_leaves` with padding on any axis; a leaf `params` lacks keeps
  `target`'s value (its fresh init; zeros for a ShapeDtypeStruct) -- zeros
  there could leave a new two-layer branch with no gradient (convert/adapt.py
  zero-inits only the output layers of Wan's missing AAPT branches). Misfits,
  and leaves `params` has but `target` lacks, raise a ValueError naming them.
  """
  fit = fit_leaves(params, target)
  if fit.bad or fit.extra:
    raise ValueError(
        "the checkpoint's params do not fit this config's model (different model.* "
        "fields?): " + "; ".join([f"{n}: checkpoint {a} vs model {b}" for n, a, b in fit.bad]
                                 + [f"{k}: not in the model" for k in fit.extra]))
  out = [fit.values[name] if name in fit.values else
         np.zeros(t.shape, t.dtype) if isinstance(t, jax.ShapeDtypeStruct)
         else np.asarray(jax.device_get(t)) for name, t in named_leaves(target).items()]
  notes = []
  if fit.padded:
    notes.append(f"zero-padded {len(fit.padded)}: " + ", ".join(fit.padded))
  if fit.missing:
    notes.append(f"freshly initialised (not in the checkpoint) {len(fit.missing)}: "
                 + ", ".join(fit.missing))
  return jax.tree.unflatten(jax.tree.structure(target), out), notes


# ----------------------------------------------------------------------------
# The video VAE.

def is_wan_vae_folder(path: str) -> bool:
  """Whether `path` is a diffusers Wan2.1 VAE folder (config.json of an
  AutoencoderKLWan, next to its safetensors)."""
  try:
    with open(os.path.join(path, "config.json")) as f:
      return json.load(f).get("_class_name") == "AutoencoderKLWan"
  except (OSError, ValueError, AttributeError):
    return False


def load_trained_vae(path: str, frame_size: tuple[int, int] | None = None):
  """(config, VAE module, float32 params) of a VAE: a stage-"vae" checkpoint
  of this package (a run, stage or step directory; its EMA params), a VAE
  export (launch/export.py of such a run), a shipped export's name
  ("atari_vae"), or a diffusers Wan2.1 VAE folder (e.g. the ``vae/`` of
  Wan2.1-T2V-1.3B-Diffusers, read by convert.wan_vae.load_vae). A Wan folder
  stores no frame size: `frame_size` (h, w), multiples of its spatial factor,
  sets the one its config describes (default Wan's 480x832); a checkpoint of
  ours keeps its own. ValueError when `path` holds another stage."""
  from aapt_jax.models import build_vae
  path = _source_path(path)
  if is_wan_vae_folder(path):
    from aapt_jax.convert.wan_vae import load_vae
    from aapt_jax.models.vae import VAESpec
    config, params = load_vae(path)
    if frame_size is not None:
      s = VAESpec.from_config(config).spatial_factor
      if frame_size[0] % s or frame_size[1] % s:
        raise ValueError(f"the Wan VAE of {path} encodes frames of multiples of {s} pixels, "
                         f"got {tuple(frame_size)}")
      with config.unlocked():
        config.model.latent_size = (frame_size[0] // s, frame_size[1] // s)
    return config, build_vae(config), params
  if export_lib.is_export(path):
    config, params = export_lib.read_vae_export(path)
    return config, build_vae(config), params
  stage_dir = os.path.join(path, "vae")  # a run directory that also holds DiT stages
  config, params = load_generator_params(stage_dir if os.path.isdir(stage_dir) else path)
  if config.get("stage") != "vae":
    raise ValueError(f"{path} is not a VAE checkpoint (its stage is {config.get('stage')!r}; "
                     "train one with --config.stage=vae, e.g. configs/atari_vae.py)")
  return config, build_vae(config), params


def load_run_vae(config, where: str):
  """The VAE params a VAE-latent run (`config`, loaded from `where`) decodes
  with: `vae.checkpoint`'s, checked to be the VAE the run's config describes."""
  path = config.vae.get("checkpoint", "")
  if not path:
    raise ValueError(f"checkpoint {where} works in VAE latents but its config names no "
                     "vae.checkpoint (the stage-'vae' run whose encoder made its latents)")
  from aapt_jax.models.vae import VAESpec
  vae_config, _, vae_params = load_trained_vae(path, VAESpec.from_config(config).frame_size)
  fields = ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "temperal_downsample")
  pick = lambda c: {"vae": {k: config_to_dict(c)["vae"][k] for k in fields},
                    "model": {"latent_size": config_to_dict(c)["model"]["latent_size"]}}
  diff = config_diff(pick(vae_config), pick(config), sections=("vae", "model"))
  if diff:
    raise ValueError(f"vae.checkpoint={path} is another VAE than the one {where} was "
                     f"trained with: {'; '.join(diff)}")
  return vae_params


# ----------------------------------------------------------------------------
# A world model to stream (sessions, generate, play, export).

def load_world_model(checkpoint: str | None):
  """(config, generator params, VAE params or None, start frame or None, source)
  of the world model in `checkpoint`: an export directory, a run, stage or step
  directory (its EMA params; the VAE from its `vae.checkpoint`), a shipped
  export's name, or None (the shipped export "atari"). `source` is the
  directory the params came from."""
  if checkpoint is None:
    if DEFAULT_EXPORT not in shipped_exports():
      raise FileNotFoundError(
          f"no checkpoint given and no shipped export at {SHIPPED_DIR}/{DEFAULT_EXPORT}: pass "
          "a run, step or export directory (train one with launch/train.py, export it with "
          "launch/export.py)")
    checkpoint = DEFAULT_EXPORT
  location = generator_location(checkpoint)
  if export_lib.is_export(location):
    config, params, vae_params, start_frame, _ = export_lib.read_export(location)
    return config, params, vae_params, start_frame, location
  step_dir = location
  config, params = load_generator_params(step_dir)
  if config.get("stage") == "vae":
    raise ValueError(f"checkpoint {step_dir} is a VAE (stage 'vae'), not a world model: "
                     "train a generator on its latents (its vae.checkpoint) and play that")
  uses_vae = not int(config.data.space_to_depth)  # VAE latents, not pixels
  vae_params = load_run_vae(config, step_dir) if uses_vae else None
  return config, params, vae_params, None, step_dir
