"""Generating a video of the embedded world: start frame, actions, 1NFE stream, mp4."""
from __future__ import annotations

import json
import os
import time

import flax.linen as nn
import jax
import numpy as np
from tqdm import tqdm

from aapt_jax.data import pipeline
from aapt_jax.data.video_io import VideoWriter
from aapt_jax.inference.generate import generate_latents, make_step_fn
from aapt_jax.models import build_generator, init_params


def _world(config):
  if config.data.world != "atari":
    raise ValueError(f"config field data.world={config.data.world!r}: video generation needs "
                     "a world for the start frame; only 'atari' exists so far")
  if not config.data.space_to_depth:
    raise NotImplementedError("latent-space worlds need the video VAE (not yet available); "
                              "use a pixel-space config (data.space_to_depth > 0)")
  from aapt_jax.data.worlds.atari import AtariWorld
  return AtariWorld(config.data.game, size=config.data.frame_size,
                    frame_skip=config.data.frame_skip)


def load_actions(spec: str, world, num_frames: int, seed: int) -> list[int]:
  """'random' (sticky-random policy) or a JSON file with a list of ids or names."""
  if spec == "random":
    from aapt_jax.data.worlds.atari import StickyRandomPolicy
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
    if isinstance(a, str):
      if a.upper() not in world.action_names:
        raise ValueError(f"unknown action name {a!r}; {world.game} has {world.action_names}")
      out.append(world.action_names.index(a.upper()))
    elif isinstance(a, int) and 0 <= a < world.num_actions:
      out.append(a)
    else:
      raise ValueError(f"invalid action {a!r}: ids are 0..{world.num_actions - 1}")
  return out


def generate_video(config, *, checkpoint=None, frames=48, actions="random", seed=0,
                   out="sample.mp4", steps=0):
  """Streams `frames` latent frames into an mp4; returns (path, stats dict)."""
  if frames < 1:
    raise ValueError(f"--frames must be >= 1, got {frames}")
  if checkpoint:
    from aapt_jax.checkpointing import load_generator_params, resolve_step_dir
    config, params = load_generator_params(checkpoint)  # the model it was trained as
    print(f"generate: EMA generator from {resolve_step_dir(checkpoint)}")
    model = build_generator(config)
  else:
    print("generate: no --checkpoint: an UNTRAINED model (random weights) — the video "
          "shows the pipeline running, not a learned world")
    model = build_generator(config)
    params = nn.meta.unbox(init_params(model, jax.random.key(seed)))["params"]
  world = _world(config)
  if model.spec.num_actions and world.num_actions > model.spec.num_actions:
    raise ValueError(f"{world.game} has {world.num_actions} actions but model.num_actions="
                     f"{model.spec.num_actions}")
  action_ids = load_actions(actions, world, frames, seed)
  first = pipeline.pixels_to_latents(world.reset(seed), config.data.space_to_depth)
  s = config.data.space_to_depth
  if steps == 0:  # auto: a stage-1 model is a diffusion model and needs several steps
    steps = 16 if config.stage == "diffusion" and checkpoint else 1
  print(f"generate: {steps} forward(s) per latent frame"
        + (" (1NFE)" if steps == 1 else " (Euler sampler for a diffusion-stage model)"))
  step = make_step_fn(model, steps, config.diffusion.timestep_shift)
  t0 = time.perf_counter()
  stats = []
  with VideoWriter(out, world.fps, (config.data.frame_size,) * 2) as writer:
    bar = tqdm(generate_latents(model, params, first, action_ids, frames, seed, step),
               total=frames, unit="frame", desc="generate")
    for latent in bar:
      frame = pipeline.latents_to_pixels(latent, s)
      writer.write(frame)
      stats.append((frame.mean(), frame.std()))
  seconds = time.perf_counter() - t0
  return out, dict(frames=frames, steps_per_frame=steps, seconds=round(seconds, 2),
                   frames_per_s=round(frames / seconds, 1), fps=world.fps,
                   mean_pixel=round(float(np.mean([m for m, _ in stats])), 1))
