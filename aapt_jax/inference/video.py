"""Generating a video of the embedded world: start frame, actions, a
StreamingSession one latent frame at a time, frames streamed into an mp4
(constant memory however many frames), optionally side by side with the real
emulator playing the same actions. The stats include PSNR/SSIM against
that replay and noise/frozen-image statistics (inference/quality.py)."""
from __future__ import annotations

import json
import os
import time

import flax.linen as nn
import jax
import numpy as np
from tqdm import tqdm

from aapt_jax.data.video_io import VideoWriter
from aapt_jax import loading
from aapt_jax.data import worlds
from aapt_jax.inference.decoders import uses_vae
from aapt_jax.inference.quality import VideoQuality
from aapt_jax.inference.session import StreamingModel, StreamingSession
from aapt_jax.models import build_generator, build_vae, init_params, init_vae_params


def load_actions(spec: str, world, num_frames: int, seed: int) -> list:
  """The `num_frames` inputs of a video: action ids, or in a camera world
  (control_dim > 0) control vectors (float32 [control_dim]).

  'random': the world's recording policy (sticky-random ids; in a camera
  world the explorer, played in the emulator from `seed`, zeros after its
  episode ends); else a JSON file with a list of ids or names (or of
  control vectors)."""
  if spec == "random":
    if world.control_dim:
      controls = world.record_episode(seed, max_frames=num_frames).controls  # [T, A]
      pad = np.zeros((num_frames - len(controls), world.control_dim), np.float32)
      return list(np.concatenate([controls, pad]))
    from aapt_jax.data.worlds.policies import StickyRandomPolicy
    policy = StickyRandomPolicy(world.num_actions, seed=seed)
    return [world.noop] + [policy() for _ in range(num_frames - 1)]
  if not os.path.isfile(spec):
    raise FileNotFoundError(f"--actions: {spec!r} is neither 'random' nor an existing JSON file")
  with open(spec) as f:
    raw = json.load(f)
  if not isinstance(raw, list) or len(raw) < num_frames:
    raise ValueError(f"--actions file {spec} must hold a list of at least {num_frames} actions")
  out = []
  for a in raw[:num_frames]:
    if world.control_dim:
      u = np.asarray(a, np.float32) if isinstance(a, list) else None
      if u is None or u.shape != (world.control_dim,) or np.any(np.abs(u) > 1):
        raise ValueError(f"invalid control vector {a!r}: {world.game} takes lists of "
                         f"{world.control_dim} floats in [-1, 1]")
      out.append(u)
    elif isinstance(a, str):
      if a.upper() not in world.action_names:
        raise ValueError(f"unknown action name {a!r}; {world.game} has {world.action_names}")
      out.append(world.action_names.index(a.upper()))
    elif isinstance(a, int) and 0 <= a < world.num_actions:
      out.append(a)
    else:
      raise ValueError(f"invalid action {a!r}: ids are 0..{world.num_actions - 1}")
  return out


def _random_model(config, seed: int, steps: int) -> StreamingModel:
  print("generate: no --checkpoint and no shipped export: an UNTRAINED model (random "
        "weights) — the video shows the pipeline running, not a learned world")
  params = nn.meta.unbox(init_params(build_generator(config), jax.random.key(seed)))["params"]
  vae_params = None
  if uses_vae(config):
    vae_params = nn.meta.unbox(init_vae_params(build_vae(config), jax.random.key(seed + 1)))
    vae_params = vae_params["params"]
  return StreamingModel(config, params, vae_params, sampler_steps=steps or 1)


def load_model(config, checkpoint: str | None, seed: int = 0, steps: int = 0) -> StreamingModel:
  """The checkpoint's model; without one the shipped export, else `config` at random init."""
  if checkpoint or loading.DEFAULT_EXPORT in loading.shipped_exports():
    model = StreamingModel.load(checkpoint or None, sampler_steps=steps)
    print(f"generate: EMA generator from {model.source}")
    return model
  return _random_model(config, seed, steps)


class _FrameStats:
  """Running mean/std of the written pixels (no frame is kept)."""

  def __init__(self):
    self.n, self.total, self.squares = 0, 0.0, 0.0

  def add(self, frame: np.ndarray) -> None:
    x = frame.astype(np.float64)
    self.n, self.total, self.squares = self.n + x.size, self.total + x.sum(), \
        self.squares + np.square(x).sum()

  def summary(self) -> dict:
    mean = self.total / self.n
    return dict(mean_pixel=round(float(mean), 1),
                std_pixel=round(float(np.sqrt(max(self.squares / self.n - mean ** 2, 0.0))), 1))


def generate_video(config, *, checkpoint=None, frames=48, actions="random", seed=0,
                   out="sample.mp4", steps=0, side_by_side=False):
  """Streams `frames` latent frames into an mp4; returns (path, stats dict).

  The emulator replays the same actions (each held for one latent frame) for
  the quality numbers; with `side_by_side` each video frame is
  [generated | emulator]."""
  if frames < 1:
    raise ValueError(f"--frames must be >= 1, got {frames}")
  model = load_model(config, checkpoint, seed, steps)
  world = model.world
  if world is None:
    raise ValueError(f"config field data.world={model.config.data.world!r}: video generation "
                     "needs a world for the start frame and actions: one of "
                     f"{', '.join(worlds.NAMES)}")
  action_ids = load_actions(actions, world, frames, seed)
  print(f"generate: {model.sampler_steps} forward(s) per latent frame"
        + (" (1NFE)" if model.sampler_steps == 1 else " (Euler sampler for a diffusion-stage "
                                                       "model)"))
  session = StreamingSession(model, seed=seed)
  k = model.frames_per_latent
  h, w = model.frame_size
  stats = _FrameStats()
  # PSNR/SSIM early = within the training clip length, late = beyond it
  quality = VideoQuality(split=int(model.config.train.clip_frames) * k)
  first = real = world.reset(seed)  # the emulator's first frame starts both sides
  t0 = time.perf_counter()
  with VideoWriter(out, world.fps, (h, 2 * w if side_by_side else w)) as writer, \
      tqdm(total=frames * k, unit="frame", desc="generate") as bar:
    for i in range(frames):
      video = session.start(first) if i == 0 else session.step(action_ids[i])
      for frame in video:  # [H, W, 3]
        stats.add(frame)
        if i and not world.game_over():
          real = world.step(action_ids[i])[0]
        quality.add(frame, real)
        writer.write(np.concatenate([frame, real], axis=1) if side_by_side else frame)
        bar.update(1)
  seconds = time.perf_counter() - t0
  return out, dict(frames=frames, video_frames=frames * k, steps_per_frame=model.sampler_steps,
                   seconds=round(seconds, 2), frames_per_s=round(frames * k / seconds, 1),
                   fps=world.fps, **stats.summary(), **quality.summary())
