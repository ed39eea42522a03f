"""Public Wan2.1 transformer weights -> aapt_jax params.

    config, params = load_transformer("Wan2.1-T2V-1.3B-Diffusers/transformer")
    config, params = load_vae("Wan2.1-T2V-1.3B-Diffusers/vae")   # convert/wan_vae.py

`path` is the folder holding `config.json` and the safetensors (one
`diffusion_pytorch_model.safetensors` or shards with a
`*.safetensors.index.json`). Two layouts are read:

* diffusers (`WanTransformer3DModel`, e.g. `Wan-AI/Wan2.1-T2V-1.3B-Diffusers`
  `transformer/`);
* the original Wan2.1 repository (`WanModel`, e.g. `Wan-AI/Wan2.1-T2V-1.3B`):
  its names are mapped to diffusers' as diffusers' own single-file converter
  does (`self_attn.q` -> `attn1.to_q`, `norm3` -> `norm2`, `head.head` ->
  `proj_out`, ...).

Text-to-video checkpoints only (no image embedder, `in == out` channels).
The config is built from `configs/base.py` with `model.*` read from the
checkpoint, in plain-Wan mode (bidirectional attention, no recycled frame)
with float32 compute; `params` is the bare float32 tree of
`aapt_jax.models.abstract_params(config)`.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
from tqdm import tqdm

from aapt_jax.config import load_config
from aapt_jax.convert.safetensors_folder import SafetensorsFolder, check_tensor_names
from aapt_jax.convert.wan_vae import load_vae  # noqa: F401  (the Wan VAE: convert.wan.load_vae)
from aapt_jax.models import abstract_params

BASE_CONFIG = "base"  # the shipped configs/base.py, by name (aapt_jax.load_config)
# The checkpoint stores no resolution: Wan2.1's 832x480 video -> 104x60 latents.
WAN_LATENT_SIZE = (60, 104)
DIFFUSERS, ORIGINAL = "WanTransformer3DModel", "WanModel"

# ---------------------------------------------------------------- names
# Our path (below the layer for block params) -> (diffusers name, layout).
# Layouts: "linear" torch [out, in] -> kernel [in, out]; "conv" Conv3d
# [D, C, pt, ph, pw] -> [pt, ph, pw, C, D]; "table" [1, n, D] -> [n, D];
# "vector" as is.


def _linear(ours: tuple[str, ...], theirs: str) -> dict:
  return {ours + ("kernel",): (theirs + ".weight", "linear"),
          ours + ("bias",): (theirs + ".bias", "vector")}


def _attention(ours: str) -> dict:
  out = {}
  for proj in ("to_q", "to_k", "to_v"):
    out.update(_linear((ours, proj), f"{ours}.{proj}"))
  out.update(_linear((ours, "to_out"), f"{ours}.to_out.0"))
  for norm in ("norm_q", "norm_k"):
    out[(ours, norm, "scale")] = (f"{ours}.{norm}.weight", "vector")
  return out


TOP_LEVEL = {
    ("patch_embedding", "kernel"): ("patch_embedding.weight", "conv"),
    ("patch_embedding", "bias"): ("patch_embedding.bias", "vector"),
    **_linear(("time_embedder", "linear_1"), "condition_embedder.time_embedder.linear_1"),
    **_linear(("time_embedder", "linear_2"), "condition_embedder.time_embedder.linear_2"),
    **_linear(("time_proj",), "condition_embedder.time_proj"),
    **_linear(("text_embedder", "linear_1"), "condition_embedder.text_embedder.linear_1"),
    **_linear(("text_embedder", "linear_2"), "condition_embedder.text_embedder.linear_2"),
    **_linear(("proj_out",), "proj_out"),
    ("scale_shift_table",): ("scale_shift_table", "table"),
}
PER_BLOCK = {  # diffusers names below `blocks.{i}.`
    **_attention("attn1"),
    **_attention("attn2"),
    ("norm2", "scale"): ("norm2.weight", "vector"),
    ("norm2", "bias"): ("norm2.bias", "vector"),
    **_linear(("ffn", "fc1"), "ffn.net.0.proj"),
    **_linear(("ffn", "fc2"), "ffn.net.2"),
    ("scale_shift_table",): ("scale_shift_table", "table"),
}

# original Wan2.1 name fragment -> diffusers', in order (diffusers'
# convert_wan_transformer_to_diffusers for the text-to-video model).
_ORIGINAL_TO_DIFFUSERS = (
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("cross_attn", "attn2"), ("self_attn", "attn1"),
    (".o.", ".to_out.0."), (".q.", ".to_q."), (".k.", ".to_k."), (".v.", ".to_v."),
    ("head.modulation", "scale_shift_table"), ("head.head", "proj_out"),
    ("modulation", "scale_shift_table"),
    ("ffn.0", "ffn.net.0.proj"), ("ffn.2", "ffn.net.2"),
    ("norm2", "norm__swap"), ("norm3", "norm2"), ("norm__swap", "norm3"),
)


def original_to_diffusers(name: str) -> str:
  """An original Wan2.1 tensor name in diffusers' naming."""
  for a, b in _ORIGINAL_TO_DIFFUSERS:
    name = name.replace(a, b)
  return name


