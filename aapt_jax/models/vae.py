"""The causal 3D video VAE: Wan2.1's `AutoencoderKLWan` (diffusers 0.42.1) in
Flax, with a fixed-shape streaming decode.

Temporal factor r = 2^(temporal downsamples), spatial factor s =
2^(len(dim_mult) - 1) (Wan2.1: r = 4, s = 8, 16 channels).

- `encode(video [B, T, H, W, 3] in [-1, 1]) -> (mean, logvar)`, each
  `[B, 1 + k, H/s, W/s, z]` for T = 1 + k·r; logvar clipped to [-30, 20].
  Wan encodes frame 0, then groups of r frames, carrying each causal conv's
  last frames between calls; one pass over the whole clip computes exactly
  that function (every conv sees the same history), so we run one pass.
- `decode(latents [B, T', h, w, z]) -> video [B, 1 + (T'-1)·r, H, W, 3]`
  clipped to [-1, 1]: latent 0 decodes to 1 frame, later latents to r each.
- `decode_step(latent [B, 1, h, w, z], cache) -> (frames [B, r, H, W, 3],
  cache)` with `init_decode_cache(batch_size)`: one jittable, fixed-shape
  step per latent frame (the cache holds every causal conv's last 2 input
  frames and the latent index), equal to `decode` frame by frame. Latent 0
  decodes to one frame: its step returns that frame r times, so a stream
  shows r frames per step; `decode(latents)[:, 0]` is its last.

The latents are raw; `normalize_latents` / `denormalize_latents` apply the
per-channel `latents_mean/std` (what the data pipeline and the DiT see).
All parameters live in the `params` collection with logical axis names
(vae_layers.py; parallel.py's rules): stage "vae" shards conv output
channels over the mesh's "fsdp" axis like the DiT's width. `init_params`
returns them boxed; `nn.meta.unbox` gives the bare arrays.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from aapt_jax.models.vae_layers import (AttentionBlock, CausalConv3d, Downsample, ResidualBlock,
                                        RMSNorm, Upsample, sub)

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
LOGVAR_RANGE = (-30.0, 20.0)


@dataclasses.dataclass(frozen=True)
class VAESpec:
  """The validated, hashable view of `config.vae` (+ `model.latent_size`)."""
  base_dim: int
  z_dim: int
  dim_mult: tuple[int, ...]
  num_res_blocks: int
  temperal_downsample: tuple[bool, ...]
  latent_size: tuple[int, int]   # (h, w) of a latent frame: the decode cache's shape
  dtype: str = "float32"

  @property
  def temporal_factor(self) -> int:
    return 2 ** sum(self.temperal_downsample)

  @property
  def spatial_factor(self) -> int:
    return 2 ** (len(self.dim_mult) - 1)

  @property
  def frame_size(self) -> tuple[int, int]:
    return tuple(n * self.spatial_factor for n in self.latent_size)

  @property
  def compute_dtype(self) -> Any:
    return _DTYPES[self.dtype]

  @classmethod
  def from_config(cls, config) -> VAESpec:
    if "vae" not in config or "model" not in config:
      raise ValueError("build_vae needs a full config with `vae` and `model` sections "
                       "(see configs/base.py)")
    v = config.vae
    for name in ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "attn_scales",
                 "temperal_downsample", "dropout", "dtype"):
      if name not in v:
        raise ValueError(f"config field vae.{name} is missing (see configs/base.py)")
    if tuple(v.attn_scales):
      raise ValueError(f"config field vae.attn_scales must be () (Wan2.1's VAE; diffusers "
                       f"0.42.1 cannot run encoder attention outside the mid block), got "
                       f"{tuple(v.attn_scales)}")
    if float(v.dropout) != 0.0:
      raise ValueError(f"config field vae.dropout must be 0.0 (dropout is not implemented), "
                       f"got {v.dropout}")
    spec = cls(base_dim=int(v.base_dim), z_dim=int(v.z_dim),
               dim_mult=tuple(int(m) for m in v.dim_mult),
               num_res_blocks=int(v.num_res_blocks),
               temperal_downsample=tuple(bool(t) for t in v.temperal_downsample),
               latent_size=tuple(int(n) for n in config.model.latent_size), dtype=str(v.dtype))
    spec.validate()
    return spec

  def validate(self) -> None:
    def need(ok, field, msg):
      if not ok:
        raise ValueError(f"config field {field}: {msg}")

    for f in ("base_dim", "z_dim", "num_res_blocks"):
      need(getattr(self, f) > 0, f"vae.{f}", f"must be > 0, got {getattr(self, f)}")
    need(len(self.dim_mult) >= 1 and all(m > 0 for m in self.dim_mult), "vae.dim_mult",
         f"must be positive multipliers, got {self.dim_mult}")
    need(len(self.temperal_downsample) == len(self.dim_mult) - 1, "vae.temperal_downsample",
         f"needs one flag per downsample, len(vae.dim_mult) - 1 = {len(self.dim_mult) - 1}, "
         f"got {self.temperal_downsample}")
    need(all(self.base_dim * m % 2 == 0 for m in self.dim_mult[1:]), "vae.base_dim",
         f"base_dim * dim_mult must be even where the decoder upsamples, got {self.base_dim} "
         f"* {self.dim_mult}")
    need(len(self.latent_size) == 2 and min(self.latent_size) > 0, "model.latent_size",
         f"must be (h, w) > 0, got {self.latent_size}")
    need(self.dtype in _DTYPES, "vae.dtype", f"must be one of {sorted(_DTYPES)}, got {self.dtype!r}")


@flax.struct.dataclass
class DecodeCache:
  """Fixed-shape state of a streaming decode."""
  convs: Any          # every causal conv's last 2 input frames (a dict tree of [B, 2, h', w', c])
  index: jax.Array    # int32 []: the index of the next latent frame (0 = latent 0 comes next)


class MidBlock(nn.Module):
  """Residual block, attention, residual block (Wan's mid block)."""
  dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, cache=None, first=None):
    kw = dict(dtype=self.dtype)
    x, cache0 = ResidualBlock(self.dim, self.dim, name="resnets_0", **kw)(
        x, sub(cache, "resnets_0"), first)
    x = AttentionBlock(name="attentions_0", **kw)(x)
    x, cache1 = ResidualBlock(self.dim, self.dim, name="resnets_1", **kw)(
        x, sub(cache, "resnets_1"), first)
    return x, {"resnets_0": cache0, "resnets_1": cache1}


