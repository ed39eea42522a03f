"""launch/generate.py's library: a playable mp4 with the requested frames,
side by side with the emulator replaying the same actions."""
import json

import numpy as np

from aapt_jax.data.video_io import read_video
from aapt_jax.data.worlds.atari import AtariWorld
from aapt_jax.inference.quality import change, psnr, roughness
from aapt_jax.inference.video import generate_video
from streaming_helpers import TINY_ATARI, write_tiny_export

# The tiny Atari world in VAE latents: 8x8 frames, r = 2 video frames per latent frame.
TINY_ATARI_VAE = tuple(kv for kv in TINY_ATARI if kv[0] not in (
    "model.latent_channels", "data.frame_size", "data.space_to_depth")) + (
    ("data.frame_size", 8), ("data.space_to_depth", 0), ("vae.base_dim", 8), ("vae.z_dim", 4),
    ("vae.dim_mult", (1, 2)), ("vae.num_res_blocks", 1), ("vae.temperal_downsample", (True,)),
    ("vae.latents_mean", (0.0,) * 4), ("vae.latents_std", (1.0,) * 4))


def _close(a, b):
  """Mean absolute difference of two uint8 videos (H.264 is lossy)."""
  return np.abs(a.astype(int) - b.astype(int)).mean()


def test_generate_writes_the_requested_frames_side_by_side(tmp_path):
  export = write_tiny_export(tmp_path / "export")
  actions = ["NOOP"] + ["LEFT", "LEFT", "FIRE", "RIGHT"] * 3  # 13 latent frames
  with open(tmp_path / "actions.json", "w") as f:
    json.dump(actions, f)
  out = str(tmp_path / "video.mp4")
  path, stats = generate_video(None, checkpoint=export, frames=13,
                               actions=str(tmp_path / "actions.json"), seed=2, out=out,
                               side_by_side=True)
  video = read_video(path)
  assert video.shape == (13, 16, 32, 3) and stats["video_frames"] == 13
  world = AtariWorld("Pong", size=16)
  real = world.replay([world.action_names.index(a) for a in actions], seed=2)
  assert _close(video[:, :, 16:], real) < 8  # the right half: the emulator, same actions
  assert _close(video[0, :, :16], real[0]) < 8  # the stream starts from the real frame
  assert _close(video[1:, :, :16], real[1:]) > 20  # then it is the (untrained) model's
  # the quality numbers compare the generated frames with that same replay
  np.testing.assert_allclose(stats["real_roughness"],
                             np.mean([roughness(f) for f in real[1:]]), atol=1e-3)
  np.testing.assert_allclose(stats["real_change"],
                             np.mean([change(b, a) for a, b in zip(real, real[1:])]), atol=1e-3)
  early = np.mean([psnr(g, r) for g, r in zip(video[1:5, :, :16], real[1:5])])  # clip 5
  assert abs(stats["psnr_early"] - early) < 3  # H.264 moves noise-like frames ~2 dB


def test_generate_in_vae_latents_writes_r_frames_per_latent_frame(tmp_path):
  export = write_tiny_export(tmp_path / "export", TINY_ATARI_VAE)
  path, stats = generate_video(None, checkpoint=export, frames=4, seed=1,
                               out=str(tmp_path / "vae.mp4"), side_by_side=True)
  video = read_video(path)
  assert video.shape == (8, 8, 16, 3) and stats["video_frames"] == 8  # 4 latents x r = 2
  world = AtariWorld("Pong", size=8)
  first = world.reset(1)
  assert _close(video[0, :, 8:], first) < 8 and _close(video[1, :, 8:], first) < 8
