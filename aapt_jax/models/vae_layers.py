"""Layers of the causal video VAE, in the layout of diffusers' `AutoencoderKLWan`
(Wan2.1): causal 3D convs, the channel RMS norm, residual and attention
blocks, and the spatial/temporal resamplers.

Tensors are channels-last video `[B, T, H, W, C]`. Parameter names mirror
the diffusers state dict (a torch `down_blocks.3.conv1.weight` is our
`down_blocks_3/conv1/kernel`), so the import is a renaming.

Every layer with a temporal kernel takes `(x, cache, first)` and returns
`(y, cache)`, one rule for the whole clip and for streaming:

- `cache`: the layer's input history, the last 2 frames (`CACHE_FRAMES`)
  each temporal conv saw before `x`; `None` = the start of a clip (Wan's
  causal zero padding). The returned cache is the history after `x`.
- `first`: `None` when every frame of `x` is real; in a streaming decode
  step, a bool scalar array, True while decoding latent frame 0, when only
  the last frame of `x` is real (latent 0 decodes to 1 frame, later latents
  to r frames, and a step keeps one shape): the others are zeroed before
  each temporal conv, so they look exactly like Wan's zero padding.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

CACHE_FRAMES = 2  # frames of history a temporal kernel of 3 reads (Wan's CACHE_T)

# torch's default conv init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
conv_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

# Logical axis names of the VAE's params (parallel.py's rules table): a conv
# kernel is [kt, kh, kw, C_in, C_out] ("vae_t", "vae_h", "vae_w", "vae_in",
# "vae_out"); C_out is what FSDP shards. The decoder's RGB head names its 3
# output channels "rgb" (replicated: no mesh axis divides 3).
OUT = "vae_out"


def named(init, *names):
  return nn.with_logical_partitioning(init, names)


def sub(cache, name):
  """A child's cache (None stays None: the start of a clip)."""
  return None if cache is None else cache[name]


def keep_last_frame_only(x, first):
  """Zeroes every frame but the last while decoding latent 0 (see module doc)."""
  if first is None or x.shape[1] == 1:
    return x
  real = jnp.logical_or(jnp.arange(x.shape[1]) == x.shape[1] - 1, jnp.logical_not(first))
  return jnp.where(real[None, :, None, None, None], x, jnp.zeros((), x.dtype))


class CausalConv3d(nn.Module):
  """Conv3d, causal in time (history or zeros before the clip), 'same' in space.

  x: [B, T, H, W, C_in] -> [B, T', H, W, features]; T' = T at stride 1. With
  `causal=False` no history is prepended (Wan's strided temporal downsample).
  """
  features: int
  kernel_size: tuple[int, int, int] = (3, 3, 3)
  time_stride: int = 1
  causal: bool = True
  out_axis: str = OUT
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, cache=None, first=None):
    kt, kh, kw = self.kernel_size
    kernel = self.param("kernel", named(conv_init, "vae_t", "vae_h", "vae_w", "vae_in",
                                        self.out_axis),
                        (kt, kh, kw, x.shape[-1], self.features))
    bias = self.param("bias", named(nn.initializers.zeros, self.out_axis), (self.features,))
    new_cache = None
    if self.causal and kt > 1:
      x = keep_last_frame_only(x, first)
      history = cache if cache is not None else jnp.zeros(
          x.shape[:1] + (kt - 1,) + x.shape[2:], x.dtype)
      x = jnp.concatenate([history.astype(x.dtype), x], axis=1)
      new_cache = x[:, -(kt - 1):]
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype), (self.time_stride, 1, 1),
        ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)),
        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    return y + bias.astype(self.dtype), new_cache


