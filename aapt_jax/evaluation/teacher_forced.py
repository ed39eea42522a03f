"""The model's one-step teacher-forced prediction of every frame from the real
previous frames: what it would make if it had not drifted.

One full-sequence `Generator.__call__` per batch of seeds: block 0 is the real
start frame (t = 0), block i >= 1 the noise eps_i at t = 1 with the REAL frame
i-1 recycled, so block i's keys and values are exactly those a stream would
have cached had it been fed real frames; the one-step frame is
x0_i = eps_i - v(eps_i, t=1). eps_i is the noise a `StreamingSession` with the
same seed draws for frame i (normal(fold_in(key(seed), i))), so frame 1 equals
the session's first open-loop frame.

With `noise_level` t < 1 block i is instead the real frame i noised to t,
(1 - t) x_i + t eps_i, and the prediction x0_i = x_t - t v: the denoising
check. A diffusion model reads its noisy input, so at small t it scores far
above its t = 1 frame; one that predicts the same frame at every t has
learnt to ignore it (a regressor of its context: more Euler steps then
draw the same frame, and there is no distribution for stages 2 and 3 to
distil or sharpen).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from aapt_jax.data.pipeline import pixels_to_latents
from aapt_jax.inference.decoders import PixelDecoder
from aapt_jax.models import Conditioning

DENOISE_T = 0.1  # the denoising check's noise level (evaluation suite, ball_probe)


def make_one_step_fn(model):
  """jitted fn(params, latents [B, T+1, h, w, C], actions int32 [B, T+1] or
  None, noise [B, T+1, h, w, C], controls float32 [B, T+1, A] or None,
  noise_level t in (0, 1] (a float, traced: one compile for every t)) ->
  x0 [B, T+1, h, w, C] (frame 0 unused); block i >= 1 is (1 - t) x_i + t eps_i."""
  def predict(params, latents, actions, noise, controls=None, noise_level=1.0):
    b, n = latents.shape[:2]                                        # latents [B, T+1, h, w, C]
    t = jnp.full((b, n), noise_level, jnp.float32).at[:, 0].set(0.0)  # [B, T+1]
    te = t[:, :, None, None, None]
    inputs = (1.0 - te) * latents + te * noise                      # block 0: the clean sink
    previous = jnp.concatenate([jnp.zeros_like(latents[:, :1]), latents[:, :-1]], axis=1)
    cond = Conditioning(previous=previous, actions=actions, controls=controls)
    v = model.apply({"params": params}, inputs, t, cond)
    return inputs - te * v                                          # x0 at t (frame 0: unused)
  return jax.jit(predict)


def one_step_predictions(streaming_model, real: np.ndarray, actions: np.ndarray,
                         seeds, one_step_fn=None, noise_level: float = 1.0) -> np.ndarray:
  """uint8 [B, T+1, H, W, 3]: frame 0 the real start frame, frame i >= 1 the
  model's one-step prediction from real frames 0..i-1 and actions 0..i.

  streaming_model: an `inference.session.StreamingModel` of a pixel-space
  world; real uint8 [B, T+1, H, W, 3]; actions int [B, T+1] (actions[:, 0] is
  the start frame's, NOOP), or in a camera world (model.control_dim > 0) the
  control vectors float [B, T+1, A]; seeds: B noise seeds; one_step_fn: a
  `make_one_step_fn(streaming_model.generator)` to reuse (else one is compiled);
  noise_level: t in (0, 1], the noise on the real frame the model sees (module
  docstring; 1 = the one-step frame from noise alone).
  """
  if not 0.0 < noise_level <= 1.0:
    raise ValueError(f"noise_level must be in (0, 1], got {noise_level}")
  if not isinstance(streaming_model.decoder, PixelDecoder):
    raise ValueError("teacher-forced predictions need a pixel-space world "
                     "(data.space_to_depth > 0); this model decodes with a VAE")
  s = streaming_model.decoder.space_to_depth
  latents = jnp.asarray(pixels_to_latents(real, s))                # [B, T+1, h, w, C]
  shape = (1, 1) + latents.shape[2:]
  noise = jnp.stack([jnp.concatenate(
      [jax.random.normal(jax.random.fold_in(jax.random.key(int(seed)), i), shape)
       for i in range(latents.shape[1])], axis=1)[0] for seed in seeds])
  spec = streaming_model.generator.spec
  acts = jnp.asarray(actions, jnp.int32) if spec.num_actions else None
  controls = jnp.asarray(actions, jnp.float32) if spec.control_dim else None
  one_step_fn = one_step_fn or make_one_step_fn(streaming_model.generator)
  x0 = one_step_fn(streaming_model.params, latents, acts, noise, controls,
                   jnp.float32(noise_level))
  pixels = np.asarray(streaming_model.decoder.decode_step(None, x0, ())[0])
  pixels = np.clip(np.round((pixels + 1.0) * 127.5), 0, 255).astype(np.uint8)
  pixels[:, 0] = real[:, 0]
  return pixels