class Encoder3d(nn.Module):
  """video [B, T, H, W, 3] -> [B, 1 + (T-1)/r, H/s, W/s, 2z] over a whole clip."""
  spec: VAESpec

  @nn.compact
  def __call__(self, x):
    s = self.spec
    kw = dict(dtype=s.compute_dtype)
    dims = [s.base_dim * m for m in (1,) + s.dim_mult]
    x, _ = CausalConv3d(dims[0], name="conv_in", **kw)(x)
    index = 0
    for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
      for _ in range(s.num_res_blocks):
        x, _ = ResidualBlock(in_dim, out_dim, name=f"down_blocks_{index}", **kw)(x)
        in_dim, index = out_dim, index + 1
      if level != len(s.dim_mult) - 1:
        x = Downsample(out_dim, s.temperal_downsample[level], name=f"down_blocks_{index}", **kw)(x)
        index += 1
    x, _ = MidBlock(dims[-1], name="mid_block", **kw)(x)
    x = nn.silu(RMSNorm(name="norm_out", **kw)(x))
    x, _ = CausalConv3d(2 * s.z_dim, name="conv_out", **kw)(x)
    return x


class UpBlock(nn.Module):
  """num_res_blocks + 1 residual blocks, then an optional (temporal) upsampler."""
  in_dim: int
  out_dim: int
  num_res_blocks: int
  upsample: str  # "" | "spatial" | "temporal"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, cache=None, first=None):
    new, in_dim = {}, self.in_dim
    for j in range(self.num_res_blocks + 1):
      name = f"resnets_{j}"
      x, new[name] = ResidualBlock(in_dim, self.out_dim, name=name, dtype=self.dtype)(
          x, sub(cache, name), first)
      in_dim = self.out_dim
    if self.upsample:
      x, new["upsamplers_0"] = Upsample(self.out_dim, self.upsample == "temporal",
                                        name="upsamplers_0", dtype=self.dtype)(
                                            x, sub(cache, "upsamplers_0"), first)
    return x, new


