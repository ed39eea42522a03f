"""launch/compare.py's core: several arms on the same emulator episodes."""
import dataclasses
import json
import os

import numpy as np
import pytest

from aapt_jax.evaluation import compare, suite
from aapt_jax.inference.session import StreamingSession
from streaming_helpers import TINY_ATARI, tiny_streaming_model


@pytest.fixture(scope="module")
def compared():
  """The random tiny Pong model as three arms: 1 forward per frame, the same
  again, and 2 forwards per frame (2 seeds x 14 frames)."""
  models = {1: tiny_streaming_model(sampler_steps=1), 2: tiny_streaming_model(sampler_steps=2)}
  arms = [compare.Arm("one", "tiny", 1), compare.Arm("one_again", "tiny", 1),
          compare.Arm("two", "tiny", 2, note="2 Euler steps")]
  settings = suite.Settings(seeds=(0, 1), frames=14, teacher_forced_frames=4, fvd=False)
  return compare.compare(arms, settings,
                         load=lambda arm: StreamingSession(models[arm.sampler_steps]))


def test_arms_share_episodes_and_baselines(compared):
  one, again, two = compared["arms"]
  # same model, same episodes and noise seeds: the same rows and frames
  assert one["open_loop"]["psnr"] == again["open_loop"]["psnr"]
  np.testing.assert_array_equal(one["strip"], again["strip"])
  # another sampler: other frames
  assert np.abs(one["strip"][1:].astype(int) - two["strip"][1:]).mean() > 0
  assert one["open_loop"]["psnr"] != two["open_loop"]["psnr"]
  assert set(compared["baselines"]) == {"hold_start", "copy_previous"}
  assert compared["baselines"]["hold_start"]["psnr"][0]["n"] == 2
  assert two["sampler_steps"] == 2 and two["ms_per_frame"] > 0


def test_comparison_files(compared, tmp_path):
  paths = compare.write_comparison(compared, str(tmp_path), title="Tiny")
  for name in ("compare.json", "compare.md", "compare_psnr.png", "compare_objects.png",
               "compare_drift.png", "compare_frames.png"):
    assert os.path.getsize(paths[name]) > 100, name
  data = json.load(open(paths["compare.json"]))
  assert [a["name"] for a in data["arms"]] == ["one", "one_again", "two"]
  text = open(paths["compare.md"]).read()
  assert text.startswith("# Tiny") and "| two | `" in text and "2 Euler steps" in text
  assert "*hold_start*" in text and "one step teacher-forced" in text
  # the one-step frame's change rows: one per checkpoint (one, one_again: the same "tiny")
  change = text.split("## one-step change's size over the real change's")[1].split("## ")[0]
  assert change.count("one step teacher-forced") == 1 and "| one, one step" in change
  assert set(data["arms"][0]["one_step"]) == {"psnr", "change_corr", "change_gain"}
  # seed-by-seed differences to a reference arm: by hand from the per-seed values
  ref = dict(compared, reference="one")
  text = compare.markdown(ref)
  assert "## PSNR difference to one, seed by seed" in text
  two, one = compared["arms"][2]["open_loop"]["psnr"][0], compared["arms"][0]["open_loop"]["psnr"][0]
  diff = [x - y for x, y in zip(two["per_seed"], one["per_seed"])]
  assert f"| two | {np.mean(diff):+.2f} ± {np.std(diff):.2f}" in text
  assert "| one_again | +0.00 ± 0.00" in text
  # a camera world's turning test: a row per arm and the emulator's (Pong has none)
  assert "Turning test" not in text and compared["emulator_turning"] == {}
  cell = lambda v: {"mean": v, "std": 0.0, "min": v, "max": v, "n": 2, "per_seed": [v, v]}
  turning = lambda v: {p: {"turned": cell(v), "px_per_frame": cell(4 * v)} for p in ("right", "left")}
  camera_world = dict(compared, emulator_turning=turning(1.0),
                      arms=[dict(a, turning=turning(0.25)) for a in compared["arms"]])
  text = compare.markdown(camera_world)
  assert "| two | 0.25 ± 0.00 | 1.00 ± 0.00 | 0.25 ± 0.00 | 1.00 ± 0.00 |" in text
  assert "| *emulator* | 1.00 ± 0.00 | 4.00 ± 0.00 | 1.00 ± 0.00 | 4.00 ± 0.00 |" in text
  best = compare.best_at_long_horizon(compared)
  k = compare._long_bucket(compared)
  means = {a["name"]: a["open_loop"]["psnr"][k]["mean"] for a in compared["arms"]}
  assert means[best] == max(means.values())


@pytest.mark.parametrize("bad", [["x"], ["a=dir@0"], ["a=dir@two"], ["a=d", "a=e"], [],
                                 ["=dir"]])
def test_bad_arms_are_named(bad):
  with pytest.raises(ValueError, match="--arms"):
    compare.parse_arms(bad)


def test_arms_parse():
  arms = compare.parse_arms(["s1=run/diffusion@16", "s3=run/adversarial"])
  assert arms == [compare.Arm("s1", "run/diffusion", 16), compare.Arm("s3", "run/adversarial", 1)]


def test_horizon_clip_scores_other_clips_on_one_grid():
  """Arms trained on other clip lengths are refused (their horizons differ)
  unless --horizon_clip cuts every arm's horizons by one clip."""
  models = {"five": tiny_streaming_model(sampler_steps=1),
            "two": tiny_streaming_model(TINY_ATARI + (("train.clip_frames", 2),), sampler_steps=1)}
  arms = [compare.Arm("five", "tiny"), compare.Arm("two", "tiny")]
  load = lambda arm: StreamingSession(models[arm.name])
  settings = suite.Settings(seeds=(0,), frames=14, teacher_forced_frames=0, fvd=False)
  with pytest.raises(ValueError, match="2 against 5 frames.*--horizon_clip"):
    compare.compare(arms, settings, load=load)
  result = compare.compare(arms, dataclasses.replace(settings, horizon_clip=3), load=load)
  # 3 -> 1-3, 4-10 (10/3 clips), 11-14 (to 10 clips, cut at 14 frames)
  assert result["buckets"] == ["1-3", "4-10", "11-14"] and result["clip_frames"] == 3
  assert [a["train_clip_frames"] for a in result["arms"]] == [5, 2]
  # the same model and episodes: the grid, not the clip, decides the rows
  assert result["arms"][0]["open_loop"]["psnr"] == result["arms"][1]["open_loop"]["psnr"]
  text = compare.markdown(result)
  assert "horizons cut by a clip of 3 frames (10x = 30; --horizon_clip), trained on clips " \
         "of 2 and 5 frames" in text
  with pytest.raises(ValueError, match="--horizon_clip must be >= 0"):
    dataclasses.replace(settings, horizon_clip=-1).check()
  with pytest.raises(ValueError, match="--turn_frames must be >= 0"):
    dataclasses.replace(settings, turn_frames=-2).check()
