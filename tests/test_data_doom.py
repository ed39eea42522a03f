"""The Doom world (vizdoom): continuous camera controls, poses, exact replay,
the explorer policy and its records through the data pipeline."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from aapt_jax.data import pipeline, prepare, records, worlds
from aapt_jax.data.worlds import doom
from aapt_jax.data.worlds.policies import ExplorerPolicy, make_policy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def world():
  return worlds.make_world("doom", "freedoom2", size=32, frame_skip=2)


def test_registry_and_interface(world):
  assert isinstance(world, doom.DoomWorld) and worlds.world_class("doom") is doom.DoomWorld
  assert world.num_actions == 0 and world.control_dim == 3 and world.fps == 17.5
  assert world.reset(0).shape == (32, 32, 3) and world.reset(0).dtype == np.uint8
  assert world.max_yaw_deg_per_frame >= 5.0
  assert isinstance(make_policy("", world), ExplorerPolicy)
  with pytest.raises(ValueError, match="unknown Doom scenario 'nope'.*freedoom2"):
    doom.DoomWorld("nope")
  for bad in ([0.0, 0.0], [2.0, 0.0, 0.0], [np.nan, 0.0, 0.0]):
    with pytest.raises(ValueError, match="controls"):
      world.step(bad)


def test_controls_move_the_camera_as_documented(world):
  world.reset(0)
  pose0 = world.pose()
  world.step([1.0, 0.0, 0.0])  # turn right: Doom's yaw (counter-clockwise) decreases
  pose1 = world.pose()
  np.testing.assert_allclose((pose0[3] - pose1[3]) % 360, world.max_yaw_deg_per_frame,
                             atol=0.05)
  np.testing.assert_allclose(pose1[:3], pose0[:3])
  world.step([-0.5, 0.0, 0.0])  # half the rate to the left
  np.testing.assert_allclose((world.pose()[3] - pose1[3]) % 360,
                             0.5 * world.max_yaw_deg_per_frame, atol=0.05)
  yaw = np.deg2rad(world.pose()[3])
  before = world.pose()[:2]
  for _ in range(4):
    world.step([0.0, 1.0, 0.0])  # forward: along the facing direction
  d = world.pose()[:2] - before
  assert np.linalg.norm(d) > 10 and d @ np.array([np.cos(yaw), np.sin(yaw)]) > 0.9 * np.linalg.norm(d)


def test_recorded_episode_replays_exactly(world):
  ep = world.record_episode(seed=3, max_frames=40)
  assert len(ep) == 40 and ep.controls.shape == (40, 3) and ep.poses.shape == (40, 5)
  assert ep.controls.dtype == np.float32 and np.all(ep.controls[0] == 0)
  assert np.all(np.abs(ep.controls) <= 1) and np.abs(ep.controls[1:, 0]).max() > 0.05
  assert len({f.tobytes() for f in ep.frames}) > 20       # the camera moved
  frames, poses = world.replay_with_poses(ep.controls, seed=3)
  np.testing.assert_array_equal(frames, ep.frames)
  np.testing.assert_array_equal(poses, ep.poses)
  fresh = doom.DoomWorld("freedoom2", size=32, frame_skip=2)  # a new game process
  np.testing.assert_array_equal(fresh.replay(ep.controls, seed=3), ep.frames)
  fresh.close()
  other = world.record_episode(seed=4, max_frames=40)
  assert not np.array_equal(other.controls, ep.controls)


def test_explorer_is_smooth_seeded_and_leaves_walls(world):
  ep = world.record_episode(seed=0, max_frames=300)
  jumps = np.abs(np.diff(ep.controls[1:], axis=0)).max(axis=0)
  assert jumps[0] < 0.6 and jumps[1] < 0.6          # smooth: a low-pass of its targets
  step = np.linalg.norm(np.diff(ep.poses[:, :2], axis=0), axis=1)  # [T - 1]
  still, longest = 0, 0
  for moved in step < 1.0:
    still = still + 1 if moved else 0
    longest = max(longest, still)
  assert longest < 20, f"stood still for {longest} frames"
  assert np.ptp(ep.poses[:, 0]) + np.ptp(ep.poses[:, 1]) > 200   # it went somewhere
  a, b = ExplorerPolicy(seed=1), ExplorerPolicy(seed=1)
  pose = np.zeros(5, np.float32)
  for _ in range(20):
    np.testing.assert_array_equal(a(None, pose), b(None, pose))


def test_prepare_doom_round_trips_through_records_and_pipeline(tmp_path, world):
  out = str(tmp_path / "doom")
  summary = prepare.prepare_world(out, world="doom", game="freedoom2", episodes=2,
                                  frames_per_episode=12, clip_frames=6, size=32,
                                  frame_skip=2, seed=5, progress=False)
  meta = json.load(open(os.path.join(out, "metadata.json")))
  assert meta == json.loads(json.dumps(summary))
  assert meta["world"] == "doom" and meta["num_actions"] == 0 and meta["control_dim"] == 3
  assert meta["control_names"] == ["yaw", "forward", "strafe"] and meta["fps"] == 17.5
  assert meta["counts"] == {"episodes": 2, "episode_frames": 24, "clips": 4,
                            "clip_frames": 24}
  eps = {e["episode"]: e for e in
         records.RecordSource(os.path.join(out, "episodes-*.array_record"), validate=True)}
  for e in eps.values():
    assert "actions" not in e and e["controls"].dtype == np.float32
    assert e["controls"].shape == (12, 3) and e["poses"].shape == (12, 5)
    frames, poses = world.replay_with_poses(e["controls"], e["seed"])
    np.testing.assert_array_equal(frames, e["video"])
    np.testing.assert_array_equal(poses, e["poses"])
  clips = records.RecordSource(os.path.join(out, "clips-*.array_record"), validate=True)
  for c in clips:
    np.testing.assert_array_equal(c["controls"], eps[c["episode"]]["controls"][c["start"]:][:6])
  batch = next(iter(pipeline.make_dataset(out + "/clips-*.array_record", clip_frames=6,
                                          batch_size=2, process_index=0,
                                          process_count=1)))
  assert batch["latents"].shape == (2, 6, 8, 8, 48) and "actions" not in batch
  assert batch["controls"].shape == (2, 6, 3) and batch["controls"].dtype == np.float32
  starts = {(c["episode"], c["start"]): c["controls"] for c in clips}
  assert any(np.array_equal(batch["controls"][0], u) for u in starts.values())


def test_prepare_data_script_doom(tmp_path):
  out = str(tmp_path / "d")
  r = subprocess.run([sys.executable, "launch/prepare_data.py", "--world=doom",
                      "--episodes=1", "--frames_per_episode=8", "--clip_frames=4",
                      "--size=16", f"--out={out}"], cwd=REPO, capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  assert "doom/freedoom2: wrote 2 clips" in r.stdout
  meta = json.load(open(out + "/metadata.json"))
  assert meta["frame_skip"] == 2 and meta["game"] == "freedoom2"


@pytest.mark.parametrize("variant", ["", ":full"])
def test_doom_config_validates_and_fits_its_records(variant, world):
  import jax
  from aapt_jax import load_config
  from aapt_jax.models import build_generator, init_params
  from aapt_jax.pipeline import PIPELINE, stage_config
  from aapt_jax.training.validation import check_config, check_example
  c = load_config(os.path.join(REPO, "configs", "doom.py") + variant)
  assert c.model.control_dim == 3 and c.model.num_actions == 0 and c.stage == "pipeline"
  assert c.data.world == "doom" and worlds.world_from_config(c).control_dim == 3
  for stage in PIPELINE:
    check_config(stage_config(c, stage))
  shapes = jax.eval_shape(lambda: init_params(build_generator(c), jax.random.key(0)))
  assert shapes  # the generator builds with controls and no actions
  ep = worlds.make_world("doom", c.data.game, size=c.data.frame_size,
                         frame_skip=c.data.frame_skip).record_episode(0, max_frames=3)
  check_example({"video": ep.frames, "controls": ep.controls}, c, "doom record",
                min_frames=3)
  if variant == ":full":  # the shipped export's stages 2 and 3 (RESULTS.md, Doom model card)
    assert (c.pipeline.consistency_steps, c.pipeline.adversarial_steps) == (600, 150)
    assert c.adversarial.gen_optim.learning_rate == 1e-5
  with pytest.raises(ValueError, match="unknown variant"):
    load_config(os.path.join(REPO, "configs", "doom.py") + ":fast")


def test_video_inputs_of_a_camera_world(tmp_path, world):
  from aapt_jax.inference.video import load_actions
  controls = load_actions("random", world, 10, seed=2)
  np.testing.assert_array_equal(np.stack(controls),
                                world.record_episode(2, max_frames=10).controls)
  path = tmp_path / "controls.json"
  path.write_text(json.dumps([[0.0, 0.0, 0.0], [1.0, 0.5, -0.25]]))
  np.testing.assert_array_equal(np.stack(load_actions(str(path), world, 2, 0)),
                                [[0, 0, 0], [1, 0.5, -0.25]])
  path.write_text(json.dumps([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]]))
  with pytest.raises(ValueError, match="invalid control vector"):
    load_actions(str(path), world, 2, 0)
