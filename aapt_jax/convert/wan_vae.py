"""Public Wan2.1 VAE weights (diffusers `AutoencoderKLWan`) -> aapt_jax params.

    config, params = load_vae("Wan2.1-T2V-1.3B-Diffusers/vae")

`path` is the folder holding `config.json` and the safetensors (one
`diffusion_pytorch_model.safetensors` or shards with a
`*.safetensors.index.json`), read with the safetensors numpy API (no torch).
The diffusers layout only: the original Wan2.1 repository ships its VAE as a
torch pickle (`Wan2.1_VAE.pth`), which cannot be read without torch.

Our parameter names mirror diffusers' (`encoder.down_blocks.3.conv1.weight`
is `encoder/down_blocks_3/conv1/kernel`), so the import renames and moves
conv kernels from torch's [O, I, (T,) H, W] to [(T,) H, W, I, O].

`config` is configs/base.py with `vae.*` (and `model.latent_channels`) read
from config.json, float32 compute; `params` is the bare float32 tree of
`aapt_jax.models.abstract_params(config, "vae")`.
"""
from __future__ import annotations

import os
import re
from typing import Any

import numpy as np
from flax import traverse_util
from tqdm import tqdm

from aapt_jax.config import load_config
from aapt_jax.convert.safetensors_folder import SafetensorsFolder, check_tensor_names
from aapt_jax.models import abstract_params

BASE_CONFIG = "base"  # the shipped configs/base.py, by name (aapt_jax.load_config)
CLASS_NAME = "AutoencoderKLWan"
# The checkpoint stores no resolution: Wan2.1's 832x480 video -> 104x60 latents.
WAN_LATENT_SIZE = (60, 104)
# config.json field -> our vae.* field (the same meaning and spelling).
VAE_FIELDS = ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "attn_scales",
              "temperal_downsample", "dropout", "latents_mean", "latents_std")


def _unsupported(cfg: dict, where: str) -> None:
  """Rejects AutoencoderKLWan options our VAE does not implement (Wan2.2's, mostly)."""
  if cfg.get("is_residual"):
    raise ValueError(f"{where}: is_residual=true is the Wan2.2 VAE; only Wan2.1's "
                     "(is_residual=false) is supported")
  if cfg.get("patch_size") is not None:
    raise ValueError(f"{where}: patch_size={cfg['patch_size']} (a patchified VAE) is not "
                     "supported; Wan2.1's VAE has patch_size=null")
  decoder_dim = cfg.get("decoder_base_dim")
  if decoder_dim is not None and decoder_dim != cfg.get("base_dim", 96):
    raise ValueError(f"{where}: decoder_base_dim={decoder_dim} differs from base_dim; only "
                     "equal encoder/decoder widths (Wan2.1) are supported")
  for key in ("in_channels", "out_channels"):
    if cfg.get(key, 3) != 3:
      raise ValueError(f"{where}: {key}={cfg[key]}, but only RGB (3) is supported")


def vae_config(cfg: dict, where: str):
  """A full config (configs/base.py) for the AutoencoderKLWan described by `cfg`."""
  _unsupported(cfg, where)
  base = load_config(BASE_CONFIG)
  overrides = {f"vae.{k}": cfg[k] for k in VAE_FIELDS if k in cfg}
  for key in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
    if f"vae.{key}" in overrides:
      overrides[f"vae.{key}"] = tuple(overrides[f"vae.{key}"])
  z_dim = overrides.get("vae.z_dim", base.vae.z_dim)
  overrides.update({"vae.dtype": "float32", "model.latent_channels": z_dim,
                    "model.latent_size": WAN_LATENT_SIZE})
  config = load_config(BASE_CONFIG, overrides)
  v = config.vae
  factors = {"scale_factor_temporal": 2 ** sum(bool(t) for t in v.temperal_downsample),
             "scale_factor_spatial": 2 ** (len(v.dim_mult) - 1)}
  for key, derived in factors.items():
    if cfg.get(key) is not None and cfg[key] != derived:
      raise ValueError(f"{where}: {key}={cfg[key]} but the layers give {derived} "
                       f"(dim_mult={tuple(v.dim_mult)}, "
                       f"temperal_downsample={tuple(v.temperal_downsample)})")
  for key in ("latents_mean", "latents_std"):
    if len(v[key]) != z_dim:
      raise ValueError(f"{where}: {key} has {len(v[key])} values but z_dim={z_dim}")
  return config


def torch_name(path: tuple[str, ...]) -> str:
  """Our param path -> the diffusers tensor name ("down_blocks_3" -> "down_blocks.3")."""
  *modules, leaf = path
  modules = [re.sub(r"_(\d+)$", r".\1", m) for m in modules]
  return ".".join(modules + ["weight" if leaf == "kernel" else leaf])


def torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape diffusers stores for our param `path` of `shape`."""
  leaf = path[-1]
  if leaf == "kernel":  # [(T,) H, W, I, O] -> [O, I, (T,) H, W]
    return (shape[-1], shape[-2]) + tuple(shape[:-2])
  if leaf == "gamma":  # attention blocks' norm: [C, 1, 1]; the others: [C, 1, 1, 1]
    return tuple(shape) + ((1, 1) if path[-2] == "norm" else (1, 1, 1))
  return tuple(shape)


def from_torch(array: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == "kernel":  # [O, I, (T,) H, W] -> [(T,) H, W, I, O]
    return np.transpose(array, tuple(range(2, array.ndim)) + (1, 0))
  if leaf == "gamma":
    return array.reshape(-1)
  return array


def _check_family(folder: SafetensorsFolder, where: str) -> None:
  name = folder.config.get("_class_name")
  if name == CLASS_NAME:
    return
  if name is None and "encoder.conv_in.weight" in folder.names:
    return
  hint = (": pass the pipeline's vae/ folder (the transformer loads with load_transformer)"
          if (name and "Transformer" in name) or name == "WanModel" else "")
  raise ValueError(f"{where}: _class_name={name!r} is not a Wan2.1 VAE ({CLASS_NAME!r}){hint}")


def load_vae(path: str, progress: bool = False) -> tuple[Any, dict]:
  """(config, params) of the Wan2.1 VAE in `path` (see the module doc).

  Raises FileNotFoundError for a missing folder or file and ValueError for a
  checkpoint of another family, an unsupported option, missing or unknown
  tensors (listed), or a tensor whose shape does not match config.json
  (naming it and both shapes). With `progress`, a tqdm bar over the tensors.
  """
  folder = SafetensorsFolder(path)
  where = os.path.join(folder.path, "config.json")
  _check_family(folder, where)
  config = vae_config(folder.config, where)
  target = traverse_util.flatten_dict(abstract_params(config, "vae"))
  wanted = {torch_name(p): p for p in target}
  missing, unknown = set(wanted) - set(folder.names), set(folder.names) - set(wanted)
  check_tensor_names(f"{folder.path} does not hold the tensors its config.json describes",
                     missing, unknown)

  params = {}
  for name, path_ in tqdm(sorted(wanted.items()), desc="wan vae", unit="tensor",
                          disable=not progress):
    got, want = folder.shape(name), torch_shape(path_, tuple(target[path_].shape))
    if got != want:
      raise ValueError(f"tensor {name}: shape {got} in the checkpoint, but {where} implies {want}")
    params[path_] = np.ascontiguousarray(from_torch(folder.get(name), path_[-1]), dtype=np.float32)
  return config, traverse_util.unflatten_dict(params)
