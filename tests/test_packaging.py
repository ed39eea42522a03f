"""The package outside the checkout: configs by name, and a wheel installed
into a fresh virtualenv that streams the shipped world from another folder."""
import os
import shutil
import subprocess
import sys

import pytest

from aapt_jax import load_config
from aapt_jax.config import config_names
from helpers import ROOT

WHEEL_SOURCES = ("setup.py", "README.md", "LICENSE", "aapt_jax", "configs")


def test_configs_load_by_name_as_by_path():
  assert {"atari", "atari_vae", "base", "tiny"} <= set(config_names())
  for name, path in (("atari", "configs/atari.py"), ("atari:full", "configs/atari.py:full")):
    by_name = load_config(name, {"train.steps": 3})
    by_path = load_config(os.path.join(ROOT, path), {"train.steps": 3})
    assert by_name.to_dict() == by_path.to_dict()
  assert load_config("atari:full").pipeline.to_dict() != load_config("atari").pipeline.to_dict()
  with pytest.raises(ValueError, match="unknown config name 'pong': the shipped configs are "
                     r"aapt_8b, atari, .*tiny"):
    load_config("pong")
  with pytest.raises(FileNotFoundError, match="config file not found"):
    load_config("configs/pong.py")


# What the installed wheel must do, run by the venv's python from an empty folder.
INSTALLED_CHECK = """
import os, sys
import aapt_jax, configs
from aapt_jax import load_config
from aapt_jax.inference.session import StreamingSession
venv = sys.prefix
assert aapt_jax.__file__.startswith(venv), aapt_jax.__file__
assert configs.__file__.startswith(venv), configs.__file__
session = StreamingSession.load()
first = session.start()
frames = session.step(0)
assert first.dtype.name == "uint8" and first.shape == frames.shape == (1, 64, 64, 3)
config = load_config("atari")
assert config.data.world == "atari" and session.model.config.data.game == config.data.game
print("installed:", os.path.dirname(aapt_jax.__file__), session.model.source)
"""


@pytest.mark.slow
@pytest.mark.ci
def test_the_wheel_streams_the_shipped_world_outside_the_checkout(tmp_path):
  """pip wheel --no-deps of the sources, installed --no-deps into a fresh
  venv (jax etc. from this machine's site-packages), then, from a temp folder
  with no checkout on the path: StreamingSession.load() / start() / step(0)
  and load_config("atari") work from the installed files alone."""
  src = tmp_path / "src"
  src.mkdir()
  for name in WHEEL_SOURCES:  # only what the wheel is built from: no runs/, build/, .git
    path = os.path.join(ROOT, name)
    if os.path.isdir(path):
      shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    else:
      shutil.copy(path, src / name)
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
  run = lambda *cmd, **kw: subprocess.run(cmd, capture_output=True, text=True, env=env,
                                          timeout=600, **kw)
  out = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
            "-q", "-w", str(tmp_path / "dist"), str(src))
  assert out.returncode == 0, out.stderr[-3000:]
  wheels = os.listdir(tmp_path / "dist")
  assert len(wheels) == 1 and wheels[0].endswith(".whl"), wheels
  out = run(sys.executable, "-m", "venv", "--system-site-packages", str(tmp_path / "venv"))
  assert out.returncode == 0, out.stderr[-3000:]
  python = str(tmp_path / "venv" / "bin" / "python")
  out = run(python, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
            str(tmp_path / "dist" / wheels[0]))
  assert out.returncode == 0, out.stderr[-3000:]
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  out = run(python, "-c", INSTALLED_CHECK, cwd=str(elsewhere))
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"{tmp_path / 'venv'}" in out.stdout and "assets/atari" in out.stdout
