"""The video VAE's training objective: reconstruction (L1, L2, an image
gradient term and a hard-pixel term) plus a KL term, each a mean over its
own elements, weighted by `config.vae.*_weight`."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def pixels_to_signed(video):
  """uint8 video [..., 3] in [0, 255] -> float32 in [-1, 1]; float video passes as is."""
  if video.dtype == jnp.uint8:
    return video.astype(jnp.float32) / 127.5 - 1.0
  return video.astype(jnp.float32)


def sample_posterior(mean, logvar, rng):
  """z = mean + exp(logvar / 2) · eps, eps ~ N(0, I) (the reparameterisation)."""
  return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)


def kl_to_standard_normal(mean, logvar):
  """KL(N(mean, exp(logvar)) || N(0, I)) per latent element, averaged."""
  return 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)


def image_gradient_l1(video, recon):
  """Mean |d video - d recon| over horizontal and vertical neighbour differences
  of each frame [B, T, H, W, C]: a cheap term for sharp edges."""
  dy = lambda x: x[:, :, 1:] - x[:, :, :-1]
  dx = lambda x: x[:, :, :, 1:] - x[:, :, :, :-1]
  return 0.5 * (jnp.mean(jnp.abs(dy(video) - dy(recon))) +
                jnp.mean(jnp.abs(dx(video) - dx(recon))))


def hard_pixel_l2(video, recon, fraction: float):
  """Mean squared error (RGB summed) of each frame's worst `fraction` of
  pixels, averaged over frames [B, T, H, W, C]: small objects (Pong's ball
  and paddles, under 1% of a frame) that a mean over the frame ignores."""
  err = jnp.sum(jnp.square(video - recon), axis=-1)            # [B, T, H, W]
  err = err.reshape(err.shape[:2] + (-1,))                      # [B, T, H*W]
  k = max(1, int(round(fraction * err.shape[-1])))
  return jnp.mean(jax.lax.top_k(err, k)[0])


def vae_loss(video, recon, mean, logvar, weights):
  """(loss, terms) for video/recon [B, T, H, W, 3] and the posterior [B, T', h, w, C].

  weights: a mapping with l1_weight, l2_weight, grad_weight, hard_weight,
  hard_fraction and kl_weight.
  """
  terms = {"l1": jnp.mean(jnp.abs(video - recon)),
           "l2": jnp.mean(jnp.square(video - recon)),
           "grad": image_gradient_l1(video, recon),
           "hard": hard_pixel_l2(video, recon, weights["hard_fraction"]),
           "kl": kl_to_standard_normal(mean, logvar)}
  loss = sum(weights[f"{name}_weight"] * value for name, value in terms.items())
  return loss, terms
