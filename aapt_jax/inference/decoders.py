"""Latent-frame decoders of a stream: latent frame -> video frames, one at a time.

One small interface, the streaming half of the VAE's contract
(`VAE.decode_step(latent, cache)` with `init_decode_cache(batch)`, equal to
`decode` frame by frame), with the parameters passed explicitly so one jitted
step takes them as inputs:

  frames_per_latent            k: video frames per latent frame (the VAE's r)
  frame_size                   (H, W) of a video frame
  encode_first(params, frame)  uint8 [H, W, 3] -> latent 0 [1, 1, h, w, C] (host)
  init_decode_cache(batch)     the decoder's fixed-shape cache (a pytree)
  decode_step(params, latent [B, 1, h, w, C], cache)
                               -> (frames [B, k, H, W, 3] float in [-1, 1], cache)

`PixelDecoder` is the pixel-space world's (depth-to-space, no parameters);
`VAEDecoder` adapts the causal video VAE (`aapt_jax.models.build_vae`).
`build_decoder(config)` picks the one the config describes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from aapt_jax.data import pipeline
from aapt_jax.models.vae import build_vae, denormalize_latents, normalize_latents


def depth_to_space(latents, s: int):
  """[B, T, h, w, s*s*3] -> [B, T, h*s, w*s, 3]: `pipeline.latents_to_pixels`'s
  channel order (channel (dy*s + dx)*3 + c is colour c of pixel (i*s+dy, j*s+dx))."""
  b, t, h, w, cs = latents.shape
  c = cs // (s * s)
  x = latents.reshape(b, t, h, w, s, s, c)
  x = x.transpose(0, 1, 2, 4, 3, 5, 6)                # [B, T, h, s, w, s, C]
  return x.reshape(b, t, h * s, w * s, c)


class PixelDecoder:
  """Pixel-space "latents" (data.space_to_depth = s): lossless depth-to-space."""

  frames_per_latent = 1

  def __init__(self, space_to_depth: int, latent_size, latent_channels: int):
    s = int(space_to_depth)
    if latent_channels != 3 * s * s:
      raise ValueError(f"a pixel-space world with data.space_to_depth={s} needs "
                       f"model.latent_channels={3 * s * s}, got {latent_channels}")
    self.space_to_depth = s
    self.frame_size = (latent_size[0] * s, latent_size[1] * s)

  def encode_first(self, params, frame: np.ndarray) -> np.ndarray:
    del params
    return pipeline.pixels_to_latents(frame, self.space_to_depth)[None, None]

  def init_decode_cache(self, batch_size: int):
    del batch_size
    return ()

  def decode_step(self, params, latent, cache):
    del params
    return depth_to_space(latent, self.space_to_depth), cache


class VAEDecoder:
  """The causal video VAE's streaming decode behind the same interface: a thin
  adapter over `encode`, `decode_step` and `init_decode_cache` of
  `aapt_jax.models.build_vae(config)`, with the per-channel latent
  normalisation the DiT was trained on (vae.latents_mean / latents_std)."""

  def __init__(self, config):
    self.vae = build_vae(config)
    self.vae_config = config.vae
    if config.model.latent_channels != self.vae.spec.z_dim:
      raise ValueError(f"model.latent_channels={config.model.latent_channels} must equal the "
                       f"VAE's vae.z_dim={self.vae.spec.z_dim}")
    self.frames_per_latent = self.vae.spec.temporal_factor
    self.frame_size = self.vae.spec.frame_size
    self._encode = jax.jit(self._encode_mean)

  def _encode_mean(self, params, frame):
    video = frame.astype(jnp.float32)[None, None] / 127.5 - 1.0         # [1, 1, H, W, 3]
    mean, _ = self.vae.apply({"params": params}, video, method="encode")
    return normalize_latents(mean, self.vae_config)                      # [1, 1, h, w, z]

  def encode_first(self, params, frame: np.ndarray) -> np.ndarray:
    return np.asarray(self._encode(params, jnp.asarray(frame)))

  def init_decode_cache(self, batch_size: int):
    return self.vae.init_decode_cache(batch_size)

  def decode_step(self, params, latent, cache):
    raw = denormalize_latents(latent, self.vae_config)
    return self.vae.apply({"params": params}, raw, cache, method="decode_step")


def uses_vae(config) -> bool:
  """Whether the config's latents come from the video VAE (data.space_to_depth = 0)."""
  return not int(config.data.space_to_depth)


def build_decoder(config):
  """The decoder of the config's latent space (pixels or the video VAE)."""
  m = config.model
  if uses_vae(config):
    return VAEDecoder(config)
  return PixelDecoder(config.data.space_to_depth, m.latent_size, m.latent_channels)
