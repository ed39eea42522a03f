"""Stage "vae": the causal video VAE's train step, (state, batch) -> (state, metrics).

The state is the trainer's TrainState with the VAE's params in `gen_params`
(and its EMA in `ema_params`); batch["video"] is [B, T, H, W, 3], uint8 or
float in [-1, 1], T = 1 + k·r. Loss: objectives/vae.py with config.vae's
weights, on the decode (unclipped) of a posterior sample.
"""
from __future__ import annotations

from aapt_jax.objectives import vae as vae_objective
from aapt_jax.training.stages import make_step


def vae_loss_fn(model, params, batch, rng, config):
  """(loss, terms) of one batch: encode, sample the posterior, decode, compare."""
  video = vae_objective.pixels_to_signed(batch["video"])       # [B, T, H, W, 3]
  variables = {"params": params}
  mean, logvar = model.apply(variables, video, method="encode")  # [B, T', h, w, C]
  latents = vae_objective.sample_posterior(mean, logvar, rng)
  recon = model.apply(variables, latents, clip=False, method="decode")
  return vae_objective.vae_loss(video, recon, mean, logvar, config.vae)


def make_vae_step(model, tx, config):
  """The stage-"vae" step: `make_step` of `vae_loss_fn` (its terms as metrics)."""
  return make_step(lambda p, state, batch, k: vae_loss_fn(model, p, batch, k, config),
                   tx, config.train.ema_decay)
