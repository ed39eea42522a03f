"""The Atari world (ale-py) and launch/prepare_data.py end to end."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from aapt_jax import image_utils
from aapt_jax.data import pipeline, prepare, records
from aapt_jax.data.worlds import atari
from aapt_jax.data.worlds.policies import StickyRandomPolicy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def pong():
  return atari.AtariWorld("Pong", size=32)


def test_sticky_actions_off_and_minimal_action_set(pong):
  assert pong.ale.getFloat("repeat_action_probability") == 0.0
  pong.reset(seed=5)
  assert pong.ale.getFloat("repeat_action_probability") == 0.0
  assert pong.num_actions == 6 and pong.action_names[0] == "NOOP"
  assert len(pong.action_names) == pong.num_actions


def test_game_names():
  assert atari.rom_id("MsPacman") == atari.rom_id("ms_pacman") == "ms_pacman"
  assert atari.rom_id("Freeway") == "freeway"
  assert "Breakout" in atari.available_games()
  with pytest.raises(ValueError, match="unknown Atari game 'Pongg'.*Pong.*Breakout"):
    atari.AtariWorld("Pongg")


def test_frame_skip_holds_each_action(pong):
  pong.reset(seed=0)
  before = pong.ale.getEpisodeFrameNumber()
  pong.step(2)
  assert pong.ale.getEpisodeFrameNumber() - before == 4
  assert pong.fps == 15.0
  with pytest.raises(ValueError, match="action 6 out of range"):
    pong.step(6)


def test_recorded_episode_varies_and_replays_exactly(pong):
  ep = pong.record_episode(seed=7, max_frames=60)
  assert ep.frames.shape == (60, 32, 32, 3) and ep.frames.dtype == np.uint8
  assert ep.actions.shape == (60,) and ep.actions.dtype == np.int32
  assert ep.actions[0] == pong.noop and not ep.game_over
  assert len(set(ep.actions[1:].tolist())) >= 3  # not only no-ops
  assert len({f.tobytes() for f in ep.frames}) > 10  # the screen changes
  # Same seed + same actions => identical frames (also from a new emulator).
  np.testing.assert_array_equal(pong.replay(ep.actions, seed=7), ep.frames)
  np.testing.assert_array_equal(
      atari.AtariWorld("Pong", size=32).record_episode(seed=7, max_frames=60).frames,
      ep.frames)
  # The actions matter: the paddle moves differently under all no-ops.
  assert not np.array_equal(pong.replay(np.zeros(60, np.int32), seed=7), ep.frames)


def test_action_hold(pong):
  ep = pong.record_episode(seed=1, max_frames=13, action_hold=4)
  a = ep.actions
  for k in range(3):
    assert len(set(a[1 + 4 * k: 5 + 4 * k].tolist())) == 1


def test_world_registry_builds_atari_from_a_config_and_replays_its_ram():
  """worlds.world_from_config builds the config's world; replaying an
  episode's actions from its seed gives the same frames AND the same RAM."""
  from aapt_jax import load_config
  from aapt_jax.data import worlds
  assert worlds.world_class("atari") is atari.AtariWorld
  with pytest.raises(ValueError, match="unknown world 'minecraft': choose from atari, doom"):
    worlds.world_class("minecraft")
  config = load_config(os.path.join(REPO, "configs", "tiny.py"),
                       {"data.world": "atari", "data.game": "Pong", "data.frame_size": 16})
  world = worlds.world_from_config(config)
  assert (world.game, world.size, world.control_dim) == ("Pong", (16, 16), 0)
  ep = world.record_episode(seed=2, max_frames=40)
  ram = world.ram()
  assert ram.dtype == np.uint8 and ram.shape == (128,)
  np.testing.assert_array_equal(world.replay(ep.actions, seed=2), ep.frames)
  np.testing.assert_array_equal(world.ram(), ram)
  world.step(world.noop)
  assert not np.array_equal(world.ram(), ram)  # the frame counter, at least, moved
  config.data.world = ""
  assert worlds.world_from_config(config) is None


