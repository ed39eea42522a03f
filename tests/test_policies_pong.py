"""The Pong rally policy (keeps the ball in play from the RAM), choosing a
recording policy by name (data.policy, --policy) and the rally measurements."""
import importlib.util
import json
import os

import ml_collections
import numpy as np
import pytest

from aapt_jax.data import prepare, records
from aapt_jax.data.worlds import atari, policies
from aapt_jax.evaluation import ram_objects
from aapt_jax.evaluation.rallies import episode_rams, pong_rallies
from aapt_jax.training import data_files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def pong():
  return atari.AtariWorld("Pong", size=16)


def _play(world, policy, seed, frames):
  """(actions, rams [T, 128], rewards) of `frames` frames of `policy`."""
  ep = world.record_episode(seed, policy, max_frames=frames)
  return ep.actions, episode_rams(world, ep.actions, seed), ep.rewards


def test_rally_policy_is_deterministic_per_seed(pong):
  a1, _, _ = _play(pong, policies.make_policy("rally", pong, seed=3), 3, 150)
  a2, _, _ = _play(pong, policies.make_policy("rally", pong, seed=3), 3, 150)
  b, _, _ = _play(pong, policies.make_policy("rally", pong, seed=4), 3, 150)
  np.testing.assert_array_equal(a1, a2)
  assert not np.array_equal(a1, b)
  assert set(a1.tolist()) <= set(range(pong.num_actions))
  assert len(set(a1.tolist())) == pong.num_actions   # every id shows in the data


def test_rally_policy_keeps_the_ball_in_play(pong):
  """Over the same frames and seeds, the rally policy sends the ball back
  far more often and shows it far longer than sticky-random, and still
  loses a point (the score moves)."""
  stats = {}
  for name in ("sticky_random", "rally"):
    runs = [pong_rallies(*_play(pong, policies.make_policy(name, pong, seed=s), s, 300)[1:])
            for s in (0, 1)]
    stats[name] = {k: np.mean([r[k] for r in runs]) for k in ("ball_visible", "returns")}
    stats[name]["points_lost"] = sum(r["points_lost"] for r in runs)
  rally, sticky = stats["rally"], stats["sticky_random"]
  assert rally["returns"] >= sticky["returns"] + 3, stats
  assert rally["ball_visible"] >= sticky["ball_visible"] + 0.12, stats
  assert rally["ball_visible"] > 0.8, stats
  assert rally["points_lost"] >= 1, stats


def test_paddle_knob_speed_matches_the_emulator(pong):
  """A key held for one call turns the paddle's knob KNOB_SPEED x frame_skip
  rows: one press of LEFT (down) from the start moves the resting paddle
  that far."""
  table = ram_objects.RAM_TABLES["Pong"]
  pong.reset(0)
  start = table.player_centre_y(pong.ram())
  pong.step(pong.action_names.index("LEFT"))
  for _ in range(4):
    pong.step(pong.noop)
  moved = table.player_centre_y(pong.ram()) - start
  turn = policies.PongRallyPolicy.KNOB_SPEED * pong.frame_skip
  assert abs(moved - turn) <= 1.5, (moved, turn)


def _ram(ball):
  """Pong RAM with the ball's centre at `ball` (x, y), or no ball."""
  ram = np.zeros(128, np.uint8)
  ram[51] = ram[50] = 100
  if ball is not None:
    ram[49], ram[54] = int(ball[0]) - 1 + 49, int(ball[1]) - 2 + 14
  return ram


def test_pong_rallies_counts_by_hand():
  path = ([(60 + 10 * i, 100) for i in range(8)]       # right to x = 130
          + [(120, 104), (110, 108)]                    # the player returns it
          + [None, None]                                # blinks at a wall: same rally
          + [(90, 100), (80, 100), (90, 100)]           # the enemy returns it (left half)
          + [None] * 6                                  # a point: the ball is gone
          + [(80, 100), (90, 100), (130, 100), (120, 100)])   # a new rally, one return
  rewards = np.zeros(len(path))
  rewards[[13, 16]] = [1, -1]
  out = pong_rallies(np.stack([_ram(b) for b in path]), rewards)
  assert out["returns"] == 2 and out["rallies"] == 2 and out["mean_rally"] == 1.0
  assert out["points_won"] == 1 and out["points_lost"] == 1
  assert out["ball_visible"] == pytest.approx((len(path) - 8) / len(path))


