"""1NFE streaming generation and video files."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aapt_jax.data.video_io import read_video, write_video
from aapt_jax.inference.session import generate_latents, make_frame_fn
from aapt_jax.models import Conditioning
from helpers import compiled, tiny


def test_stream_equals_one_parallel_call_over_its_own_frames():
  """Frame i of the stream (the session's sampler, `sample_frame`) is
  eps_i - v(eps_i, t=1 | x_{i-1}): one parallel __call__ over [x_0, eps_1, ...]
  with previous = the generated frames gives the same velocities (the
  identity the adversarial stage's recompute uses)."""
  config, model, params = tiny((("model.text_dim", 0), ("model.control_dim", 0)))
  s = model.spec
  frames, seed = 2 * s.window_frames + 3, 7
  first = np.asarray(jax.random.normal(jax.random.key(1), (*s.latent_size, s.latent_channels)))
  actions = [0] + [i % s.num_actions for i in range(1, frames)]
  stream = np.stack(list(generate_latents(model, params["params"], first, actions, frames, seed)))
  assert stream.shape == (frames, *s.latent_size, s.latent_channels)
  np.testing.assert_array_equal(stream[0], first)
  key = jax.random.key(seed)
  noise = jnp.stack([jnp.asarray(first)] + [
      jax.random.normal(jax.random.fold_in(key, i), (1, 1, *s.latent_size, s.latent_channels))[0, 0]
      for i in range(1, frames)])[None]
  t = jnp.ones((1, frames)).at[:, 0].set(0.0)
  previous = jnp.concatenate([jnp.zeros_like(noise[:, :1]), jnp.asarray(stream)[None, :-1]], 1)
  call, _ = compiled(model)
  v = call(params, noise, t, Conditioning(previous=previous,
                                          actions=jnp.asarray(actions, jnp.int32)[None]))
  np.testing.assert_allclose(np.asarray(noise - v)[0, 1:], stream[1:], atol=5e-5, rtol=5e-5)


def test_euler_sampler_steps_by_hand():
  """K = 2: eps -> peek at t_2 = 1 (no commit) -> Euler to t_1 -> the committing
  step at t_1; the frame is x_{t_1} - t_1 v. Checked against explicit steps."""
  _, model, params = tiny((("model.text_dim", 0), ("model.control_dim", 0)))
  s = model.spec
  shape = (1, 1, *s.latent_size, s.latent_channels)
  first = jax.random.normal(jax.random.key(2), shape)
  fn = make_frame_fn(model, sampler_steps=2, shift=3.0)
  key = jax.random.key(4)
  act = jnp.zeros((1, 1), jnp.int32)
  f0, cache = fn(params["params"], key, jnp.int32(0), first, model.init_cache(1), act,
                 None, None, None)
  f1, cache = fn(params["params"], key, jnp.int32(1), f0, cache, act, None, None, None)
  assert int(cache.counter) == 2
  _, step = compiled(model)
  t1 = 3.0 * 0.5 / (1 + 2.0 * 0.5)  # shift(1/2) = 0.75
  cond = Conditioning(previous=first, actions=act)
  ref = model.init_cache(1)
  _, ref = step(params, first, jnp.zeros((1, 1)), Conditioning(previous=jnp.zeros_like(first),
                                                              actions=act), ref)
  eps = jax.random.normal(jax.random.fold_in(key, 1), shape)
  v, same = step(params, eps, jnp.ones((1, 1)), cond, ref, commit=False)
  assert int(same.counter) == 1
  x = eps + (t1 - 1.0) * v
  v, ref = step(params, x, jnp.full((1, 1), t1), cond, ref)
  np.testing.assert_allclose(np.asarray(f1), np.asarray(x - t1 * v), atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(np.asarray(f0), np.asarray(first))


def test_generate_rejects_bad_actions():
  _, model, params = tiny()
  s = model.spec
  first = np.zeros((*s.latent_size, s.latent_channels), np.float32)
  with pytest.raises(ValueError, match="invalid action"):
    list(generate_latents(model, params["params"], first, [0, s.num_actions], 2))
  with pytest.raises(ValueError, match="first_latent"):
    list(generate_latents(model, params["params"], first[:2], [0, 1], 2))


def test_video_round_trip(tmp_path):
  frames = [np.full((32, 48, 3), 40 * i, np.uint8) for i in range(5)]
  frames[2][:, :24] = 255
  path = str(tmp_path / "v.mp4")
  assert write_video(path, frames, fps=15) == 5
  back = read_video(path)
  assert back.shape == (5, 32, 48, 3)
  # H.264 is lossy: flat frames come back close, and the half-white frame stays half white
  assert np.abs(back.astype(int) - np.stack(frames).astype(int)).mean() < 4
  assert back[2, :, :20].mean() > 240 and back[2, :, 28:].mean() < 100
