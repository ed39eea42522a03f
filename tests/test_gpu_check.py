"""benchmarks/gpu_check.py --tiny: the GPU check's code paths (streaming step
with text keys/values once, stage-1 and stage-3 steps, steps/s) run and
report on CPU at tiny sizes, so the script is ready when a GPU is at hand."""
import math

import pytest

from helpers import load_benchmark


def _gpu_check():
  return load_benchmark("gpu_check")


def _run(only):
  results = _gpu_check().main(["--tiny", "--steps", "1", "--only", only])
  for section in only.split(","):
    rows = results[section]
    assert rows and not any("FAILED" in r or "skipped" in r for r in rows), rows
  return results


def test_tiny_streaming_and_stage1():
  results = _run("streaming,stage1")
  assert "ms/latent frame" in results["streaming"][0]
  rate = results[("stage1", "tiny")]
  assert math.isfinite(rate) and rate > 0


@pytest.mark.slow
def test_tiny_stage3_and_atari():
  results = _run("stage3,atari")
  assert results[("stage3", "tiny")] > 0 and results[("atari", "tiny")] > 0
