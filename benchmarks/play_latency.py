"""What a player gets: video frames/s and action-to-frame latency of a
StreamingSession, with and without decode, against the 24 fps real-time bar;
and frames/s at latent frame 1 vs deep into the stream.

  python benchmarks/play_latency.py [--configs atari,atari_vae] [--frames 1440]

Rows per world: `generator` (the generator's frame alone, latent to host: no
decode), `session` (StreamingSession.step: generator + decode + uint8 frames
on the host), `session+jpeg` (plus the page's JPEG encode: what the server
does per step). The action-to-frame latency of a step is its wall time: the
action goes in with the call and the first frame showing it comes out (the
page adds network and display). `atari` and `doom` (a camera world: random
control vectors) are pixel-space worlds (decode =
depth-to-space); `atari_vae` decodes with the causal VAE (r = 2 video frames
per latent frame). The shipped export is used where it exists; otherwise the
weights are random (same compute: speed does not depend on the values).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import flax.linen as nn
import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import config_names, device_line  # noqa: E402
from aapt_jax import load_config  # noqa: E402
from aapt_jax import loading  # noqa: E402
from aapt_jax.export import export_stage  # noqa: E402
from aapt_jax.inference.server import encode_frame  # noqa: E402
from aapt_jax.inference.session import StreamingModel, StreamingSession  # noqa: E402
from aapt_jax.inference.session import make_frame_fn  # noqa: E402
from aapt_jax.models import build_generator, build_vae, init_params, init_vae_params  # noqa: E402

CONFIGS = {"atari": "configs/atari.py", "atari_vae": "configs/atari_vae.py",
           "doom": "configs/doom.py"}
BAR_FPS = 24.0
WARMUP = 5


def load_model(name):
  """(StreamingModel, where its weights come from)."""
  if name in loading.shipped_exports() and export_stage(loading.shipped_export(name)) != "vae":
    return StreamingModel.load(name), "shipped export"
  config = load_config(os.path.join(ROOT, CONFIGS[name]), {"stage": "adversarial"})
  params = nn.meta.unbox(init_params(build_generator(config), jax.random.key(0)))["params"]
  vae = (nn.meta.unbox(init_vae_params(build_vae(config), jax.random.key(1)))["params"]
         if not config.data.space_to_depth else None)
  return StreamingModel(config, params, vae), "random init (no shipped export)"


def timed(fn, n):
  """Wall times (s) of n calls of fn after WARMUP calls."""
  for _ in range(WARMUP):
    fn()
  out = []
  for _ in range(n):
    t0 = time.perf_counter()
    fn()
    out.append(time.perf_counter() - t0)
  return np.asarray(out)


def bench(name, frames, samples):
  model, source = load_model(name)
  rng = np.random.default_rng(0)
  if model.num_actions:
    act = lambda: int(rng.integers(model.num_actions))
  else:  # a camera world: a random control vector in [-1, 1]
    act = lambda: rng.uniform(-1, 1, model.control_dim).astype(np.float32)
  k = model.frames_per_latent
  rows = []

  # the generator alone (the session's sampler, no decode), the latent fetched to host
  gen = make_frame_fn(model.step_generator, model.sampler_steps,
                      float(model.config.diffusion.timestep_shift))
  s = model.generator.spec
  key = jax.random.key(0)
  x = jax.numpy.zeros((1, 1, *s.latent_size, s.latent_channels))
  state = {"x": x, "cache": model.generator.init_cache(1), "i": 0}
  controls = jax.numpy.zeros((1, 1, s.control_dim)) if s.control_dim else None

  def generator_step():
    a = jax.numpy.full((1, 1), int(rng.integers(s.num_actions)), jax.numpy.int32) \
        if s.num_actions else None
    state["x"], state["cache"] = gen(model.step_params, key, jax.numpy.int32(state["i"]),
                                     state["x"], state["cache"], a, controls, None, None)
    state["i"] += 1
    np.asarray(state["x"])
  rows.append(("generator", timed(generator_step, samples)))

  session = StreamingSession(model)
  session.start()
  rows.append(("session", timed(lambda: session.step(act()), samples)))

  def with_jpeg():
    for j, f in enumerate(session.step(act())):
      encode_frame(f, j, 0, 0, 90)
  rows.append(("session+jpeg", timed(with_jpeg, samples)))

  # deep into the stream: frames/s around latent frame 1 and around `frames`
  session.start()
  early = timed(lambda: session.step(act()), 20)  # latent frames 6..25
  while session.frame_index < frames - 20:
    session.step(act())
  late = timed(lambda: session.step(act()), 20)
  return model, source, k, rows, early, late, session.frame_index - 1


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--configs", default="atari,atari_vae")
  p.add_argument("--frames", type=int, default=1440, help="latent frame of the deep measurement")
  p.add_argument("--samples", type=int, default=100, help="timed steps per row")
  args = p.parse_args()
  if args.frames < 60:
    sys.exit("--frames must be >= 60")
  print(device_line())
  print(f"real-time bar: {BAR_FPS:.0f} video frames/s\n")
  header = (f"{'world':10s} {'row':13s} {'k':>2s} {'p50 ms':>8s} {'p95 ms':>8s} "
            f"{'video fps':>10s} {'x bar':>6s} {'x gen':>6s}")
  deep = []
  print(header)
  print("-" * len(header))
  for name in config_names(args.configs, CONFIGS):
    model, source, k, rows, early, late, last = bench(name, args.frames, args.samples)
    base = np.mean(rows[0][1])
    for row, t in rows:
      fps = k / np.mean(t)
      print(f"{name:10s} {row:13s} {k:2d} {np.percentile(t, 50) * 1e3:8.1f} "
            f"{np.percentile(t, 95) * 1e3:8.1f} {fps:10.1f} {fps / BAR_FPS:6.2f} "
            f"{base / np.mean(t):6.2f}")
    deep.append((name, k, early, late, last, source, model.sampler_steps))
  print("\nframes/s deep into the stream (session.step, median of 20 steps):")
  print(f"{'world':10s} {'latent 6-25':>12s} {'latent ~' + str(args.frames):>14s} {'ratio':>6s}"
        "  weights")
  for name, k, early, late, last, source, steps in deep:
    a, b = k / np.median(early), k / np.median(late)
    print(f"{name:10s} {a:12.1f} {b:14.1f} {b / a:6.2f}  {source}, {steps} forward(s)/frame, "
          f"last latent frame {last}")


if __name__ == "__main__":
  main()