def test_policy_is_seeded_and_sticky():
  p, q = StickyRandomPolicy(6, 0.75, seed=3), StickyRandomPolicy(6, 0.75, seed=3)
  seq_p, seq_q = [p() for _ in range(400)], [q() for _ in range(400)]
  assert seq_p == seq_q
  r = StickyRandomPolicy(6, 0.75, seed=4)
  assert [r() for _ in range(400)] != seq_p
  changes = np.mean(np.diff(seq_p) != 0)
  assert 0.1 < changes < 0.35  # ~ (1 - 0.75) * 5/6
  assert set(seq_p) == set(range(6))


def test_resize_area():
  img = np.zeros((1, 8, 8, 3), np.uint8)
  img[0, :4, :4] = 255
  img[0, 0, 5] = 200
  out = image_utils.resize_area(img, 4)
  assert out.shape == (1, 4, 4, 3)
  assert (out[0, :2, :2] == 255).all() and out[0, 0, 2, 0] == 50  # box mean
  full = np.full((210, 160, 3), 77, np.uint8)
  assert (image_utils.resize_area(full, 64) == 77).all()  # non-integer ratio


def test_prepare_atari_end_to_end(tmp_path):
  out = str(tmp_path / "data")
  summary = prepare.prepare_atari(out, game="Breakout", episodes=2,
                                  frames_per_episode=40, clip_frames=8, size=32,
                                  seed=11, progress=False)
  meta = json.load(open(os.path.join(out, "metadata.json")))
  assert meta == json.loads(json.dumps(summary))
  assert meta["game"] == "Breakout" and meta["num_actions"] == 4
  assert meta["action_names"] == ["NOOP", "FIRE", "RIGHT", "LEFT"]
  assert meta["size"] == [32, 32] and meta["frame_skip"] == 4 and meta["fps"] == 15.0
  assert meta["counts"] == {"episodes": 2, "episode_frames": 80, "clips": 10,
                            "clip_frames": 80}
  eps = records.RecordSource(os.path.join(out, "episodes-*.array_record"), validate=True)
  clips = records.RecordSource(os.path.join(out, "clips-*.array_record"), validate=True)
  assert len(eps) == 2 and len(clips) == 10
  episodes = {e["episode"]: e for e in eps}
  world = atari.AtariWorld("Breakout", size=32)
  for k, e in episodes.items():
    assert e["video"].shape == (40, 32, 32, 3) and e["seed"] == 11 + k
    np.testing.assert_array_equal(world.replay(e["actions"], e["seed"]), e["video"])
  for c in clips:
    e, s = episodes[c["episode"]], c["start"]
    np.testing.assert_array_equal(c["video"], e["video"][s:s + 8])
    np.testing.assert_array_equal(c["actions"], e["actions"][s:s + 8])
  batch = next(iter(pipeline.make_dataset(out + "/clips-*.array_record", clip_frames=8,
                                          batch_size=2, process_index=0,
                                          process_count=1)))
  assert batch["latents"].shape == (2, 8, 8, 8, 48) and batch["actions"].shape == (2, 8)
  with pytest.raises(ValueError, match="already holds records"):
    prepare.prepare_atari(out, game="Breakout", episodes=1, progress=False)


def test_prepare_counts_short_episodes_as_skipped(tmp_path):
  summary = prepare.prepare_atari(str(tmp_path), game="Pong", episodes=1,
                                  frames_per_episode=5, clip_frames=8, size=16,
                                  progress=False)
  assert summary["counts"]["clips"] == 0 and summary["counts"]["episodes"] == 1
  assert summary["skipped"] == ["episode 0: 5 frames < clip_frames=8, no clips"]


def _run_script(*args):
  return subprocess.run([sys.executable, "launch/prepare_data.py", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=120)


def test_prepare_data_script(tmp_path):
  out = str(tmp_path / "pong")
  r = _run_script("--world=atari", "--game=Pong", "--episodes=1",
                  "--frames_per_episode=12", "--clip_frames=4", "--size=16",
                  f"--out={out}")
  assert r.returncode == 0, r.stderr
  assert "wrote 3 clips" in r.stdout and "skipped 0" in r.stdout
  assert len(records.RecordSource(out + "/clips-*.array_record")) == 3
  assert json.load(open(out + "/metadata.json"))["counts"]["episode_frames"] == 12
  # Bad input: one clear line, no traceback.
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  for args, message in [(("--game=Pongg", f"--out={tmp_path}/x"), "unknown Atari game"),
                        ((f"--out={blocker}/sub",), "cannot write to output directory")]:
    r = _run_script(*args)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
