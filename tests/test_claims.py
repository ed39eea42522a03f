"""launch/claims.py's arms: the paper's ablations at equal compute."""
import pytest

from aapt_jax import load_config
from aapt_jax.training.stages import adversarial_frame_passes
from helpers import load_benchmark

claims = load_benchmark("claims", folder="launch")


def test_frame_passes_by_hand():
  c = load_config("atari:claims")                 # rollout 16, segments of 8 every 4 frames
  judged = 8 + 8 + 8                              # starts 0, 4, 8
  assert adversarial_frame_passes(c) == 16 + 3 * 16 + 18 * judged
  c.adversarial.gradient = "scan"
  assert adversarial_frame_passes(c) == 3 * 16 + 18 * judged
  c.adversarial.forcing = "teacher"
  assert adversarial_frame_passes(c) == 3 * 8 + 18 * 8


def test_arms_spend_the_same_compute():
  base = load_config("atari:claims")
  budget = adversarial_frame_passes(base) * base.pipeline.adversarial_steps
  one_clip = claims.arm_config(base, "stage3_one_clip")
  teacher = claims.arm_config(base, "stage3_teacher")
  aapt = claims.arm_config(base, "stage3")
  assert aapt.train.steps == base.pipeline.adversarial_steps and aapt.stage == "adversarial"
  assert (one_clip.adversarial.rollout_frames, one_clip.adversarial.segment_frames) == (8, 8)
  assert teacher.adversarial.forcing == "teacher" and base.adversarial.forcing == "student"
  for arm in (one_clip, teacher):
    spent = adversarial_frame_passes(arm) * arm.train.steps
    assert abs(spent - budget) <= adversarial_frame_passes(arm) / 2
    assert arm.train.steps > base.pipeline.adversarial_steps  # cheaper steps, more of them
  with pytest.raises(ValueError, match="stage3_bogus"):
    claims.arm_config(base, "stage3_bogus")
