"""Evaluates several models on the same emulator episodes, side by side.

  python launch/compare.py --out=DIR \
      --arms=stage1_16=RUN/diffusion@16,stage1=RUN/diffusion,stage2=RUN/consistency,stage3=RUN/adversarial

Each arm is name=DIR[@STEPS]: a run, stage, step or export directory sampled
with STEPS forwards per latent frame (default 1). Writes compare.json,
compare.md (per metric: one row per arm and the trivial predictors, one
column per horizon, mean ± std over seeds) and compare_*.png.
"""
import os
import sys

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

flags.DEFINE_list("arms", [], "name=DIR or name=DIR@STEPS, comma separated.")
flags.DEFINE_string("out", "compare_report", "Folder for compare.json, compare.md, plots.")
flags.DEFINE_string("title", "Comparison", "compare.md's title.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of the games, the policy and the noise.")
flags.DEFINE_integer("frames", 120, "Latent frames to roll out after the start frame.")
flags.DEFINE_integer("teacher_forced_frames", 48, "Frames that get each arm's one-step "
                     "teacher-forced prediction.")
flags.DEFINE_bool("fvd", False, "FVD with I3D at the training clip and 10x.")
flags.DEFINE_integer("horizon_clip", 0, "Cut the horizons by this clip length (the clip, "
                     "10/3 and 10 clips, ...), e.g. 12 to score a model trained on 8-frame "
                     "clips on the shipped world's frame ranges; 0 = each checkpoint's own.")
flags.DEFINE_list("horizons", [], "The horizons' last frames, e.g. 40,80,120 for the thirds "
                  "of 120 frames; empty = cut by the clip (the clip, 10/3, 10, 40, 120 clips).")
FLAGS = flags.FLAGS


def main(_):
  logging.set_verbosity(logging.WARNING)
  from aapt_jax.cli import fail, whole_numbers
  from aapt_jax.evaluation.compare import compare, parse_arms, write_comparison
  from aapt_jax.evaluation.suite import Settings
  try:
    arms = parse_arms(FLAGS.arms)
    settings = Settings(seeds=whole_numbers(FLAGS.seeds, "--seeds"), frames=FLAGS.frames,
                        teacher_forced_frames=FLAGS.teacher_forced_frames, fvd=FLAGS.fvd,
                        horizon_clip=FLAGS.horizon_clip,
                        horizons=whole_numbers(FLAGS.horizons, "--horizons"))
    result = compare(arms, settings)
  except (ValueError, FileNotFoundError, ImportError) as e:
    fail("compare", e)
  paths = write_comparison(result, FLAGS.out, FLAGS.title)
  print(f"compare: wrote {', '.join(sorted(paths.values()))}")


if __name__ == "__main__":
  app.run(main)
