"""Helpers for the command lines: one-line errors instead of tracebacks."""
from __future__ import annotations

import sys


def fail(program: str, error: BaseException, code: int = 2):
  """Prints `program: error: message` on stderr and exits with `code`."""
  print(f"{program}: error: {error}", file=sys.stderr)
  sys.exit(code)