class Conv2d(nn.Module):
  """A per-frame 2D conv: [B, T, H, W, C_in] -> [B, T, H', W', features]."""
  features: int
  kernel_size: int = 3
  stride: int = 1
  padding: tuple[tuple[int, int], tuple[int, int]] = ((1, 1), (1, 1))
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param("kernel", named(conv_init, "vae_h", "vae_w", "vae_in", OUT),
                        (k, k, x.shape[-1], self.features))
    bias = self.param("bias", named(nn.initializers.zeros, OUT), (self.features,))
    b, t = x.shape[:2]
    y = jax.lax.conv_general_dilated(
        x.reshape((b * t,) + x.shape[2:]).astype(self.dtype), kernel.astype(self.dtype),
        (self.stride, self.stride), self.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = y + bias.astype(self.dtype)
    return y.reshape((b, t) + y.shape[1:])


class RMSNorm(nn.Module):
  """Wan's RMS_norm: x / max(||x||_2, 1e-12) * sqrt(C) * gamma over channels, in float32."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    gamma = self.param("gamma", named(nn.initializers.ones, "vae_norm"), (c,))
    x32 = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True))
    y = x32 / jnp.maximum(norm, 1e-12) * (c ** 0.5) * gamma
    return y.astype(self.dtype)


class ResidualBlock(nn.Module):
  """norm -> SiLU -> conv -> norm -> SiLU -> conv, plus a (1x1x1 conv) shortcut."""
  in_dim: int
  out_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, cache=None, first=None):
    kw = dict(dtype=self.dtype)
    shortcut = x
    if self.in_dim != self.out_dim:
      shortcut, _ = CausalConv3d(self.out_dim, (1, 1, 1), name="conv_shortcut", **kw)(x)
    h = nn.silu(RMSNorm(name="norm1", **kw)(x))
    h, cache1 = CausalConv3d(self.out_dim, name="conv1", **kw)(h, sub(cache, "conv1"), first)
    h = nn.silu(RMSNorm(name="norm2", **kw)(h))
    h, cache2 = CausalConv3d(self.out_dim, name="conv2", **kw)(h, sub(cache, "conv2"), first)
    return h + shortcut, {"conv1": cache1, "conv2": cache2}


class AttentionBlock(nn.Module):
  """Single-head self-attention over the pixels of each frame (no mixing in time)."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, t, h, w, c = x.shape
    qkv = Conv2d(3 * c, 1, padding=((0, 0), (0, 0)), name="to_qkv", dtype=self.dtype)(
        RMSNorm(name="norm", dtype=self.dtype)(x))
    q, k, v = (a.reshape(b * t, h * w, 1, c) for a in jnp.split(qkv, 3, axis=-1))
    out = jax.nn.dot_product_attention(q, k, v).reshape(b, t, h, w, c)
    out = Conv2d(c, 1, padding=((0, 0), (0, 0)), name="proj", dtype=self.dtype)(out)
    return out + x


def interleave_time(y, channels):
  """[B, T, H, W, 2C] -> [B, 2T, H, W, C]: frame 2j takes channels [:C] of j, 2j+1 [C:]."""
  b, t, h, w, _ = y.shape
  y = y.reshape(b, t, h, w, 2, channels).transpose(0, 1, 4, 2, 3, 5)
  return y.reshape(b, 2 * t, h, w, channels)


class Downsample(nn.Module):
  """Encoder resampler: pad right/bottom by 1, 3x3 conv stride 2 per frame;
  `temporal` adds Wan's (3, 1, 1) stride-2 conv over the frames after the
  first: T = 1 + 2m -> 1 + m, frame 0 passing through (whole clips only)."""
  dim: int
  temporal: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = Conv2d(self.dim, 3, 2, ((0, 1), (0, 1)), name="resample_1", dtype=self.dtype)(x)
    if not self.temporal:
      return x
    if x.shape[1] % 2 != 1:
      raise ValueError(f"a temporal downsample needs an odd frame count 1 + 2m, got {x.shape[1]}")
    time_conv = CausalConv3d(self.dim, (3, 1, 1), time_stride=2, causal=False, name="time_conv",
                             dtype=self.dtype)
    if x.shape[1] == 1:
      if self.is_initializing():
        time_conv(jnp.zeros(x.shape[:1] + (3,) + x.shape[2:], x.dtype))  # creates its params
      return x
    y, _ = time_conv(x)
    return jnp.concatenate([x[:, :1], y], axis=1)


class Upsample(nn.Module):
  """Decoder resampler: nearest 2x in space then a 3x3 conv to dim // 2 channels;
  `temporal` first doubles frames with a causal (3, 1, 1) conv to 2·dim
  channels, interleaved in time. As in Wan, the clip's first frame passes the
  temporal step untouched (1 frame) and the time conv starts its own history
  at the second."""
  dim: int
  temporal: bool
  dtype: Dtype = jnp.float32

  def _spatial(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
    return Conv2d(self.dim // 2, 3, name="resample_1", dtype=self.dtype)(x)

  @nn.compact
  def __call__(self, x, cache=None, first=None):
    if not self.temporal:
      return self._spatial(x), None
    time_conv = CausalConv3d(2 * self.dim, (3, 1, 1), name="time_conv", dtype=self.dtype)
    if first is None:  # a whole clip from its start: frame 0 passes, the rest get their own history
      head, rest = x[:, :1], x[:, 1:]
      if rest.shape[1] == 0:
        _, new_cache = time_conv(jnp.zeros_like(head))  # no history yet (and creates its params)
        return self._spatial(head), new_cache
      y, new_cache = time_conv(rest)
      return self._spatial(jnp.concatenate([head, interleave_time(y, self.dim)], axis=1)), new_cache
    # A streaming step: latent 0 repeats its frames (the last is the real one)
    # and leaves the history empty; later latents go through the time conv.
    y, stepped_cache = time_conv(x, cache)
    doubled = jnp.where(first, jnp.repeat(x, 2, axis=1), interleave_time(y, self.dim))
    return self._spatial(doubled), jnp.where(first, cache, stepped_cache)
