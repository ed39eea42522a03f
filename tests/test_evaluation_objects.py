"""The Pong object detector validated on emulator frames against the RAM
truth, and the per-frame object scores on hand-made detections."""
import functools

import numpy as np
import pytest

from aapt_jax.data.worlds.atari import AtariWorld, StickyRandomPolicy
from aapt_jax.evaluation import detectors, objects, ram_objects


@functools.cache
def _game(size, seed, frames=150):
  """(frames, rams, actions) of a sticky-random Pong game at `size`."""
  world = AtariWorld("Pong", size=size)
  policy = StickyRandomPolicy(world.num_actions, seed=seed)
  out, rams, actions = [world.reset(seed)], [world.ram()], [world.noop]
  for _ in range(frames):
    actions.append(policy())
    out.append(world.step(actions[-1])[0])
    rams.append(world.ram())
  return np.stack(out), np.stack(rams), np.asarray(actions), world.action_names


@pytest.mark.parametrize("size", [64, (210, 160)])
def test_detector_matches_the_ram_on_emulator_frames(size):
  counts = {k: dict(tp=0, fn=0, fp=0, errors=[]) for k in ("ball", "player", "enemy")}
  for seed in (0, 1):
    frames, rams, _, _ = _game(size, seed)
    truth = objects.ram_truth("Pong", rams, frames.shape[1:3])
    for frame, true in zip(frames, truth):
      found = detectors.detect("Pong", frame)
      for k, c in counts.items():
        if true[k] is None:
          c["fp"] += found[k] is not None
        elif found[k] is None:
          c["fn"] += 1
        else:
          c["tp"] += 1
          c["errors"].append(np.hypot(found[k][0] - true[k][0], found[k][1] - true[k][1]))
  for k, c in counts.items():
    assert c["tp"] > 100, (k, c["tp"])                    # the objects are on screen a lot
    assert c["tp"] / (c["tp"] + c["fn"]) >= 0.97, (k, c)  # recall
    assert c["fp"] == 0, (k, c)                           # precision
    # mean position error: a fraction of a frame pixel (at 64x64 a frame pixel
    # is 2.5 x 3.3 screen pixels), about one screen pixel at full size
    assert np.mean(c["errors"]) < (0.3 if size == 64 else 0.6), (k, np.mean(c["errors"]))


def test_detector_finds_no_objects_in_a_noisy_or_textured_field():
  frames, _, _, _ = _game(64, 0)
  field = np.full((64, 64, 3), (144, 72, 17), np.float64)
  rng = np.random.default_rng(0)
  for sigma in (10.0, 25.0):
    noisy = np.clip(field + rng.normal(0, sigma, field.shape), 0, 255).astype(np.uint8)
    assert detectors.detect("Pong", noisy)["ball"] is None
  # a real frame under per-pixel noise keeps its paddles
  noisy = np.clip(frames[60] + rng.normal(0, 6, frames[60].shape), 0, 255).astype(np.uint8)
  assert detectors.detect("Pong", noisy)["player"] is not None
  # a field of random colours (a blocky texture) holds no isolated ball
  blocks = rng.integers(60, 255, (16, 16, 3)).repeat(4, 0).repeat(4, 1).astype(np.uint8)
  assert detectors.detect("Pong", blocks)["ball"] is None


def test_ram_and_detector_tables_name_unknown_games():
  with pytest.raises(ValueError, match="Pong"):
    ram_objects.objects_from_ram("Breakout", np.zeros(128, np.uint8))
  with pytest.raises(ValueError, match="Pong"):
    detectors.detect("Breakout", np.zeros((64, 64, 3), np.uint8))


def test_player_moves_table_matches_the_emulator():
  """RIGHT moves Pong's player paddle up the screen (smaller rows), LEFT down:
  measured from the RAM over a game."""
  _, moves = objects.PLAYER_MOVES["Pong"]
  dys, acts = [], []
  for seed in (0, 1):
    _, rams, actions, names = _game(64, seed)
    dys.append(np.diff(rams[:, ram_objects.RAM_TABLES["Pong"].player_y].astype(int)))
    acts.append(actions[1:])
  dy, acts = np.concatenate(dys), np.concatenate(acts)
  for name, sign in moves.items():
    steps = np.sign(dy[acts == names.index(name)])
    # the paddle stops at the field's edges, so not every press moves it
    assert np.mean(steps == sign) > 3 * np.mean(steps == -sign), (name, steps)


def test_object_and_follow_series_on_hand_made_detections():
  truth = [{"ball": None, "player": (5.0, 5.0)}, {"ball": (1.0, 1.0), "player": (5.0, 5.0)},
           {"ball": None, "player": (5.0, 3.0)}]
  found = [{"ball": None, "player": (5.0, 5.0)}, {"ball": (4.0, 5.0), "player": None},
           {"ball": (2.0, 2.0), "player": (5.0, 3.0)}]
  s = objects.object_series(truth, found)
  np.testing.assert_equal(s["ball_present"], [np.nan, 1.0, np.nan])
  np.testing.assert_equal(s["ball_error"], [np.nan, 5.0, np.nan])       # a 3-4-5 triangle
  np.testing.assert_equal(s["ball_phantom"], [np.nan, np.nan, 1.0])
  np.testing.assert_equal(s["player_present"], [np.nan, 0.0, 1.0])
  names = ["NOOP", "FIRE", "RIGHT", "LEFT", "RIGHTFIRE", "LEFTFIRE"]
  paddle = lambda y: {"player": (5.0, y)}
  found = [paddle(10.0), paddle(8.0), paddle(8.1), paddle(9.0), paddle(9.0)]
  actions = np.array([0, 2, 3, 5, 1])  # -, RIGHT (up), LEFT (down), LEFTFIRE, FIRE
  follow = objects.follow_series("Pong", names, actions, found, [None] + found[:-1])
  # up 2 px: followed; down 0.1 px: under MOVE_MIN, not a move; down 0.9: followed; FIRE: none
  np.testing.assert_equal(follow, [np.nan, 1.0, 0.0, 1.0, np.nan])


def test_ball_probe_scores_a_model_beside_copying_the_previous_frame():
  """benchmarks/ball_probe.py on the tiny random Pong model: the copy-previous
  row finds the ball where it was a frame ago, the one-step and open-loop rows are the model's own."""
  from helpers import load_benchmark
  from streaming_helpers import tiny_streaming_model
  ball_probe = load_benchmark("ball_probe")
  out = ball_probe.probe(tiny_streaming_model(sampler_steps=1), [0], tf_frames=20,
                         open_loop_frames=3)
  assert out["tf_frames"] == 20 and out["sampler_steps"] == 1
  assert out["real_copy_previous_ball_present"] > 0.8            # frames 15-20: the serve
  # the serve moves (-1.6, +1.2) px a frame at 64x64: 2.0 px, 0.5 px at the tiny 16x16
  assert 0.4 < out["real_copy_previous_ball_error"] < 0.6
  assert 0.0 <= out["tf_ball_present"] <= 1.0 and np.isfinite(out["real_ball_signal"])
  assert {"ol_psnr", "ol_hold_start_psnr", "tf_psnr"} <= set(out)
  # the denoising check at t = 0.1: the real frame noised a little, x0 = x_t - t v,
  # is within a few levels of the real frame even for a random model
  assert out["denoise_t"] == 0.1 and out["dn_psnr"] > out["tf_psnr"] + 5
