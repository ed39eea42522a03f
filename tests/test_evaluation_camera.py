"""Camera following (evaluation/camera.py) on shifted images and on Doom frames."""
import os

import numpy as np
import pytest

from aapt_jax.data.worlds import doom
from aapt_jax.evaluation import camera


def test_image_shift_recovers_a_known_translation():
  rng = np.random.default_rng(0)
  big = rng.integers(0, 256, (96, 160, 3)).astype(np.float64)
  big = (big + np.roll(big, 1, 0) + np.roll(big, 1, 1)) / 3  # some spatial correlation
  a = big[16:80, 40:104]
  for dx, dy in ((-5, 0), (7, 0), (3, -2)):
    b = big[16 - dy:80 - dy, 40 - dx:104 - dx]  # the content moved by (dx, dy)
    got = camera.image_shift(a, b)
    np.testing.assert_allclose(got, (dx, dy), atol=0.35)


@pytest.fixture(scope="module")
def world():
  return doom.DoomWorld("freedoom2", size=64)


def test_turning_right_moves_the_emulator_scene_left_and_left_right(world):
  for yaw, sign in ((1.0, -1), (-1.0, 1)):
    controls = np.zeros((25, 3), np.float32)
    controls[1:, 0] = yaw
    frames = world.replay(controls, seed=0)
    motion = camera.horizontal_motion(frames)     # [24]
    assert motion.shape == (24,) and np.all(sign * motion > 3.0), motion
    result = camera.camera_following(frames, controls[:, 0])
    assert result["sign_agreement"] == 1.0 and result["turning_frames"] == 24
    # 8 degrees of a 90-degree view, 64 pixels wide: 32 * tan(8 deg) = 4.5 px
    assert 3.5 < result["pixels_per_unit_yaw"] < 5.5
  standing = world.replay(np.zeros((6, 3), np.float32), seed=0)
  np.testing.assert_allclose(camera.horizontal_motion(standing), 0.0, atol=0.1)


def test_camera_following_scores_the_emulator_above_a_model_that_ignores_yaw(world):
  ep = world.record_episode(seed=0, max_frames=120)
  yaw = ep.controls[:, 0]
  ignoring = world.replay(ep.controls * np.array([0, 1, 1], np.float32), seed=0)
  scores = camera.compare_camera_following(ignoring, ep.frames, yaw)
  real, fake = scores["emulator"], scores["generated"]
  assert real["sign_agreement"] > 0.7 and real["correlation"] > 0.2
  assert fake["sign_agreement"] < 0.5 and real["pixels_per_unit_yaw"] > 2.0
  assert abs(fake["pixels_per_unit_yaw"]) < 1.0
  with pytest.raises(ValueError, match="yaw has 3 entries"):
    camera.camera_following(ep.frames[:4], yaw[:3])


def test_turning_test_scores_the_emulator_a_still_picture_and_a_mirrored_turn(world):
  controls = camera.turn_controls(6, 3)                      # [13, 3]
  assert controls.shape == (13, 3) and not controls[0].any() and not controls[:, 1:].any()
  np.testing.assert_array_equal(controls[1:7, 0], 1.0)
  np.testing.assert_array_equal(controls[7:, 0], -1.0)
  real = world.replay(controls, seed=0)
  scores = camera.turning_test(real, controls)
  for phase in ("right", "left"):   # the emulator turns the right way every frame, ~4.5 px
    assert scores[phase]["turned"] == 1.0 and 3.5 < scores[phase]["px_per_frame"] < 5.5
  still = camera.turning_test(np.repeat(real[:1], len(real), 0), controls)
  assert all(still[p]["turned"] == 0.0 and abs(still[p]["px_per_frame"]) < 0.1
             for p in ("right", "left"))
  mirrored = world.replay(controls * np.array([-1, 1, 1], np.float32), seed=0)
  wrong = camera.turning_test(mirrored, controls)
  assert all(wrong[p]["turned"] == 0.0 and wrong[p]["px_per_frame"] < -3.5
             for p in ("right", "left"))
  short = camera.turning_test(real[:5], controls)   # an episode that ended: left has no frame
  assert short["right"]["turned"] == 1.0 and np.isnan(short["left"]["turned"])
  with pytest.raises(ValueError, match="at least 1 frame per direction"):
    camera.turn_controls(0, 3)
  with pytest.raises(ValueError, match="camera world"):
    camera.turn_controls(4, 0)


def test_suite_scores_camera_following_of_a_camera_world(tmp_path):
  """The evaluation suite on a tiny random-weight doom-like model: the explorer's
  controls drive the emulator and the model (open loop and teacher forced),
  and camera following is scored per horizon beside PSNR/SSIM."""
  import json
  from aapt_jax.evaluation import suite, teacher_forced
  from aapt_jax.evaluation.report import write_report
  from aapt_jax.inference.session import StreamingSession
  from streaming_helpers import TINY_DOOM, tiny_streaming_model

  session = StreamingSession(tiny_streaming_model(TINY_DOOM))
  settings = suite.Settings(seeds=(0, 1), frames=16, teacher_forced_frames=6, fvd=False,
                            turn_frames=3)
  result = suite.evaluate(session, settings)
  turning = result["turning"]          # the turning test: model and emulator, both phases
  for phase in ("right", "left"):
    assert turning[phase]["emulator"]["turned"]["mean"] == 1.0
    assert turning[phase]["emulator"]["turned"]["n"] == 2
    assert turning[phase]["generated"]["px_per_frame"]["n"] == 2
  assert len(result["turning_strip"]["generated"]) == 7
  follow = result["table"]["camera_follow"]
  assert set(follow) == {"model", "hold_start", "copy_previous", "model_1step", "model_denoise",
                         "emulator"}
  turned = [c for c in follow["emulator"] if c["n"]]
  assert turned and all(c["mean"] > 0.6 for c in turned)   # the emulator turns with the yaw
  for name in ("hold_start", "copy_previous"):             # a still picture never does
    assert all(c["mean"] == 0 for c in follow[name] if c["n"])
  assert set(result["table"]["change_corr"]) == {"model_1step"}  # the one-step change's fit
  strip = result["strip"]
  np.testing.assert_array_equal(strip["one_step"][1], strip["generated"][1])
  # the teacher-forced prediction takes the controls: other controls, another frame
  real = strip["real"][None, :4]
  controls = np.zeros((1, 4, 3), np.float32)
  still = teacher_forced.one_step_predictions(session.model, real, controls, [0])
  controls[0, 1:] = [1.0, 1.0, 0.0]
  turning = teacher_forced.one_step_predictions(session.model, real, controls, [0])
  assert np.abs(still[0, 1].astype(int) - turning[0, 1]).mean() > 0
  paths = write_report(result, str(tmp_path))
  text = open(paths["report.md"]).read()
  assert "picture turns against the yaw" in text and "## Turning test" in text
  assert "camera explorer's control vectors" in text and "sticky-random" not in text
  assert "turning.png" in paths and os.path.getsize(paths["turning.png"]) > 0
  assert "turning_strip" not in json.load(open(paths["report.json"]))
  assert "camera_follow" in json.load(open(paths["report.json"]))["table"]
