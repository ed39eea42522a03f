"""The shipped Atari VAE (aapt_jax/assets/atari_vae, `configs/atari_vae.py`, 450
steps) on real Pong frames the emulator plays now, from a seed its training
recordings never used: encode -> decode keeps the frame, and decoding one
latent frame at a time gives the same frames.

The threshold is relative to what the latent grid alone could carry: the
latents are a 16x16 grid (s = 4) of 8 channels per 2 frames, 1024 numbers a
frame; a 16x16 area-downsampled RGB frame, upsampled back, carries 768 and
scores 19.5 dB here. A VAE worth its decode beats that by a wide margin: the
shipped one measures 28.4 dB (SSIM 0.94), so the bar is the baseline + 8 dB
and SSIM 0.9. On the pixels that move (ball and paddles, 0.7% of a frame) it
does NOT yet beat the baseline (16.1 vs 18.0 dB: it draws the court, walls
and score but not the paddles and ball), which the test reports but does
not require; that is why configs/atari.py stays in pixel space.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aapt_jax.data.worlds.atari import AtariWorld
from aapt_jax.image_utils import resize_area
from aapt_jax.inference.quality import psnr, ssim
from aapt_jax.loading import load_trained_vae, shipped_export

SHIPPED_VAE = shipped_export("atari_vae")
HELD_OUT_SEED = 1000         # recordings for training use seeds 1..24 (configs/atari.py:full)
CLIP_STARTS = (40, 100, 160)  # ball in play in each
CLIP_FRAMES = 9               # 1 + 4r: 5 latent frames


@pytest.fixture(scope="module")
def shipped():
  if not os.path.isfile(os.path.join(SHIPPED_VAE, "export.json")):
    pytest.fail(f"no shipped VAE at {SHIPPED_VAE}")
  config, vae, params = load_trained_vae(SHIPPED_VAE)
  world = AtariWorld("Pong", size=vae.spec.frame_size, frame_skip=config.data.frame_skip)
  frames = world.record_episode(seed=HELD_OUT_SEED, max_frames=200).frames
  clips = np.stack([frames[s:s + CLIP_FRAMES] for s in CLIP_STARTS])  # [3, 9, 64, 64, 3]
  variables = {"params": params}
  video = jnp.asarray(clips, jnp.float32) / 127.5 - 1.0
  latents, _ = jax.jit(lambda v: vae.apply(variables, v, method="encode"))(video)
  decoded = jax.jit(lambda z: vae.apply(variables, z, method="decode"))(latents)
  to_uint8 = lambda x: np.asarray(jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255), np.uint8)
  return dict(vae=vae, variables=variables, clips=clips, latents=latents,
              recon=to_uint8(decoded), to_uint8=to_uint8)


def _moving_psnr(frames, clips):
  """PSNR over the pixels that change between consecutive real frames."""
  moving = np.any(clips[:, 1:] != clips[:, :-1], axis=-1)  # [N, T-1, H, W]
  assert moving.mean() > 0.001, "no motion in the held-out clips"
  err = frames[:, 1:].astype(np.float64) - clips[:, 1:].astype(np.float64)
  return 10.0 * np.log10(255.0 ** 2 / np.mean(np.square(err[moving])))


def test_the_shipped_vae_reconstructs_held_out_pong(shipped):
  clips, recon = shipped["clips"], shipped["recon"]
  s = shipped["vae"].spec.spatial_factor
  baseline = np.repeat(np.repeat(resize_area(clips, clips.shape[-2] // s), s, -3), s, -2)
  vae_all, base_all = psnr(recon, clips), psnr(baseline, clips)
  frames = lambda v: v.reshape((-1,) + v.shape[-3:])
  vae_ssim = np.mean([ssim(a, b) for a, b in zip(frames(recon), frames(clips))])
  print(f"held-out Pong: VAE {vae_all:.2f} dB (SSIM {vae_ssim:.3f}), moving pixels "
        f"{_moving_psnr(recon, clips):.2f} dB; 4x area baseline {base_all:.2f} dB, moving "
        f"{_moving_psnr(baseline, clips):.2f} dB")
  assert vae_all > base_all + 8.0, (vae_all, base_all)   # measured 28.4 vs 19.5
  assert vae_ssim > 0.9, vae_ssim                        # measured 0.94


def test_the_shipped_vae_streams_what_it_decodes_whole(shipped):
  """decode_step one latent frame at a time (what a session does) equals the
  whole-clip decode: r frames per step, latent 0's single frame last."""
  vae, variables, latents = shipped["vae"], shipped["variables"], shipped["latents"][:1]
  r = vae.spec.temporal_factor
  step = jax.jit(lambda z, c: vae.apply(variables, z, c, method="decode_step"))
  cache = vae.init_decode_cache(1)
  frames = []
  for i in range(latents.shape[1]):
    out, cache = step(latents[:, i:i + 1], cache)  # [1, r, H, W, 3]
    frames.append(out[:, -1:] if i == 0 else out)
  streamed = shipped["to_uint8"](jnp.concatenate(frames, axis=1))
  assert streamed.shape[1] == 1 + (latents.shape[1] - 1) * r
  diff = np.abs(streamed.astype(int) - shipped["recon"][:1].astype(int))
  assert diff.max() <= 1, diff.max()  # float rounding at the uint8 boundary only
