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

from aapt_jax.cli import define_evaluation_flags  # noqa: E402

flags.DEFINE_list("arms", [], "name=DIR or name=DIR@STEPS, comma separated.")
flags.DEFINE_string("out", "compare_report", "Folder for compare.json, compare.md, plots.")
flags.DEFINE_string("title", "Comparison", "compare.md's title.")
define_evaluation_flags(frames=120, teacher_forced_frames=48, fvd=False)
FLAGS = flags.FLAGS


def main(_):
  logging.set_verbosity(logging.WARNING)
  from aapt_jax.cli import evaluation_settings, fail
  from aapt_jax.evaluation.compare import compare, parse_arms, write_comparison
  try:
    arms = parse_arms(FLAGS.arms)
    settings = evaluation_settings(FLAGS)
    result = compare(arms, settings)
  except (ValueError, FileNotFoundError, ImportError) as e:
    fail("compare", e)
  paths = write_comparison(result, FLAGS.out, FLAGS.title)
  print(f"compare: wrote {', '.join(sorted(paths.values()))}")


if __name__ == "__main__":
  app.run(main)
