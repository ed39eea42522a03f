"""training/metrics.py: perf/* figures by hand, the peak FLOPs a device gets."""
import jax
import pytest

from aapt_jax import load_config
from aapt_jax.training import metrics
from helpers import config_path


def test_step_timer_by_hand():
  timer = metrics.StepTimer(tokens_per_step=10, model_flops_per_step=600.0,
                            peak_flops=100.0, devices=2)
  assert timer.tick(1, 5.0) == {}             # no interval before the first read
  perf = timer.tick(3, 9.0)                   # two steps in 4 s
  assert perf == pytest.approx({"perf/step_time_s": 2.0, "perf/tokens_per_s": 5.0,
                                "perf/mfu": 600.0 / 2.0 / 200.0})
  untimed = metrics.StepTimer()                # no tokens, no peak: step time only
  untimed.tick(1, 0.0)
  assert untimed.tick(2, 0.5) == {"perf/step_time_s": 0.5}


def test_peak_flops_from_the_config_or_a_known_device():
  config = load_config(config_path("tiny.py"))
  cpu = jax.devices()[0]
  assert metrics.peak_flops_per_device(config, cpu) is None   # float32, unknown device
  with config.unlocked():
    config.model.dtype = "bfloat16"
  assert metrics.peak_flops_per_device(config, cpu) is None   # CPU: not in the table

  class H100:
    device_kind = "NVIDIA H100 80GB HBM3"
  assert metrics.peak_flops_per_device(config, H100) == 989e12
  with config.unlocked():
    config.train.peak_flops_per_device = 1e12
  assert metrics.peak_flops_per_device(config, cpu) == 1e12