class Decoder3d(nn.Module):
  """latents [B, T', h, w, z] -> video [B, 1 + (T'-1)·r, H, W, 3] (unclipped).

  `(x, cache, first)` as in `vae_layers`: a whole clip (None, None) or a
  streaming step.
  """
  spec: VAESpec

  @nn.compact
  def __call__(self, x, cache=None, first=None):
    s = self.spec
    kw = dict(dtype=s.compute_dtype)
    mult = s.dim_mult
    dims = [s.base_dim * m for m in (mult[-1],) + mult[::-1]]
    temporal_up = s.temperal_downsample[::-1]
    new = {}
    x, new["conv_in"] = CausalConv3d(dims[0], name="conv_in", **kw)(x, sub(cache, "conv_in"), first)
    x, new["mid_block"] = MidBlock(dims[0], name="mid_block", **kw)(x, sub(cache, "mid_block"), first)
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
      upsample = "" if i == len(mult) - 1 else ("temporal" if temporal_up[i] else "spatial")
      name = f"up_blocks_{i}"
      # after block 0, the previous block's upsampler has halved the channels
      block = UpBlock(in_dim // 2 if i else in_dim, out_dim, s.num_res_blocks, upsample,
                      name=name, **kw)
      x, new[name] = block(x, sub(cache, name), first)
    x = nn.silu(RMSNorm(name="norm_out", **kw)(x))
    head = CausalConv3d(3, name="conv_out", out_axis="rgb", **kw)
    x, new["conv_out"] = head(x, sub(cache, "conv_out"), first)
    return x, new


