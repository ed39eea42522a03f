"""1NFE autoregressive generation with the KV cache, one latent frame at a time.

The stream: the first frame x_0 (a real start frame) is written into the cache
as the sink by one prefill `step` at t = 0; every later frame is ONE forward
from pure noise at t = 1 with the previous frame recycled:
x_i = eps - v(eps, t=1 | x_{i-1}, action_i). Time and memory per frame are
constant, however long the stream.
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from aapt_jax.models import Conditioning, Generator
from aapt_jax.objectives.flow_matching import shift_timesteps


def make_step_fn(model: Generator, sampler_steps: int = 1, shift: float = 1.0) -> Callable:
  """One jitted function per frame, compiled once, the cache donated (in place).

  frame_fn(params, key, index, given, previous, actions, cache) -> (frame, cache):
  index 0 writes `given` (the real first frame) as the sink at t = 0; index
  i >= 1 draws eps_i = N(fold_in(key, i)) and, with sampler_steps = 1 (1NFE),
  returns eps_i - v(eps_i, t=1). With K > 1 steps (for a stage-1 diffusion
  model) it takes Euler steps down the shifted grid t_K = 1 > ... > t_1 with
  `commit=False`, and the last step at t_1 commits the block to the cache.
  """
  if sampler_steps < 1:
    raise ValueError(f"sampler steps must be >= 1, got {sampler_steps}")
  grid = [float(g) for g in np.asarray(
      shift_timesteps(np.linspace(0.0, 1.0, sampler_steps + 1), shift))]

  def frame_fn(params, key, index, given, previous, actions, cache):
    first = index == 0
    noise = jax.random.normal(jax.random.fold_in(key, index), given.shape, given.dtype)
    cond = Conditioning(previous=jnp.where(first, 0.0, previous), actions=actions)
    ones = jnp.ones(given.shape[:2])
    x = noise
    for k in range(sampler_steps, 1, -1):  # peek steps: the cache is not written
      v, _ = model.apply({"params": params}, x, grid[k] * ones, cond, cache, commit=False,
                         method="step")
      x = x + (grid[k - 1] - grid[k]) * v
    latent = jnp.where(first, given, x)
    t = jnp.where(first, 0.0, grid[1]) * ones
    v, cache = model.apply({"params": params}, latent, t, cond, cache, method="step")
    return jnp.where(first, given, x - grid[1] * v), cache

  return jax.jit(frame_fn, donate_argnums=6)


def generate_latents(model: Generator, params, first_latent: np.ndarray,
                     actions: Sequence[int] | None, num_frames: int, seed: int = 0,
                     step_fn: Callable | None = None) -> Iterator[np.ndarray]:
  """Yields num_frames latent frames [h, w, C] (host numpy), the first being first_latent.

  params: the bare parameter tree. actions[i] is the action whose effect frame
  i shows (actions[0] goes with the given first frame); None = no actions.
  """
  s = model.spec
  if num_frames < 1:
    raise ValueError(f"num_frames must be >= 1, got {num_frames}")
  if tuple(first_latent.shape) != (*s.latent_size, s.latent_channels):
    raise ValueError(f"first_latent must be {(*s.latent_size, s.latent_channels)}, "
                     f"got {tuple(first_latent.shape)}")
  if s.num_actions:
    if actions is None or len(actions) < num_frames:
      raise ValueError(f"the model takes actions: give at least {num_frames}, got "
                       f"{0 if actions is None else len(actions)}")
    bad = [a for a in actions[:num_frames] if not 0 <= int(a) < s.num_actions]
    if bad:
      raise ValueError(f"invalid action ids {bad[:5]}: valid ids are 0..{s.num_actions - 1}")
  frame_fn = step_fn or make_step_fn(model)
  act = (lambda i: jnp.full((1, 1), int(actions[i]), jnp.int32)) if s.num_actions else (
      lambda i: None)
  key = jax.random.key(seed)
  given = jnp.asarray(first_latent, jnp.float32)[None, None]   # [1, 1, h, w, C]
  cache = model.init_cache(1)
  x = given
  for i in range(num_frames):
    x, cache = frame_fn(params, key, jnp.int32(i), given, x, act(i), cache)
    yield np.asarray(x[0, 0])