def test_policy_names_and_errors(pong):
  assert policies.policy_name("", game="Pong", control_dim=0) == "sticky_random"
  assert policies.policy_name("", game="freedoom2", control_dim=3) == "explorer"
  assert isinstance(policies.make_policy("rally", pong), policies.PongRallyPolicy)
  assert isinstance(policies.make_policy("", pong), policies.StickyRandomPolicy)
  for (name, game, dim), message in [
      (("chase", "Pong", 0), r"unknown recording policy \(config field data.policy, "
                             r"launch/prepare_data.py --policy\) 'chase'"),
      (("rally", "Breakout", 0), "'rally' plays Pong only, not Breakout"),
      (("rally", "freedoom2", 3), "'rally' presses keys.*use 'explorer'"),
      (("explorer", "Pong", 0), "'explorer' steers a camera world")]:
    with pytest.raises(ValueError, match=message):
      policies.policy_name(name, game=game, control_dim=dim)


def test_prepare_world_records_the_policy(tmp_path, pong):
  out = str(tmp_path / "rally")
  summary = prepare.prepare_atari(out, game="Pong", episodes=1, frames_per_episode=40,
                                  clip_frames=8, size=16, seed=5, policy="rally",
                                  progress=False)
  assert json.load(open(out + "/metadata.json"))["policy"] == summary["policy"] == "rally"
  ep = next(iter(records.RecordSource(out + "/episodes-*.array_record")))
  rally, _, _ = _play(pong, policies.make_policy("rally", pong, seed=5), 5, 40)
  np.testing.assert_array_equal(ep["actions"], rally)   # the actions the emulator got
  np.testing.assert_array_equal(pong.replay(ep["actions"], 5), ep["video"])
  # the default is unchanged: sticky-random, named in metadata.json
  out = str(tmp_path / "default")
  prepare.prepare_atari(out, game="Pong", episodes=1, frames_per_episode=40, clip_frames=8,
                        size=16, seed=5, progress=False)
  assert json.load(open(out + "/metadata.json"))["policy"] == "sticky_random"
  ep = next(iter(records.RecordSource(out + "/episodes-*.array_record")))
  sticky = pong.record_episode(5, policies.StickyRandomPolicy(6, 0.75, seed=5), 40)
  np.testing.assert_array_equal(ep["actions"], sticky.actions)
  with pytest.raises(ValueError, match="'rally' plays Pong only"):
    prepare.prepare_atari(str(tmp_path / "b"), game="Breakout", episodes=1, policy="rally",
                          progress=False)
  assert not os.path.exists(tmp_path / "b")   # refused before anything is written


def test_prepare_data_flag(tmp_path, capsys):
  spec = importlib.util.spec_from_file_location("prepare_data",
                                                os.path.join(REPO, "launch/prepare_data.py"))
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  out = str(tmp_path / "pong")
  assert script.main(["--policy=rally", "--episodes=1", "--frames_per_episode=12",
                      "--clip_frames=4", "--size=16", f"--out={out}"]) == 0
  assert json.load(open(out + "/metadata.json"))["policy"] == "rally"
  capsys.readouterr()
  assert script.main(["--policy=rally", "--game=Breakout", f"--out={tmp_path}/x"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "'rally' plays Pong only" in err[0], err


def test_config_field_records_and_guards_the_policy(tmp_path):
  config = ml_collections.ConfigDict({
      "data": {"world": "atari", "game": "Pong", "frame_size": 16, "frame_skip": 4,
               "record_episodes": 1, "record_frames": 20, "policy": "rally", "path": ""},
      "train": {"clip_frames": 4, "seed": 2}})
  out = str(tmp_path / "data")
  data_files.prepare_world_data(config, out)
  assert json.load(open(out + "/metadata.json"))["policy"] == "rally"
  data_files.prepare_world_data(config, out)   # the same policy: reused
  config.data.policy = ""
  with pytest.raises(ValueError, match=r"data.policy='' asks for the 'sticky_random' "
                                       r"policy, but .* recorded by 'rally'"):
    data_files.prepare_world_data(config, out)
  config.data.policy = "chase"
  with pytest.raises(ValueError, match="unknown recording policy.*data.policy"):
    data_files.prepare_world_data(config, out)
