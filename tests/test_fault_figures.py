"""benchmarks/fault_figures.py's kill scenario: a tiny training run SIGKILLed
at random steps and resumed ends with the params of an uninterrupted run."""

import pytest

from helpers import load_benchmark


def _fault_figures():
  return load_benchmark("fault_figures")


@pytest.mark.slow
def test_kill_nine_twice_then_resume_equals_the_uninterrupted_run():
  result = _fault_figures().kill_restart_scenario(restarts=2, steps=16, every=4, seed=1)
  assert result["killed"] == [True, True], result
  # The faults cost work and the restarts really resumed (not a fresh run).
  assert all(lost >= 0 for lost in result["lost"]) and sum(result["lost"]) > 0, result
  assert result["final_step"] == 16 and result["final_resumed_from"] > 0, result
  assert result["exact"], result["max_abs_diff"]
  assert result["max_abs_diff"] == {"ema_params": 0.0, "gen_params": 0.0}
