"""Rectified flow / flow matching (stage 1, diffusion adaptation).

x_t = (1 - t) x_0 + t eps, velocity v = eps - x_0, so x_0 = x_t - t v.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def shift_timesteps(t, shift: float):
  """t' = shift·t / (1 + (shift - 1)·t): shift > 1 spends more time at high noise."""
  return shift * t / (1.0 + (shift - 1.0) * t)


def _expand(t, x):
  return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def interpolate(x0, noise, t):
  """x_t = (1 - t) x0 + t noise, with t [B, T] broadcast over the trailing axes."""
  t = _expand(t, x0)
  return (1.0 - t) * x0 + t * noise


def velocity_target(x0, noise):
  return noise - x0


def sample_timesteps(rng, shape, shift: float):
  """Independent per-frame timesteps: uniform, then shifted. [B, T] in [0, 1]."""
  return shift_timesteps(jax.random.uniform(rng, shape), shift)


def teacher_forcing_inputs(latents, rng, shift: float):
  """Stage-1 inputs from clean latents [B, T, h, w, C].

  Block 0 is the sink: the clean first frame at t = 0. Frame i >= 1 is noised
  at its own timestep; its recycled input is the clean frame i - 1.
  Returns (noisy inputs, timesteps [B, T], previous, noise).
  """
  k_t, k_n = jax.random.split(rng)
  b, t = latents.shape[:2]
  timesteps = sample_timesteps(k_t, (b, t), shift).at[:, 0].set(0.0)
  noise = jax.random.normal(k_n, latents.shape, latents.dtype)
  noisy = interpolate(latents, noise, timesteps)
  previous = jnp.concatenate([jnp.zeros_like(latents[:, :1]), latents[:, :-1]], axis=1)
  return noisy, timesteps, previous, noise


def loss(velocity, target, frame_weights=None):
  """Mean squared error; frame_weights [B, T] (e.g. 0 for the sink frame)."""
  err = jnp.mean(jnp.square(velocity.astype(jnp.float32) - target.astype(jnp.float32)),
                 axis=tuple(range(2, velocity.ndim)))  # [B, T]
  if frame_weights is None:
    return jnp.mean(err)
  return jnp.sum(err * frame_weights) / jnp.maximum(jnp.sum(frame_weights), 1.0)
