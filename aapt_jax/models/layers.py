"""Building blocks of the DiT: dense layers with logical axis names, norms,
the MLP, sinusoidal timestep embedding, and patch embed / unembed.

Every parameter carries logical axis names (see `aapt_jax.parallel`): a
sharding plan is a rules table, never a rewrite.
"""
from __future__ import annotations

import math
from typing import Any
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

default_kernel_init = nn.initializers.xavier_uniform()


def logical(init, names: Sequence[str | None]):
  return nn.with_logical_partitioning(init, tuple(names))


class Dense(nn.Module):
  """y = x @ kernel + bias, kernel [in, out] named (in_axis, out_axis)."""
  features: int
  axes: tuple[str, str]
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Any = default_kernel_init

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", logical(self.kernel_init, self.axes),
                        (x.shape[-1], self.features), self.param_dtype)
    y = jnp.einsum("...i,io->...o", x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", logical(nn.initializers.zeros, (self.axes[1],)),
                        (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class RMSNorm(nn.Module):
  """RMSNorm over the last axis (Wan's q/k norm: over all heads at once)."""
  axis_name: str
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", logical(nn.initializers.ones, (self.axis_name,)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (y * scale.astype(jnp.float32)).astype(self.dtype)


class LayerNorm32(nn.Module):
  """LayerNorm computed in float32 (Wan's FP32LayerNorm); affine optional."""
  eps: float = 1e-6
  affine: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    if self.affine:
      scale = self.param("scale", logical(nn.initializers.ones, ("embed",)),
                         (x.shape[-1],), self.param_dtype)
      bias = self.param("bias", logical(nn.initializers.zeros, ("embed",)),
                        (x.shape[-1],), self.param_dtype)
      y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y  # float32: callers modulate in float32, then cast


class FeedForward(nn.Module):
  """Linear -> GELU (tanh) -> Linear, as Wan's FeedForward."""
  dim: int
  hidden_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = Dense(self.hidden_dim, ("embed", "mlp"), name="fc1", **kw)(x)
    h = nn.gelu(h, approximate=True)
    return Dense(self.dim, ("mlp", "embed"), name="fc2", **kw)(h)


def timestep_sinusoid(t, dim: int, max_period: float = 10000.0):
  """Wan/diffusers `Timesteps(flip_sin_to_cos=True, shift=0)` of 1000·t.

  t: [...] in [0, 1]. Returns [..., dim] float32, cos first.
  """
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half
  args = (1000.0 * t.astype(jnp.float32))[..., None] * jnp.exp(exponent)
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepEmbedding(nn.Module):
  """sinusoid(1000 t) -> Linear -> SiLU -> Linear: [..., freq_dim] -> [..., dim]."""
  dim: int
  freq_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = timestep_sinusoid(t, self.freq_dim)
    h = Dense(self.dim, ("freq", "embed"), name="linear_1", **kw)(h)
    return Dense(self.dim, ("embed", "embed_out"), name="linear_2", **kw)(nn.silu(h))


class TextProjection(nn.Module):
  """Text embeddings [B, L, text_dim] -> [B, L, dim]: Linear -> GELU(tanh) -> Linear."""
  dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, text):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = Dense(self.dim, ("text_embed", "embed"), name="linear_1", **kw)(text)
    return Dense(self.dim, ("embed", "embed_out"), name="linear_2", **kw)(nn.gelu(h, approximate=True))


class PatchEmbed(nn.Module):
  """A (pt, ph, pw) patch of C channels -> one token of `dim` (Wan's Conv3d).

  The kernel keeps the conv layout [pt, ph, pw, C_in, dim] so that extra input
  channels (the recycled frame) are a slice that an import can zero-fill.
  x: [B, T, h, w, C_in] -> tokens [B, T/pt, (h/ph)(w/pw), dim].
  """
  dim: int
  patch_size: tuple[int, int, int]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    pt, ph, pw = self.patch_size
    b, t, h, w, c = x.shape
    kernel = self.param(
        "kernel",
        logical(nn.initializers.lecun_normal(in_axis=(0, 1, 2, 3), out_axis=4),
                ("patch_t", "patch_h", "patch_w", "channels", "embed")),
        (pt, ph, pw, c, self.dim), self.param_dtype)
    bias = self.param("bias", logical(nn.initializers.zeros, ("embed",)), (self.dim,),
                      self.param_dtype)
    x = x.reshape(b, t // pt, pt, h // ph, ph, w // pw, pw, c)
    tokens = jnp.einsum("bTaHcWdk,acdke->bTHWe", x.astype(self.dtype),
                        kernel.astype(self.dtype))
    tokens = tokens + bias.astype(self.dtype)
    return tokens.reshape(b, t // pt, (h // ph) * (w // pw), self.dim)


def unpatchify(tokens, patch_size, grid_hw, channels):
  """tokens [B, T', P, pt*ph*pw*C] (order (pt, ph, pw, c), as Wan) -> [B, T'pt, h, w, C]."""
  pt, ph, pw = patch_size
  gh, gw = grid_hw
  b, tp = tokens.shape[:2]
  x = tokens.reshape(b, tp, gh, gw, pt, ph, pw, channels)
  x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)  # [B, T', pt, gh, ph, gw, pw, C]
  return x.reshape(b, tp * pt, gh * ph, gw * pw, channels)
