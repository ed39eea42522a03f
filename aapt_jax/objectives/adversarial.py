"""Adversarial objectives (stage 3): relativistic pairing (R3GAN / RpGAN),
approximate R1/R2 (APT), and the overlapping segments a long rollout is judged in.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _mean(values, weights=None):
  """mean of `values`, or its `weights`-weighted mean (weights broadcast to it)."""
  if weights is None:
    return jnp.mean(values)
  weights = jnp.broadcast_to(weights, values.shape)
  return jnp.sum(values * weights) / jnp.sum(weights)


def generator_loss(real_logits, fake_logits, weights=None):
  """mean softplus(D(real) - D(fake)), paired per (sample, frame); `weights`
  [B, T] make it a weighted mean (0 = a pair in no loss)."""
  return _mean(jax.nn.softplus(real_logits - fake_logits), weights)


def discriminator_loss(real_logits, fake_logits, weights=None):
  """mean softplus(D(fake) - D(real)), paired per (sample, frame); `weights` as
  in `generator_loss`."""
  return _mean(jax.nn.softplus(fake_logits - real_logits), weights)


def perturb(x, sigma: float, rng):
  """x + σ·ε, ε ~ N(0, I): the input of approximate R1/R2's second D call."""
  return x + sigma * jax.random.normal(rng, x.shape, x.dtype)


def r1_penalty(clean_logits, perturbed_logits, weights=None):
  """mean (D(x) - D(perturb(x)))², from the two calls' logits (before λ);
  `weights` as in `generator_loss`."""
  return _mean(jnp.square(clean_logits - perturbed_logits), weights)


def approx_r1(disc_fn, x, sigma: float, rng):
  """Approximate R1 (on reals) / R2 (on fakes): mean (D(x) - D(x + σ·ε))², ε ~ N(0, I).

  Before the λ weight. `disc_fn` may return any shape.
  """
  return r1_penalty(disc_fn(x), disc_fn(perturb(x, sigma, rng)))


def segment_starts(length: int, segment: int, overlap: int) -> list[int]:
  """Start frames of the overlapping segments of a rollout of `length` frames.

  Segments are `segment` frames long and overlap by `overlap`; each new
  segment starts `segment - overlap` after the previous one, as long as it
  still holds a frame the previous one did not (the last may be partial).
  """
  if segment < 1 or not 0 <= overlap < segment:
    raise ValueError(f"need segment >= 1 and 0 <= overlap < segment, got segment={segment}, "
                     f"overlap={overlap}")
  if length < 1:
    raise ValueError(f"rollout length must be >= 1, got {length}")
  stride = segment - overlap
  starts = [0]
  while starts[-1] + segment < length:
    starts.append(starts[-1] + stride)
  return starts


def segments(length: int, segment: int, overlap: int) -> list[range]:
  """The frame index ranges of the segments (see `segment_starts`)."""
  return [range(s, min(s + segment, length)) for s in segment_starts(length, segment, overlap)]
