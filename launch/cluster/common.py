"""What the SLURM and TPU-pod launchers share: the one `launch/train.py`
command every process runs, and the shared-storage paths it needs."""
from __future__ import annotations

import argparse
import os
import shlex
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def add_run_flags(p: argparse.ArgumentParser) -> None:
  """The flags of the run itself (config, workdir, compilation cache, extras)."""
  p.add_argument("--config", required=True,
                 help="launch/train.py --config, relative to the repository, e.g. "
                      "configs/aapt_8b.py or configs/atari.py:exp")
  p.add_argument("--workdir", required=True,
                 help="the run directory, an absolute path on storage every host mounts "
                      "(checkpoints, TensorBoard, summary.json); a rerun resumes from it")
  p.add_argument("--cache_dir", default="",
                 help="JAX's persistent compilation cache (JAX_COMPILATION_CACHE_DIR), "
                      "absolute, on shared storage; default WORKDIR/jax_cache")
  p.add_argument("--python", default="python", help="the interpreter on the hosts")
  p.add_argument("--setup", action="append", default=[],
                 help="a shell line run first on every host (repeatable), e.g. "
                      "'source ~/venv/bin/activate' or 'module load cuda/12.4'")
  p.add_argument("train_flags", nargs="*",
                 help="more launch/train.py flags, after --, e.g. -- --config.train.steps=1000")


def shared_paths(args) -> tuple[str, str]:
  """(workdir, compilation cache dir), both absolute; ValueError otherwise."""
  for name in ("workdir", "cache_dir"):
    path = getattr(args, name)
    if path and not os.path.isabs(path):
      raise ValueError(f"--{name}={path} must be an absolute path on storage every host "
                       f"mounts (each host resolves a relative one on its own)")
  return args.workdir, args.cache_dir or os.path.join(args.workdir, "jax_cache")


def train_command(args, extra: tuple[str, ...] = ()) -> str:
  """`python launch/train.py --config=... --workdir=... [extra] [train flags]`,
  each word shell-quoted."""
  words = [args.python, "launch/train.py", f"--config={args.config}",
           f"--workdir={args.workdir}", *extra, *args.train_flags]
  return shlex.join(words)


def run_main(name: str, parse, render, argv=None) -> int:
  """A launcher's command line: `render(parse(argv))` to stdout; exit 0, or
  2 with "NAME: error: ..." on stderr for a ValueError (bad flags)."""
  args = parse(argv)
  try:
    sys.stdout.write(render(args))
  except ValueError as e:
    print(f"{name}: error: {e}", file=sys.stderr)
    return 2
  return 0

