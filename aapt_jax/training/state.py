"""TrainState and its init function (training/program.py builds and shards it)."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from aapt_jax.models import init_params


@flax.struct.dataclass
class TrainState:
  """Everything a stage's step reads and writes, one pytree (donated per step).

  `gen_params` is the trained network's bare params tree: the generator in
  stages 1-3, the video VAE in stage "vae" (its one trained network; a
  separate field per network would leave the step wrapper, checkpoints and
  shardings with one shape per stage for no gain)."""
  step: jax.Array          # int32 []
  gen_params: Any          # the trained network's params (the generator; stage vae: the VAE)
  gen_opt: Any             # its optimizer state
  ema_params: Any          # EMA of gen_params (what inference uses)
  rng: jax.Array           # uint32 [2] raw key data
  skipped: jax.Array       # int32 []: updates skipped for a non-finite loss
  disc_params: Any = None  # discriminator (stage 3 only)
  disc_opt: Any = None
  teacher_params: Any = None  # frozen teacher (stage 2 only)


def _init_model(model, rng):
  """The bare params of the trained model: the generator, or (stage "vae") the VAE."""
  from aapt_jax.models.vae import VAE, init_params as init_vae_params
  return (init_vae_params if isinstance(model, VAE) else init_params)(model, rng)["params"]


def init_fn(model, tx, disc=None, disc_tx=None, teacher=False):
  """rng -> a fresh TrainState, params boxed with their logical axis names.

  disc/disc_tx: the discriminator and its optimizer (stage 3); teacher: keep
  a frozen teacher copy (stage 2). training/program.py traces it with
  `jax.eval_shape` and jits it onto the shardings (the one init recipe).
  """
  def init(rng):
    k_params, k_state, k_disc = jax.random.split(rng, 3)
    params = _init_model(model, k_params)  # boxed with logical names (generator)
    state = TrainState(step=jnp.zeros((), jnp.int32), gen_params=params, gen_opt=tx.init(params),
                       ema_params=params, rng=jax.random.key_data(k_state),
                       skipped=jnp.zeros((), jnp.int32))
    if teacher:  # stage 2: a frozen copy (replaced by the stage-1 weights on init_from)
      state = state.replace(teacher_params=params)
    if disc is not None:  # stage 3
      from aapt_jax.models.discriminator import init_discriminator_params
      d = init_discriminator_params(disc, k_disc)["params"]
      state = state.replace(disc_params=d, disc_opt=disc_tx.init(d))
    return state
  return init