def _to_source_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
  """Our leaf shape (one layer) -> the checkpoint tensor's shape."""
  if layout == "linear":
    return (shape[1], shape[0])
  if layout == "conv":
    pt, ph, pw, c, d = shape
    return (d, c, pt, ph, pw)
  if layout == "table":
    return (1,) + tuple(shape)
  return tuple(shape)


def _from_source(array: np.ndarray, layout: str) -> np.ndarray:
  if layout == "linear":
    return array.T
  if layout == "conv":
    return array.transpose(2, 3, 4, 1, 0)
  if layout == "table":
    return array[0]
  return array


def _leaf_sources(path: tuple[str, ...], num_layers: int):
  """(layer-or-None, names, layout) of one of our leaves: `names` is one
  diffusers name, or one per layer for a scanned (stacked) block param."""
  if path[0] == "transformer":
    block, rest = path[1], path[2:]
    if rest not in PER_BLOCK:
      raise KeyError(path)
    name, layout = PER_BLOCK[rest]
    if block == "blocks":  # nn.scan: stacked on a leading layer axis
      return True, [f"blocks.{i}.{name}" for i in range(num_layers)], layout
    return False, [f"blocks.{block.removeprefix('blocks_')}.{name}"], layout
  if path not in TOP_LEVEL:
    raise KeyError(path)
  name, layout = TOP_LEVEL[path]
  return False, [name], layout


# --------------------------------------------------------------- config


def _need(cfg: dict, key: str, where: str):
  if key not in cfg or cfg[key] is None:
    raise ValueError(f"{where}: field {key!r} is missing")
  return cfg[key]


def _model_fields(layout: str, cfg: dict, shapes: dict, where: str) -> dict:
  """config.model fields of the checkpoint (plain-Wan mode); `shapes` {name: shape}
  of its tensors (as named in the file)."""
  if layout == DIFFUSERS:
    for field in ("image_dim", "added_kv_proj_dim"):
      if cfg.get(field) is not None:
        raise ValueError(f"{where}: {field}={cfg[field]} is an image-to-video Wan model; only "
                         "text-to-video checkpoints are supported")
    heads = int(_need(cfg, "num_attention_heads", where))
    fields = dict(dim=heads * int(_need(cfg, "attention_head_dim", where)), num_heads=heads,
                  num_layers=_need(cfg, "num_layers", where),
                  ffn_dim=_need(cfg, "ffn_dim", where), freq_dim=_need(cfg, "freq_dim", where),
                  text_dim=_need(cfg, "text_dim", where),
                  latent_channels=_need(cfg, "in_channels", where),
                  out_channels=cfg.get("out_channels") or cfg["in_channels"],
                  patch_size=_need(cfg, "patch_size", where), eps=_need(cfg, "eps", where),
                  cross_attn_norm=_need(cfg, "cross_attn_norm", where),
                  qk_norm=True)  # diffusers' WanAttention always RMS-norms q and k
  else:
    model_type = cfg.get("model_type", "t2v")
    if model_type != "t2v":
      raise ValueError(f"{where}: model_type={model_type!r}; only text-to-video ('t2v') Wan2.1 "
                       "checkpoints are supported")
    # Fields the public config.json leaves to WanModel's defaults are read off the tensors.
    patch = shapes.get("patch_embedding.weight", (0, 0, 1, 2, 2))[2:]
    text = shapes.get("text_embedding.0.weight", (0, 4096))[1]
    fields = dict(dim=_need(cfg, "dim", where), num_heads=_need(cfg, "num_heads", where),
                  num_layers=_need(cfg, "num_layers", where),
                  ffn_dim=_need(cfg, "ffn_dim", where), freq_dim=_need(cfg, "freq_dim", where),
                  text_dim=cfg.get("text_dim", text),
                  latent_channels=_need(cfg, "in_dim", where),
                  out_channels=cfg.get("out_dim", cfg["in_dim"]),
                  patch_size=cfg.get("patch_size", patch), eps=cfg.get("eps", 1e-6),
                  cross_attn_norm=cfg.get("cross_attn_norm",
                                          "blocks.0.norm3.weight" in shapes),
                  qk_norm=cfg.get("qk_norm", True))
  if int(fields["out_channels"]) != int(fields["latent_channels"]):
    raise ValueError(f"{where}: {fields['latent_channels']} input but {fields['out_channels']} "
                     "output channels (an image-to-video model?); only text-to-video "
                     "checkpoints (in == out) are supported")
  del fields["out_channels"]
  fields["patch_size"] = tuple(int(p) for p in fields["patch_size"])
  for key in ("dim", "num_heads", "num_layers", "ffn_dim", "freq_dim", "text_dim",
              "latent_channels"):
    fields[key] = int(fields[key])
  fields["eps"] = float(fields["eps"])
  fields["cross_attn_norm"] = bool(fields["cross_attn_norm"])
  fields["qk_norm"] = bool(fields["qk_norm"])
  return fields


