"""launch/train_gpu_pong.sh on the CPU: records the data it is not given,
trains the stages with the GPU's dtype (bfloat16) on a tiny model, and
writes an export that streams."""
import json
import os
import subprocess

import numpy as np
import pytest

from aapt_jax.inference.session import StreamingSession

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.model.dim=32", "--config.model.num_layers=1", "--config.model.num_heads=1",
        "--config.model.ffn_dim=64", "--config.model.freq_dim=32"]


@pytest.mark.slow
@pytest.mark.ci
def test_gpu_training_script_on_cpu_with_a_tiny_model(tmp_path):
  env = dict(os.environ, BATCH="2", EPISODES="1", FRAMES="60", DIFFUSION_STEPS="2",
             CONSISTENCY_STEPS="1", STAGES="diffusion consistency", PYTHONPATH=REPO)
  out = tmp_path / "out"
  run = subprocess.run(["bash", "launch/train_gpu_pong.sh", str(out), ""] + TINY, cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=900)
  assert run.returncode == 0, (run.stdout[-2000:], run.stderr[-3000:])
  meta = json.load(open(out / "data" / "metadata.json"))
  assert meta["counts"]["episodes"] == 1 and meta["counts"]["clips"] >= 1
  assert meta["policy"] == "rally"  # the shipped world's data
  config = json.load(open(out / "export" / "config.json"))
  assert config["model"]["dtype"] == "bfloat16" and config["train"]["batch_size"] == 2
  assert config["stage"] == "consistency" and config["model"]["dim"] == 32
  session = StreamingSession.load(str(out / "export"))
  session.start()
  frame = session.step(0)
  assert frame.shape == (1, 64, 64, 3) and frame.dtype == np.uint8
  bad = subprocess.run(["bash", "launch/train_gpu_pong.sh"], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
  assert bad.returncode == 2 and "usage" in bad.stderr
