"""The repository passes `ruff check` with its ruff.toml (pyflakes, bugbear,
pyupgrade, pycodestyle errors): CI runs the linter through the test command."""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_check_passes():
  ruff = shutil.which("ruff")
  if ruff is None:
    pytest.fail("ruff is not installed: pip install -e '.[test]' installs it")
  out = subprocess.run([ruff, "check", "--no-cache", ROOT], capture_output=True, text=True,
                       cwd=ROOT)
  assert out.returncode == 0, f"ruff check found problems:\n{out.stdout}{out.stderr}"
