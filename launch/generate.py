"""Generates a video, one latent frame per forward pass, and writes an mp4.

  python launch/generate.py --config=configs/atari.py --frames=48 --out=sample.mp4

The first frame is the real start frame of the world (the emulator's); every
later frame is generated. Actions are random (a seeded sticky-random policy)
or read from a JSON list of action ids or names with --actions=FILE.
--side_by_side puts the real emulator, playing the same actions, on the right.
Frames go to the file as they are made: memory stays flat for any --frames.
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

config_flags.DEFINE_config_file("config", "configs/atari.py", "Config file.", lock_config=False)
flags.DEFINE_string("workdir", "", "Run directory (used when --checkpoint is empty).")
flags.DEFINE_string("checkpoint", "", "Run, stage, step or export directory; empty = the "
                    "shipped export (aapt_jax/assets/atari), else untrained random weights.")
flags.DEFINE_integer("frames", 48, "Latent frames to generate (>= 1).")
flags.DEFINE_string("actions", "random", "'random' or a JSON file with a list of actions.")
flags.DEFINE_integer("seed", 0, "Seed of the start frame, the policy and the noise.")
flags.DEFINE_string("out", "sample.mp4", "Output mp4 path.")
flags.DEFINE_integer("steps", 0, "Forwards per latent frame: 1 = 1NFE; 0 = auto (16 Euler "
                     "steps for a stage-1 diffusion checkpoint, else 1).")
flags.DEFINE_bool("side_by_side", False, "Write [generated | emulator] frames, the emulator "
                  "playing the same actions.")
FLAGS = flags.FLAGS


def main(_):
  logging.set_verbosity(logging.WARNING)
  from aapt_jax.cli import fail
  from aapt_jax.inference.video import generate_video
  try:
    path, stats = generate_video(FLAGS.config, checkpoint=FLAGS.checkpoint or FLAGS.workdir or None,
                                 frames=FLAGS.frames, actions=FLAGS.actions, seed=FLAGS.seed,
                                 out=FLAGS.out, steps=FLAGS.steps,
                                 side_by_side=FLAGS.side_by_side)
  except (ValueError, FileNotFoundError, NotImplementedError) as e:
    fail("generate", e)
  print(f"wrote {path}: {stats}")


if __name__ == "__main__":
  app.run(main)
