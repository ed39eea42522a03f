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


def change_weights(latents, weight: float, threshold: float):
  """Per-element loss weights [B, T, h, w, C] from clean latents [B, T, h, w, C]:
  1 + weight where frame i differs from frame i - 1 by more than `threshold`
  (|x_i - x_{i-1}|, per element), else 1; frame 0 (no previous) is all 1.

  In a pixel-space (space-to-depth) world an element is one pixel's colour, so
  this puts weight on what moves (the ball, the paddles) against the static
  field that a copy of the recycled frame already gets right.
  """
  moved = jnp.abs(latents[:, 1:].astype(jnp.float32) - latents[:, :-1].astype(jnp.float32))
  moved = (moved > threshold).astype(jnp.float32)                 # [B, T-1, h, w, C]
  moved = jnp.concatenate([jnp.zeros_like(moved[:, :1]), moved], axis=1)
  return 1.0 + weight * moved                                      # [B, T, h, w, C]


def x0_space_weights(t, x):
  """t^2 [B, T, 1, 1, 1] for x [B, T, ...]: the weights that turn the velocity
  error into the clean-frame error (x0 = x_t - t v, so x0 - x0' = t (v' - v)),
  which weights every noise level alike instead of 1/t^2 towards t = 0."""
  return jnp.square(_expand(t, x).astype(jnp.float32))


def noisy_context(previous, rng, max_sigma: float):
  """The recycled frames [B, T, h, w, C] plus Gaussian noise sigma * eps, with
  sigma drawn per frame from U[0, max_sigma]: a model trained on them cannot
  rely on an exact copy of its input (its own recycled frames at inference are
  not exact either). max_sigma = 0 returns `previous` unchanged."""
  if max_sigma == 0:
    return previous
  k_s, k_n = jax.random.split(rng)
  sigma = jax.random.uniform(k_s, previous.shape[:2], jnp.float32, 0.0, max_sigma)  # [B, T]
  eps = jax.random.normal(k_n, previous.shape, jnp.float32)
  return (previous.astype(jnp.float32) + _expand(sigma, previous) * eps).astype(previous.dtype)


def loss(velocity, target, frame_weights=None, element_weights=None):
  """Mean squared error; frame_weights [B, T] (e.g. 0 for the sink frame);
  element_weights (broadcastable to [B, T, h, w, C]) multiply the squared error before each
  frame's mean (e.g. `change_weights`)."""
  sq = jnp.square(velocity.astype(jnp.float32) - target.astype(jnp.float32))
  if element_weights is not None:
    sq = sq * element_weights
  err = jnp.mean(sq, axis=tuple(range(2, velocity.ndim)))        # [B, T]
  if frame_weights is None:
    return jnp.mean(err)
  return jnp.sum(err * frame_weights) / jnp.maximum(jnp.sum(frame_weights), 1.0)
