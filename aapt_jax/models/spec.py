"""ModelSpec: the validated, hashable view of `config.model` the modules use."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
PREDICTIONS = ("velocity", "x0", "frame_delta")
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
ATTENTION_BACKENDS = ("xla", "cudnn", "splash")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  dim: int
  num_layers: int
  num_heads: int
  ffn_dim: int
  freq_dim: int
  text_dim: int
  latent_channels: int
  patch_size: tuple[int, int, int]
  latent_size: tuple[int, int]
  window_frames: int
  num_actions: int
  control_dim: int
  block_causal: bool
  frame_recycling: bool
  qk_norm: bool
  cross_attn_norm: bool
  eps: float
  rope_theta: float
  dtype: str
  param_dtype: str
  scan_layers: bool
  remat: str
  attention_backend: str
  prediction: str = "velocity"
  x0_min_t: float = 0.05

  @property
  def head_dim(self) -> int:
    return self.dim // self.num_heads

  @property
  def in_channels(self) -> int:
    return self.latent_channels * (2 if self.frame_recycling else 1)

  @property
  def tokens_per_frame(self) -> int:
    h, w = self.latent_size
    return (h // self.patch_size[1]) * (w // self.patch_size[2])

  @property
  def compute_dtype(self) -> Any:
    return _DTYPES[self.dtype]

  @property
  def params_dtype(self) -> Any:
    return _DTYPES[self.param_dtype]

  @classmethod
  def from_config(cls, model_config) -> ModelSpec:
    """Builds and validates; every error names the config field and the fix."""
    values = {}
    for f in dataclasses.fields(cls):
      name = f.name
      if name not in model_config and f.default is not dataclasses.MISSING:
        continue  # added after older checkpoints were written: their default
      if name not in model_config:
        raise ValueError(f"config field model.{name} is missing (see configs/base.py)")
      values[name] = model_config[name]
    values["patch_size"] = tuple(int(p) for p in values["patch_size"])
    values["latent_size"] = tuple(int(p) for p in values["latent_size"])
    spec = cls(**values)
    spec.validate()
    return spec

  def validate(self) -> None:
    def need(ok, field, msg):
      if not ok:
        raise ValueError(f"config field model.{field}: {msg}")

    for f in ("dim", "num_layers", "num_heads", "ffn_dim", "freq_dim", "latent_channels"):
      need(int(getattr(self, f)) > 0, f, f"must be > 0, got {getattr(self, f)}")
    need(self.dim % self.num_heads == 0, "num_heads",
         f"model.dim={self.dim} must be divisible by model.num_heads={self.num_heads}")
    need(self.head_dim % 2 == 0 and self.head_dim >= 6, "num_heads",
         f"head dim dim/num_heads={self.head_dim} must be even and >= 6 (3D RoPE)")
    need(self.freq_dim % 2 == 0, "freq_dim", f"must be even, got {self.freq_dim}")
    need(self.window_frames >= 1, "window_frames",
         f"must be >= 1 (previous latent frames kept besides the sink), got {self.window_frames}")
    need(len(self.patch_size) == 3 and all(p >= 1 for p in self.patch_size), "patch_size",
         f"must be 3 positive ints (t, h, w), got {self.patch_size}")
    need(not self.block_causal or self.patch_size[0] == 1, "patch_size",
         f"block-causal attention needs a temporal patch of 1, got {self.patch_size}")
    need(len(self.latent_size) == 2, "latent_size", f"must be (h, w), got {self.latent_size}")
    need(self.latent_size[0] % self.patch_size[1] == 0 and self.latent_size[1] % self.patch_size[2] == 0,
         "latent_size", f"{self.latent_size} must be divisible by the spatial patch {self.patch_size[1:]}")
    need(self.text_dim >= 0, "text_dim", f"must be >= 0 (0 = no text), got {self.text_dim}")
    need(self.num_actions >= 0, "num_actions", f"must be >= 0, got {self.num_actions}")
    need(self.control_dim >= 0, "control_dim", f"must be >= 0, got {self.control_dim}")
    need(self.dtype in _DTYPES, "dtype", f"must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
    need(self.param_dtype in _DTYPES, "param_dtype",
         f"must be one of {sorted(_DTYPES)}, got {self.param_dtype!r}")
    need(self.remat in REMAT_POLICIES, "remat", f"must be one of {REMAT_POLICIES}, got {self.remat!r}")
    need(self.prediction in PREDICTIONS, "prediction",
         f"must be one of {PREDICTIONS}, got {self.prediction!r}")
    need(self.prediction != "frame_delta" or self.frame_recycling, "prediction",
         "'frame_delta' predicts the change from the recycled frame: it needs "
         "model.frame_recycling=True")
    need(0.0 < self.x0_min_t <= 1.0, "x0_min_t", f"must be in (0, 1], got {self.x0_min_t}")
    need(self.attention_backend in ATTENTION_BACKENDS, "attention_backend",
         f"must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
    if self.attention_backend == "cudnn":
      need(jax.default_backend() == "gpu", "attention_backend",
           f"'cudnn' needs a GPU, but JAX runs on {jax.default_backend()!r}: use 'xla'")
      need(self.dtype in ("bfloat16", "float16"), "attention_backend",
           f"'cudnn' needs model.dtype bfloat16 or float16, got {self.dtype!r}: use 'xla'")
    if self.attention_backend == "splash":
      need(jax.default_backend() == "tpu", "attention_backend",
           f"'splash' needs a TPU, but JAX runs on {jax.default_backend()!r}: use 'xla'")
