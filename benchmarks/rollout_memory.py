"""Stage 3's cost versus rollout length: compiled memory (and time) of one
adversarial step for `adversarial.gradient` = scan and recompute, with and
without per-block remat, next to a stage-1 (teacher-forcing) step over the
same number of frames.

  python benchmarks/rollout_memory.py [--configs tiny,atari] [--lengths 8,32,128]
                                      [--time_lengths 8]

One device. Memory is XLA's compiled memory analysis of the jitted, donated
step (temp = activations and other scratch; args = train state + batch), so
it is exact for the program and independent of machine load. Time is the
median of 3 runs after a warm-up, only for --time_lengths (a 128-frame
atari step takes minutes on 2 CPU cores). Segments: adversarial.segment_frames
with adversarial.segment_overlap, as the config sets them; the real clips are
one segment long.

For configs/aapt_8b.py on a fake TPU mesh see benchmarks/aot_8b.py (stage 1)
and benchmarks/wan_1_3b.py (stage 3 for the 1.3B).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from aapt_jax import load_config, parallel  # noqa: E402
from aapt_jax.training.program import build_train_program, with_stage  # noqa: E402
from benchmarks.common import config_names, device_line  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"tiny": "configs/tiny.py", "atari": "configs/atari.py"}
MIB = 1 << 20


def _batch(config, length, adversarial):
  m = config.model
  h, w = m.latent_size
  b = config.train.batch_size
  seg = config.adversarial.segment_frames
  frames = seg if adversarial else length
  batch = {"latents": jnp.zeros((b, frames, h, w, m.latent_channels))}
  if m.num_actions:
    batch["actions"] = jnp.zeros((b, frames), jnp.int32)
  if adversarial:
    batch["rollout_first"] = jnp.zeros((b, h, w, m.latent_channels))
    if m.num_actions:
      batch["rollout_actions"] = jnp.zeros((b, length), jnp.int32)
  return batch


def measure(config, length, kind, time_it):
  """(temp MiB, args MiB, seconds or None) of one step of `kind`."""
  adversarial = kind != "teacher_forcing"
  with config.unlocked():
    config.train.clip_frames = length
    config.adversarial.rollout_frames = length
    if adversarial:
      config.adversarial.gradient = kind
  config = with_stage(config, "adversarial" if adversarial else "diffusion")
  with config.unlocked():
    config.train.steps = 10
  mesh = parallel.make_mesh(config.mesh, jax.devices()[:1])
  program = build_train_program(config, mesh)
  with jax.set_mesh(mesh):
    abstract = program.abstract
    batch = _batch(config, length, adversarial)
    compiled = program.step.lower(program.abstract_state, batch).compile()
    mem = compiled.memory_analysis()
    seconds = None
    if time_it:
      state = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract)
      times = []
      for i in range(4):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        if i:
          times.append(time.perf_counter() - t0)
      seconds = statistics.median(times)
  return mem.temp_size_in_bytes / MIB, mem.argument_size_in_bytes / MIB, seconds


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--configs", default="tiny,atari")
  ap.add_argument("--lengths", default="8,32,128")
  ap.add_argument("--time_lengths", default="8", help="lengths also timed ('' = none)")
  ap.add_argument("--kinds", default="teacher_forcing,recompute,scan")
  args = ap.parse_args()
  lengths = [int(x) for x in args.lengths.split(",")]
  timed = {int(x) for x in args.time_lengths.split(",") if x}
  print(device_line())
  print(f"{'config':<7} {'remat':<5} {'frames':>6} {'kind':<16} {'temp MiB':>9} "
        f"{'x TF':>6} {'args MiB':>9} {'s/step':>7}")
  for name in config_names(args.configs, CONFIGS):
    for remat in ("none", "full"):
      for length in lengths:
        tf_temp = None
        for kind in args.kinds.split(","):
          config = load_config(os.path.join(ROOT, CONFIGS[name]),
                               {"model.remat": remat, "mesh.data": 1})
          temp, argb, secs = measure(config, length, kind, length in timed)
          if kind == "teacher_forcing":
            tf_temp = temp
          ratio = f"{temp / tf_temp:6.2f}" if tf_temp else "     -"
          print(f"{name:<7} {remat:<5} {length:>6} {kind:<16} {temp:9.1f} {ratio} "
                f"{argb:9.1f} {secs if secs is None else round(secs, 2)!s:>7}", flush=True)


if __name__ == "__main__":
  main()
