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


def _not_orbax_info(record) -> bool:
  """Orbax logs every checkpoint step at INFO; keep its warnings only."""
  return (record.levelno >= python_logging.WARNING
          or f"{os.sep}orbax{os.sep}" not in record.pathname)


def log_training_info() -> None:
  """absl logging at INFO (the trainer's messages), Orbax at WARNING."""
  from absl import logging
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_not_orbax_info)
