"""TrainState and its abstract-first, sharded initialisation."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from aapt_jax import parallel
from aapt_jax.models import init_params


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32 []
  gen_params: Any          # generator params (bare tree)
  gen_opt: Any             # its optimizer state
  ema_params: Any          # EMA of gen_params (what inference uses)
  rng: jax.Array           # uint32 [2] raw key data
  skipped: jax.Array       # int32 []: updates skipped for a non-finite loss
  disc_params: Any = None  # discriminator (stage 3 only)
  disc_opt: Any = None
  teacher_params: Any = None  # frozen teacher (stage 2 only)


def _init_fn(model, tx, seed):
  def init(rng):
    k_params, k_state = jax.random.split(rng)
    params = init_params(model, k_params)["params"]  # boxed with logical names
    return TrainState(step=jnp.zeros((), jnp.int32), gen_params=params, gen_opt=tx.init(params),
                      ema_params=params, rng=jax.random.key_data(k_state),
                      skipped=jnp.zeros((), jnp.int32))
  del seed
  return init


def abstract_state(model, tx, seed: int = 0):
  """(abstract boxed state, init function): eval_shape, no allocation."""
  init = _init_fn(model, tx, seed)
  return jax.eval_shape(init, jax.random.key(seed)), init


def state_shardings(boxed_abstract, mesh):
  return parallel.logical_shardings(boxed_abstract, mesh)


def create_train_state(model, tx, mesh, seed: int = 0):
  """Abstract-first init: eval_shape -> shardings -> jit(init, out_shardings)."""
  boxed, init = abstract_state(model, tx, seed)
  shardings = state_shardings(boxed, mesh)
  abstract = nn.meta.unbox(boxed)
  parallel.check_divisible(abstract.gen_params, shardings.gen_params)
  state = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(
      jax.random.key(seed))
  return state, shardings
