"""Consistency distillation on a toy ODE with a known solution."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aapt_jax.objectives import consistency as cd


def test_grid_is_shifted_and_spans_0_to_1():
  g = np.asarray(cd.timestep_grid(4, 3.0))
  k = np.arange(5) / 4
  np.testing.assert_allclose(g, 3 * k / (1 + 2 * k), rtol=1e-6)
  assert g[0] == 0.0 and g[-1] == pytest.approx(1.0)


def test_target_equals_the_analytic_one_for_a_linear_field():
  """Teacher v(x, t) = a·x, EMA target v(x, t) = b·x (linear fields):
  x' = x + (t' - t)·a·x and target = x' - t'·b·x' = (1 + (t'-t)a)(1 - t' b)·x."""
  a, b = 0.7, -0.4
  x = jax.random.normal(jax.random.key(0), (2, 3, 2, 2, 1))
  t = jnp.array([[0.0, 0.8, 0.8], [0.0, 0.5, 0.5]])
  t_prev = jnp.array([[0.0, 0.6, 0.6], [0.0, 0.2, 0.2]])
  got = cd.consistency_target(lambda y, s: a * y, lambda y, s: b * y, x, t, t_prev)
  factor = (1 + (t_prev - t) * a) * (1 - t_prev * b)
  np.testing.assert_allclose(np.asarray(got), np.asarray(factor[..., None, None, None] * x),
                             rtol=1e-6, atol=1e-6)
  # the sink (t = t_prev = 0) passes through unchanged
  np.testing.assert_allclose(np.asarray(got[:, 0]), np.asarray(x[:, 0]), atol=1e-7)


def test_exact_flow_is_a_fixed_point():
  """For data x0 and the straight-line flow v = eps - x0 (the exact teacher),
  the target at any step is x0: a perfect one-step student has zero loss."""
  ks = jax.random.split(jax.random.key(1), 2)
  x0 = jax.random.normal(ks[0], (2, 2, 3, 3, 2))
  eps = jax.random.normal(ks[1], x0.shape)
  t = jnp.full((2, 2), 0.9)
  t_prev = jnp.full((2, 2), 0.3)
  x_t = (1 - t[..., None, None, None]) * x0 + t[..., None, None, None] * eps
  v = lambda y, s: eps - x0
  target = cd.consistency_target(v, v, x_t, t, t_prev)
  np.testing.assert_allclose(np.asarray(target), np.asarray(x0), atol=1e-5)
  student = cd.clean_prediction(x_t, t, eps - x0)
  assert float(jnp.max(cd.distance(student, target))) < 1e-10
  assert float(jnp.max(cd.distance(student, target, "pseudo_huber"))) < 1e-6


def test_distances_by_hand():
  p = jnp.zeros((1, 1, 2, 1, 1)).at[0, 0, 0].set(2.0)  # squared errors 4, 0 -> mean 2
  np.testing.assert_allclose(np.asarray(cd.distance(p, jnp.zeros_like(p))), [[2.0]])
  np.testing.assert_allclose(np.asarray(cd.distance(p, jnp.zeros_like(p), "pseudo_huber", 1.0)),
                             [[np.sqrt(3.0) - 1.0]], rtol=1e-6)
  with pytest.raises(ValueError, match="distance"):
    cd.distance(p, p, "l1")


def test_the_atari_schedule_has_a_fine_first_teacher_step():
  """configs/atari.py (64 tokens per frame): the consistency grid's lowest
  teacher step starts below t = 0.1 (the paper's 8B shift 24 starts it at
  t = 0.44, one Euler step over a fifth of the teacher's training times)."""
  from aapt_jax import load_config
  from helpers import config_path
  c = load_config(config_path("atari.py")).consistency
  grid = cd.timestep_grid(c.num_steps, c.shift)
  assert float(grid[1]) < 0.1
