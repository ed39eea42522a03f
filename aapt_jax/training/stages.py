"""One pure train-step function per stage: (state, batch) -> (state, metrics).

Each is jitted with the state donated by the trainer. A non-finite loss or
gradient skips the update (params, optimizer and EMA unchanged) and is counted.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from aapt_jax.models import Conditioning
from aapt_jax.objectives import flow_matching as fm
from aapt_jax.parallel import LOGICAL_AXIS_RULES


def _drop_conditions(rng, batch, p):
  """Condition dropout (for classifier-free guidance): per sample, with prob p,
  actions -> -1 (none), controls -> 0, text fully masked."""
  b = batch["latents"].shape[0]
  drop = jax.random.bernoulli(rng, p, (b,))
  actions = batch.get("actions")
  if actions is not None:
    actions = jnp.where(drop[:, None], -1, actions)
  controls = batch.get("controls")
  if controls is not None:
    controls = jnp.where(drop[:, None, None], 0.0, controls)
  text, mask = batch.get("text_embedding"), batch.get("text_mask")
  if text is not None:
    mask = jnp.ones(text.shape[:2], bool) if mask is None else mask
    mask = mask & ~drop[:, None]
  return actions, controls, text, mask


def _masked(ok, new, old):
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def apply_update(state, grads, loss, tx, ema_decay):
  """Optimizer step + EMA, skipped when the loss or gradient is non-finite."""
  grad_norm = optax.tree.norm(grads)
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, new_opt = tx.update(grads, state.gen_opt, state.gen_params)
  new_params = optax.apply_updates(state.gen_params, updates)
  new_ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p,
                         state.ema_params, new_params)
  state = state.replace(
      step=state.step + 1,
      gen_params=_masked(ok, new_params, state.gen_params),
      gen_opt=_masked(ok, new_opt, state.gen_opt),
      ema_params=_masked(ok, new_ema, state.ema_params),
      skipped=state.skipped + (~ok).astype(jnp.int32))
  return state, {"grad_norm": grad_norm, "finite": ok}


def diffusion_loss(model, params, batch, rng, config):
  """Stage 1: flow matching with teacher forcing, all frames in one block-causal pass.

  The sink (frame 0) is clean at t = 0 and carries no loss.
  """
  k_in, k_drop = jax.random.split(rng)
  latents = batch["latents"]                                    # [B, T, h, w, C]
  noisy, t, previous, noise = fm.teacher_forcing_inputs(latents, k_in,
                                                        config.diffusion.timestep_shift)
  actions, controls, text, mask = _drop_conditions(k_drop, batch, config.diffusion.cond_dropout)
  cond = Conditioning(previous=previous, actions=actions, controls=controls, text=text,
                      text_mask=mask)
  velocity = model.apply({"params": params}, noisy, t, cond)
  weights = jnp.ones(latents.shape[:2]).at[:, 0].set(0.0)
  return fm.loss(velocity, fm.velocity_target(latents, noise), weights)


def make_diffusion_step(model, tx, config):
  """The stage-1 step (pure; jit it with the state donated)."""

  def step(state, batch):
    with nn.logical_axis_rules(LOGICAL_AXIS_RULES):
      rng, k = jax.random.split(jax.random.wrap_key_data(state.rng))
      loss, grads = jax.value_and_grad(
          lambda p: diffusion_loss(model, p, batch, k, config))(state.gen_params)
      state, m = apply_update(state, grads, loss, tx, config.train.ema_decay)
      state = state.replace(rng=jax.random.key_data(rng))
    return state, {"loss": loss, **m}

  return step