class VAE(nn.Module):
  """The causal video VAE (see the module docstring for the contract)."""
  spec: VAESpec

  def setup(self):
    s = self.spec
    kw = dict(dtype=s.compute_dtype)
    self.encoder = Encoder3d(s)
    self.quant_conv = CausalConv3d(2 * s.z_dim, (1, 1, 1), **kw)
    self.post_quant_conv = CausalConv3d(s.z_dim, (1, 1, 1), **kw)
    self.decoder = Decoder3d(s)

  def __call__(self, video):
    """Encode then decode the mean (creates every parameter at init)."""
    mean, _ = self.encode(video)
    return self.decode(mean)

  # ---------------------------------------------------------------- checks
  def _check_video(self, video):
    s = self.spec
    if video.ndim != 5 or video.shape[-1] != 3:
      raise ValueError(f"video must be [B, T, H, W, 3], got shape {tuple(video.shape)}")
    _, t, h, w, _ = video.shape
    r, f = s.temporal_factor, s.spatial_factor
    if (t - 1) % r:
      raise ValueError(f"video has T={t} frames but the VAE needs T = 1 + k·r with r={r} "
                       f"(e.g. {1 + max(t - 1, 0) // r * r} or {1 + (max(t - 1, 0) // r + 1) * r}); "
                       f"frames are never dropped silently")
    if h % f or w % f:
      raise ValueError(f"video (H, W)=({h}, {w}) must be divisible by the spatial factor s={f}")

  def _check_latents(self, latents, name="latents"):
    s = self.spec
    if latents.ndim != 5 or latents.shape[-1] != s.z_dim:
      raise ValueError(f"{name} must be [B, T, h, w, {s.z_dim}] (vae.z_dim={s.z_dim}), "
                       f"got shape {tuple(latents.shape)}")

  # ------------------------------------------------------------------ API
  def encode(self, video):
    """video [B, T, H, W, 3] in [-1, 1], T = 1 + k·r -> (mean, logvar) [B, 1 + k, H/s, W/s, z]."""
    self._check_video(video)
    moments, _ = self.quant_conv(self.encoder(video.astype(self.spec.compute_dtype)))
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def _decode(self, latents, cache, first):
    """-> (unclipped float32 video, new cache)."""
    x, _ = self.post_quant_conv(latents.astype(self.spec.compute_dtype))
    video, new_cache = self.decoder(x, cache, first)
    return video.astype(jnp.float32), new_cache

  def decode(self, latents, clip: bool = True):
    """latents [B, T', h, w, z] -> video [B, 1 + (T'-1)·r, H, W, 3] in [-1, 1]
    (`clip=False`: unclipped, for training, where a clip would stop gradients)."""
    self._check_latents(latents)
    video, _ = self._decode(latents, None, None)
    return jnp.clip(video, -1.0, 1.0) if clip else video

  def decode_step(self, latent, cache: DecodeCache):
    """One latent frame [B, 1, h, w, z] -> (frames [B, r, H, W, 3] in [-1, 1], cache).

    Latent 0 (cache.index == 0) decodes to one frame, returned r times.
    """
    s = self.spec
    self._check_latents(latent, "latent")
    if latent.shape[1] != 1 or tuple(latent.shape[2:4]) != s.latent_size:
      raise ValueError(f"decode_step takes one latent frame [B, 1, {s.latent_size[0]}, "
                       f"{s.latent_size[1]}, {s.z_dim}] (model.latent_size), got "
                       f"{tuple(latent.shape)}")
    batch = jax.tree.leaves(cache.convs)[0].shape[0]
    if latent.shape[0] != batch:
      raise ValueError(f"latent has batch {latent.shape[0]} but the cache was made for "
                       f"{batch} (init_decode_cache(batch_size))")
    first = cache.index == 0
    frames, convs = self._decode(latent, cache.convs, first)
    frames = jnp.where(first, jnp.broadcast_to(frames[:, -1:], frames.shape), frames)
    return jnp.clip(frames, -1.0, 1.0), DecodeCache(convs=convs, index=cache.index + 1)

  def init_decode_cache(self, batch_size: int) -> DecodeCache:
    """An empty decode cache of fixed shapes for latent frames of model.latent_size."""
    s = self.spec
    latents = jax.ShapeDtypeStruct((batch_size, 2) + s.latent_size + (s.z_dim,), jnp.float32)
    shapes = jax.eval_shape(lambda z: self.init_with_output(
        jax.random.key(0), z, None, None, method=VAE._decode)[0][1], latents)
    convs = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
    return DecodeCache(convs=convs, index=jnp.zeros((), jnp.int32))


def build_vae(config) -> VAE:
  """A VAE from a full config (`vae` section + `model.latent_size`)."""
  return VAE(VAESpec.from_config(config))


def init_params(vae: VAE, rng) -> dict:
  """{"params": ...} for `vae` (from a one-group clip of the configured frame size)."""
  s = vae.spec
  video = jnp.zeros((1, 1 + s.temporal_factor) + s.frame_size + (3,), jnp.float32)
  return vae.init(rng, video)


def _channel_stats(latents, vae_config):
  mean = jnp.asarray(tuple(vae_config.latents_mean), jnp.float32)
  std = jnp.asarray(tuple(vae_config.latents_std), jnp.float32)
  if latents.shape[-1] != mean.shape[0] or std.shape != mean.shape:
    raise ValueError(f"latents have {latents.shape[-1]} channels but vae.latents_mean/std have "
                     f"{mean.shape[0]}/{std.shape[0]} values")
  return mean, std


def normalize_latents(latents, vae_config):
  """Raw VAE latents [..., z] -> (latents - latents_mean) / latents_std (what the DiT sees)."""
  mean, std = _channel_stats(latents, vae_config)
  return (latents - mean) / std


def denormalize_latents(latents, vae_config):
  """The inverse of `normalize_latents`: DiT latents -> raw latents for `decode`."""
  mean, std = _channel_stats(latents, vae_config)
  return latents * std + mean
