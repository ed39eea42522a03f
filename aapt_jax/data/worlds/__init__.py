"""Worlds: simulators that produce (frames, actions), by name.

(`tfds_world.py` reads the episodes of a TFDS dataset instead: no simulator,
so not registered; data/prepare_tfds.py records it.)

    world = make_world("atari", "Pong", size=64, frame_skip=4)
    world = world_from_config(config)          # config.data.world/game/frame_size/frame_skip

Every world class `W(game, *, size, frame_skip)` (`game` names the game or
level) has:

  reset(seed=0) -> uint8 [H, W, 3]      a new game from `seed`: its first frame
  step(action) -> (frame, reward, done) `action` an id 0..num_actions-1 (or, in a
                                        world with control_dim > 0, a float vector)
  replay(actions, seed=0) -> [T, H, W, 3]  deterministic: the frames recorded
                                        with these actions from this seed
  record_episode(seed, policy, max_frames, action_hold) -> Episode
  game_over() -> bool
  fps, game, size, frame_skip, num_actions, action_names, noop, control_dim
  DEFAULT_GAME, DEFAULT_FRAME_SKIP      class attributes: what a user who names
                                        only the world gets
  ram() -> uint8 array                  the emulator's state, ground truth for
                                        evaluation (where the emulator has one)
  pose() -> float32 [5]                 a camera world's camera: x, y, z, yaw, pitch
  control_names                         a camera world's control dimensions
                                        ("yaw", "forward", "strafe": the page
                                        steers them by mouse look and WASD)

Registered: `atari` (ale-py, `atari.AtariWorld`), `doom` (vizdoom,
`doom.DoomWorld`: a first-person camera, control_dim 3, num_actions 0). A
world's module is imported when it is first asked for, so `worlds` loads
without its emulator. `policies.make_policy(name, world, seed)` is the policy a
world is recorded with ("" = the world's own: sticky-random, or the explorer
for a camera world; "rally" keeps Pong's ball in play). `videos.py` reads a folder of video files (no
simulator, so not registered; data/prepare_videos.py records it).
"""
from __future__ import annotations

import importlib

REGISTRY = {"atari": "aapt_jax.data.worlds.atari:AtariWorld",
            "doom": "aapt_jax.data.worlds.doom:DoomWorld"}
NAMES = tuple(REGISTRY)


def frame_args(size: int | tuple[int, int], frame_skip: int) -> tuple[tuple[int, int], int]:
  """A world's (size as (h, w), frame_skip as int), checked: ValueError for a
  frame_skip below 1 or a non-positive size (every world's constructor)."""
  if int(frame_skip) < 1:
    raise ValueError(f"frame_skip must be >= 1, got {frame_skip}")
  hw = (size, size) if isinstance(size, int) else tuple(size)
  if min(hw) < 1:
    raise ValueError(f"size must be positive, got {size}")
  return hw, int(frame_skip)


def world_class(name: str) -> type:
  """The class registered as `name`; ValueError listing the names."""
  if name not in REGISTRY:
    raise ValueError(f"unknown world {name!r}: choose from {', '.join(NAMES)}")
  module, cls = REGISTRY[name].split(":")
  return getattr(importlib.import_module(module), cls)


def make_world(name: str, game: str, *, size: int | tuple[int, int] = 64,
               frame_skip: int = 4):
  """A `name` world (see the module docstring) playing `game`."""
  return world_class(name)(game, size=size, frame_skip=frame_skip)


def world_from_config(config):
  """The world `config.data` names (world, game, frame_size, frame_skip), or
  None when data.world is empty (a model trained on other videos)."""
  data = config.data
  if not data.world:
    return None
  return make_world(data.world, data.game, size=data.frame_size, frame_skip=data.frame_skip)
