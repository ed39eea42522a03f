"""Stage 2: consistency distillation of the stage-1 (teacher) model into a
one-step generator.

The consistency function is the model's clean-frame prediction
f(x_t, t) = x_t - t·v(x_t, t): f(x, 0) = x holds by construction, and the
1NFE frame eps - v(eps, 1) is f(eps, 1). Teacher ODE steps run on a
discretised, shifted schedule t_k = shift(k / K) (paper defaults: K = 32,
shift 24, no CFG). For a sampled k, with the clip's frames >= 1 at t_k (one
joint trajectory per clip, as at inference where every new block is at
t = 1), the teacher takes one Euler step to t_{k-1} and the EMA target maps
that point to its clean prediction; the student's prediction at t_k must
match it. Teacher and target see the same conditioning: the clean sink, the
clean recycled frames, the same actions/text.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from aapt_jax.objectives.flow_matching import shift_timesteps

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x [B,T,...], t [B,T]) -> v


def timestep_grid(num_steps: int, shift: float):
  """[K + 1] timesteps t_0 = 0 < ... < t_K = 1 of the shifted schedule."""
  if num_steps < 1:
    raise ValueError(f"consistency.num_steps must be >= 1, got {num_steps}")
  return shift_timesteps(jnp.linspace(0.0, 1.0, num_steps + 1), shift)


def _expand(t, x):
  return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def clean_prediction(x_t, t, velocity):
  """f(x_t, t) = x_t - t v."""
  return x_t - _expand(t, x_t) * velocity


def euler_step(x_t, t, t_prev, velocity):
  """One teacher ODE step from t to t_prev (< t): x + (t_prev - t) v."""
  return x_t + _expand(t_prev - t, x_t) * velocity


def consistency_target(teacher_velocity: VelocityFn, target_velocity: VelocityFn, x_t, t,
                       t_prev):
  """The distillation target f_target(x_{t_prev}, t_prev), x_{t_prev} = Euler(teacher).

  x_t [B, T, ...]; t, t_prev [B, T] (frames not being distilled, like the
  sink, carry t = t_prev = 0 and pass through unchanged).
  """
  x_prev = euler_step(x_t, t, t_prev, teacher_velocity(x_t, t))
  return jax.lax.stop_gradient(clean_prediction(x_prev, t_prev, target_velocity(x_prev, t_prev)))


def distance(prediction, target, kind: str = "l2", huber_c: float = 0.03):
  """Per-frame distance [B, T]: "l2" (mean squared error) or "pseudo_huber"
  (sqrt(mean sq + c²) - c, robust to outliers)."""
  sq = jnp.mean(jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32)),
                axis=tuple(range(2, prediction.ndim)))
  if kind == "l2":
    return sq
  if kind == "pseudo_huber":
    return jnp.sqrt(sq + huber_c ** 2) - huber_c
  raise ValueError(f"consistency.distance must be 'l2' or 'pseudo_huber', got {kind!r}")


def sample_steps(rng, batch: int, num_steps: int, shift: float):
  """Per-sample (t_k, t_{k-1}) [B] with k uniform in 1..K."""
  grid = timestep_grid(num_steps, shift)
  k = jax.random.randint(rng, (batch,), 1, num_steps + 1)
  return grid[k], grid[k - 1]