def transformer_config(cfg: dict, shapes: dict, where: str = "config.json"):
  """(the full plain-Wan config, layout) of a checkpoint: `cfg` its config.json,
  `shapes` {name: shape} of its tensors; ValueError for another family."""
  layout = _layout(cfg, where)
  return plain_wan_config(_model_fields(layout, cfg, shapes, where)), layout


def plain_wan_config(model_fields: dict):
  """A full config (configs/base.py) of a Wan checkpoint in plain-Wan mode, float32."""
  overrides = {f"model.{k}": v for k, v in model_fields.items()}
  overrides.update({"model.block_causal": False, "model.frame_recycling": False,
                    "model.num_actions": 0, "model.control_dim": 0,
                    "model.latent_size": WAN_LATENT_SIZE, "model.rope_theta": 10000.0,
                    "model.dtype": "float32", "model.param_dtype": "float32"})
  return load_config(BASE_CONFIG, overrides)


def _layout(cfg: dict, where: str) -> str:
  name = cfg.get("_class_name")
  if name in (DIFFUSERS, ORIGINAL):
    return name
  if name == "AutoencoderKLWan":
    raise ValueError(f"{where} describes a Wan VAE (AutoencoderKLWan), not the transformer: "
                     "pass the pipeline's transformer/ folder (the VAE loads with load_vae)")
  raise ValueError(f"{where}: _class_name={name!r} is not a Wan2.1 transformer; supported: "
                   f"{DIFFUSERS!r} (diffusers) and {ORIGINAL!r} (the original Wan2.1 repository)")


# ----------------------------------------------------------------- load


def _plan(config) -> dict:
  """Our leaf path -> (stacked, diffusers names, layout, one tensor's shape)."""
  plan = {}
  for path, leaf in _flatten(abstract_params(config)).items():
    stacked, names, layout = _leaf_sources(path, config.model.num_layers)
    one = leaf.shape[1:] if stacked else leaf.shape
    plan[path] = (stacked, names, layout, _to_source_shape(tuple(one), layout))
  return plan


def expected_tensors(config) -> dict[str, tuple[int, ...]]:
  """{diffusers tensor name: shape} of a Wan checkpoint of `config`'s model."""
  return {name: shape for _, names, _, shape in _plan(config).values() for name in names}


def load_transformer(path: str, progress: bool = False) -> tuple[Any, dict]:
  """(config, params) of the Wan2.1 transformer in `path` (see the module doc).

  Raises FileNotFoundError for a missing folder/file and ValueError for a
  checkpoint of another family, missing or unknown tensors (listed), or a
  tensor whose shape does not match config.json (naming it and both shapes).
  With `progress`, shows a tqdm bar over the converted tensors.
  """
  folder = SafetensorsFolder(path)
  where = os.path.join(folder.path, "config.json")
  config, layout = transformer_config(folder.config, {n: folder.shape(n) for n in folder.names},
                                      where)
  rename = original_to_diffusers if layout == ORIGINAL else (lambda n: n)
  present = {rename(n): n for n in folder.names}  # diffusers name -> name in the file

  plan = _plan(config)
  wanted = {n for _, names, _, _ in plan.values() for n in names}
  missing, unknown = wanted - set(present), set(present) - wanted
  check_tensor_names(
      f"{folder.path} does not hold the tensors its config.json ({layout}) describes",
      missing, {present[n] for n in unknown},
      missing_note="" if layout == DIFFUSERS else ", in diffusers' naming")

  params: dict = {}
  bar = tqdm(plan.items(), desc="wan transformer", unit="tensor", disable=not progress)
  for path_, (stacked, names, kind, want) in bar:
    arrays = []
    for name in names:
      got = folder.shape(present[name])
      if got != want:
        raise ValueError(f"tensor {present[name]}: shape {got} in the checkpoint, but "
                         f"{where} implies {want}")
      arrays.append(_from_source(folder.get(present[name]), kind))
    value = np.stack(arrays) if stacked else arrays[0]
    _set(params, path_, np.ascontiguousarray(value, dtype=np.float32))
  return config, params


def _flatten(tree, prefix=()) -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value
