"""The learning-rate schedule of an optimizer section, value by value."""
import ml_collections
import numpy as np
import pytest

from aapt_jax.training import optimizers


def _section(**fields):
  o = ml_collections.ConfigDict({"learning_rate": 1e-3, "schedule": "constant",
                                 "hold_steps": 0, "warmup_steps": 0})
  o.update(fields)
  return o


def test_hold_then_warmup_then_constant():
  lr = optimizers.schedule(_section(hold_steps=3, warmup_steps=4), total_steps=20)
  got = [float(lr(i)) for i in range(10)]
  # 3 steps at 0, then 0, 1/4, 2/4, 3/4 of the peak, then the peak
  want = [0, 0, 0, 0, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3]
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)


def test_hold_with_cosine_reaches_zero_at_the_end():
  lr = optimizers.schedule(_section(schedule="cosine", hold_steps=5), total_steps=15)
  assert float(lr(4)) == 0.0
  assert float(lr(5)) == pytest.approx(1e-3)
  assert float(lr(10)) == pytest.approx(5e-4, rel=1e-5)   # half-way through the decay
  assert float(lr(15)) == pytest.approx(0.0, abs=1e-12)


def test_a_held_network_does_not_move():
  import jax.numpy as jnp
  tx = optimizers.make_optimizer(_section(name="rmsprop", rms_decay=0.9, eps=1e-8,
                                          grad_clip=0.0, hold_steps=2), 10)
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  for step in range(3):
    updates, state = tx.update({"w": jnp.full(3, 0.5)}, state, params)
    moved = bool(jnp.any(updates["w"] != 0))
    assert moved == (step >= 2), step


def test_negative_hold_is_named():
  with pytest.raises(ValueError, match="hold_steps"):
    optimizers.schedule(_section(hold_steps=-1), 10)
