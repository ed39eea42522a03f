"""Evaluates a world model against its emulator and writes a report.

  python launch/evaluate.py --checkpoint=DIR --out=eval_report

The model rolls out open loop from the emulator's start frames while the
emulator replays the same (sticky-random) actions, over several seeds; the
report (report.json, report.md, PNG plots) gives PSNR, SSIM, FVD, object
presence and position from the emulator's RAM, action following and drift per
horizon, with spreads over seeds, next to trivial predictors on the same frames.
"""
import os
import sys

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from aapt_jax.cli import define_evaluation_flags  # noqa: E402

flags.DEFINE_string("checkpoint", "", "Run, stage, step or export directory; empty = the "
                    "shipped export.")
flags.DEFINE_string("out", "eval_report", "Folder for report.json, report.md and the plots.")
flags.DEFINE_integer("steps", 0, "Forwards per latent frame (0 = auto: 16 for a stage-1 "
                     "diffusion checkpoint, else 1).")
define_evaluation_flags(frames=1440, teacher_forced_frames=240, fvd=True)
FLAGS = flags.FLAGS


def main(_):
  logging.set_verbosity(logging.WARNING)
  from aapt_jax.cli import evaluation_settings, fail
  from aapt_jax.evaluation.report import write_report
  from aapt_jax.evaluation.suite import evaluate
  from aapt_jax.inference.session import StreamingSession
  try:
    settings = evaluation_settings(FLAGS)
    session = StreamingSession.load(FLAGS.checkpoint or None, sampler_steps=FLAGS.steps)
    result = evaluate(session, settings)
  except (ValueError, FileNotFoundError, ImportError) as e:
    fail("evaluate", e)
  paths = write_report(result, FLAGS.out)
  print(f"evaluate: wrote {', '.join(sorted(paths.values()))} in {result['seconds']} s")


if __name__ == "__main__":
  app.run(main)
