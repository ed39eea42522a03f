"""Stage-1 loss options: change-weighted loss and noise on the recycled frames."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aapt_jax import load_config
from aapt_jax.objectives import flow_matching as fm
from aapt_jax.training import stages
from helpers import config_path


def test_change_weights_by_hand():
  # one sample, 3 frames of 2 elements: frame 1 changes element 0 by 0.5,
  # element 1 by 0.01 (under the threshold); frame 2 changes element 1 by 1
  x = jnp.array([[0.0, 0.0], [0.5, 0.01], [0.5, 1.01]]).reshape(1, 3, 1, 1, 2)
  w = fm.change_weights(x, weight=9.0, threshold=0.02)
  np.testing.assert_allclose(np.asarray(w).reshape(3, 2), [[1, 1], [10, 1], [1, 10]])


def test_weighted_loss_by_hand():
  target = jnp.zeros((1, 3, 1, 1, 2))
  velocity = jnp.array([[9.0, 9.0], [1.0, 2.0], [3.0, 1.0]]).reshape(1, 3, 1, 1, 2)
  w = jnp.array([[1.0, 1.0], [10.0, 1.0], [1.0, 10.0]]).reshape(1, 3, 1, 1, 2)
  frames = jnp.array([[0.0, 1.0, 1.0]])
  # frame 1: (10 * 1 + 1 * 4) / 2 = 7; frame 2: (1 * 9 + 10 * 1) / 2 = 9.5; frame 0 masked
  assert float(fm.loss(velocity, target, frames, w)) == pytest.approx((7 + 9.5) / 2)
  assert float(fm.loss(velocity, target, frames, jnp.ones_like(w))) == pytest.approx(
      float(fm.loss(velocity, target, frames)))


class _Recorder:
  """A model double for diffusion_loss: records its inputs, predicts v = 0."""

  def apply(self, variables, noisy, t, cond):
    self.noisy, self.t, self.previous = noisy, t, cond.previous
    return jnp.zeros_like(noisy)


def _config(**options):
  return load_config(config_path("tiny.py"), {f"diffusion.{k}": v for k, v in options.items()})


def _batch():
  latents = jax.random.normal(jax.random.key(0), (2, 4, 2, 2, 3))   # [B, T, h, w, C]
  return {"latents": latents}


def _old_loss(batch, rng, config):
  """Stage 1's loss before the options, written out (v = 0 from the double)."""
  k_in, _ = jax.random.split(rng)
  latents = batch["latents"]
  _, _, _, noise = fm.teacher_forcing_inputs(latents, k_in, config.diffusion.timestep_shift)
  err = jnp.mean(jnp.square(noise - latents), axis=(2, 3, 4))[:, 1:]   # v = 0: (eps - x0)^2
  return jnp.mean(err)


def test_options_off_give_the_old_loss_exactly():
  config = _config()
  assert config.diffusion.context_noise == 0.0 and config.diffusion.change_weight == 0.0
  model, batch, rng = _Recorder(), _batch(), jax.random.key(5)
  loss = stages.diffusion_loss(model, None, batch, rng, config)
  assert float(loss) == pytest.approx(float(_old_loss(batch, rng, config)), rel=1e-6)
  np.testing.assert_array_equal(np.asarray(model.previous[:, 1:]),
                                np.asarray(batch["latents"][:, :-1]))


def test_context_noise_only_on_previous():
  batch, rng = _batch(), jax.random.key(5)
  clean, noisy = _Recorder(), _Recorder()
  loss0 = stages.diffusion_loss(clean, None, batch, rng, _config())
  loss1 = stages.diffusion_loss(noisy, None, batch, rng, _config(context_noise=0.1))
  # the noisy inputs, timesteps and the loss (the targets) are unchanged
  np.testing.assert_array_equal(np.asarray(noisy.noisy), np.asarray(clean.noisy))
  np.testing.assert_array_equal(np.asarray(noisy.t), np.asarray(clean.t))
  assert float(loss1) == float(loss0)
  # the recycled frames moved, by a per-frame std within [0, 0.1]
  delta = np.asarray(noisy.previous - clean.previous)                 # [B, T, h, w, C]
  assert np.abs(delta).max() > 0.0
  std = delta.reshape(delta.shape[0], delta.shape[1], -1).std(-1)
  assert std.max() < 0.1 * 1.6  # 12 samples per frame: a loose bound on sigma <= 0.1
  np.testing.assert_array_equal(np.asarray(fm.noisy_context(clean.previous, rng, 0.0)),
                                np.asarray(clean.previous))


def test_change_weight_in_the_stage1_loss_by_hand():
  batch, rng = _batch(), jax.random.key(5)
  config = _config(change_weight=4.0, change_threshold=0.5)
  loss = stages.diffusion_loss(_Recorder(), None, batch, rng, config)
  latents = np.asarray(batch["latents"])
  k_in, _ = jax.random.split(rng)
  _, _, _, noise = fm.teacher_forcing_inputs(batch["latents"], k_in,
                                             config.diffusion.timestep_shift)
  sq = np.square(np.asarray(noise) - latents)                        # v = 0
  moved = np.abs(latents[:, 1:] - latents[:, :-1]) > 0.5
  expect = np.mean((sq[:, 1:] * (1 + 4.0 * moved)).reshape(2, 3, -1).mean(-1))
  assert 0 < moved.mean() < 1
  assert float(loss) == pytest.approx(float(expect), rel=1e-5)


def test_x0_loss_space_by_hand():
  batch, rng = _batch(), jax.random.key(5)
  model = _Recorder()
  loss = stages.diffusion_loss(model, None, batch, rng,
                               _config(loss_space="x0", change_weight=4.0, change_threshold=0.5))
  latents, t = np.asarray(batch["latents"]), np.asarray(model.t)
  k_in, _ = jax.random.split(rng)
  _, _, _, noise = fm.teacher_forcing_inputs(batch["latents"], k_in, 3.0)
  sq = np.square(np.asarray(noise) - latents) * np.square(t)[:, :, None, None, None]
  moved = np.abs(latents[:, 1:] - latents[:, :-1]) > 0.5
  expect = np.mean((sq[:, 1:] * (1 + 4.0 * moved)).reshape(2, 3, -1).mean(-1))
  assert float(loss) == pytest.approx(float(expect), rel=1e-5)
  with pytest.raises(ValueError, match="diffusion.loss_space"):
    stages.diffusion_loss(model, None, batch, rng, _config(loss_space="eps"))
