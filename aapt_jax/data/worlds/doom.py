"""ViZDoom worlds: a first-person camera steered by continuous controls.

The scenario: ``freedoom2`` by default, MAP01 of Freedoom: Phase 2 (the
free Doom II level set whose WAD ships inside the vizdoom wheel), played with
``-nomonsters``. It is a whole level -- rooms, corridors, stairs, windows --
whose walls mix many textures (brick, metal panels, blue lights, marble,
wood, signs), so what the camera sees depends on where it is and where it
looks, and nothing moves but the camera. ViZDoom's small scenarios were
measured against it: ``my_way_home`` (a maze of rooms) showed the same two
textures, brown brick and red, in nearly every frame of a 600-frame
exploration. Every episode starts at the level's start spot; the policy's seed
makes episodes differ. Any scenario shipped with vizdoom can be named as the
game (``available_games()``); those with monsters end when the player dies.

Conventions (the records and the model rely on them):

* Per recorded frame, a control vector of ``CONTROL_DIM = 3`` floats in
  [-1, 1] (``CONTROL_NAMES``), each mapped linearly onto a ViZDoom delta
  button held for ``frame_skip`` tics (35 tics per second):

  - ``controls[0]`` yaw rate: +1 turns right at ``MAX_TURN_DEG_PER_TIC`` = 4
    degrees per tic (8 degrees per recorded frame at the default
    frame_skip=2), -1 turns left (TURN_LEFT_RIGHT_DELTA);
  - ``controls[1]`` forward (+) / backward (-) at up to Doom's running speed
    (MOVE_FORWARD_BACKWARD_DELTA, ``MAX_FORWARD`` units);
  - ``controls[2]`` strafe right (+) / left (-) (MOVE_LEFT_RIGHT_DELTA,
    ``MAX_STRAFE`` units).

  Doom's movement has momentum: a held forward control accelerates to a
  steady speed over a few tics; turning is immediate.
* ``frames[0]`` is the screen ``WARMUP_TICS`` idle tics after reset (ZDoom
  ignores turning for the first 7 tics of a level: a control there would
  not show); ``frames[i]`` (i >= 1) the
  screen after holding ``controls[i]`` for ``frame_skip`` tics, so
  ``controls[i]`` is the control whose effect frame i shows; ``controls[0]``
  is zeros (nothing produced the first frame).
* ``poses[i]`` is the camera's pose when frame i was shown: x, y, z (map
  units), yaw (degrees, counter-clockwise, Doom's ANGLE: turning right
  decreases it) and pitch (degrees) -- ground truth for evaluation.
* Frames are the 160x120 RGB24 screen (no HUD, weapon or crosshair) area-
  averaged (image_utils.resize_area) to ``size``.
* The game is deterministic given ``seed`` and the controls:
  `DoomWorld.replay(controls, seed)` reproduces a recorded episode exactly.
* Headless: no window is opened and no sound is played.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Iterator

import numpy as np

from aapt_jax.data.worlds import frame_args
from aapt_jax.data.worlds.policies import ExplorerPolicy
from aapt_jax.image_utils import resize_area

try:
  import vizdoom as vzd
except ImportError as _e:  # pragma: no cover - vizdoom is in install_requires
  vzd = None
  _IMPORT_ERROR = _e

TICS_PER_SECOND = 35.0
MAX_TICS = 35 * 60 * 30          # 30 minutes of play per episode
CONTROL_NAMES = ("yaw", "forward", "strafe")
CONTROL_DIM = len(CONTROL_NAMES)
MAX_TURN_DEG_PER_TIC = 4.0       # controls[0] = +1: turn right this much per tic
MAX_FORWARD = 50.0               # controls[1] = +1: Doom's running forwardmove
MAX_STRAFE = 40.0                # controls[2] = +1: Doom's running sidemove
POSE_NAMES = ("x", "y", "z", "yaw", "pitch")
WARMUP_TICS = 8                  # ZDoom ignores turning for the first 7 tics of a level
DEFAULT_GAME = "freedoom2"
NO_MONSTERS = ("freedoom1", "freedoom2")  # whole levels, played without monsters


def _require_vizdoom():
  if vzd is None:
    raise ImportError("the Doom world needs vizdoom: pip install 'vizdoom>=1.3.2'") \
        from _IMPORT_ERROR


def available_games() -> list[str]:
  """The scenarios shipped with vizdoom (names of its .cfg files)."""
  _require_vizdoom()
  return sorted(f[:-4] for f in os.listdir(vzd.scenarios_path) if f.endswith(".cfg"))


def scenario_config(game: str) -> str:
  """Path of the scenario's .cfg; ValueError listing the valid names."""
  names = available_games()
  key = str(game).lower().replace("-", "_").replace(" ", "_")
  if key not in names:
    raise ValueError(f"unknown Doom scenario {game!r}: choose from {', '.join(names)}")
  return os.path.join(vzd.scenarios_path, key + ".cfg")


@dataclasses.dataclass
class Episode:
  frames: np.ndarray    # [T, h, w, 3] uint8
  controls: np.ndarray  # [T, 3] float32 in [-1, 1]; controls[i] produced frames[i]; [0] = 0
  poses: np.ndarray     # [T, 5] float32: x, y, z, yaw, pitch when frames[i] was shown
  rewards: np.ndarray   # [T] float32; the scenario's reward while producing frames[i]
  seed: int             # replay(controls, seed) reproduces frames and poses
  game_over: bool       # False when cut by max_frames

  actions = None        # no discrete actions in this world

  def __len__(self) -> int:
    return int(self.frames.shape[0])


class DoomWorld:
  """One ViZDoom game for one scenario (the world interface of
  `aapt_jax.data.worlds`; continuous controls, `num_actions` = 0).

  Args:
    game: a scenario name (default "my_way_home"; see the module docstring).
    size: frames are resized to `size x size` (int) or `(h, w)`.
    frame_skip: tics each control is held for per recorded frame; the
      recorded video runs at `fps = 35 / frame_skip`.
    max_tics: the episode's cap in tics.
  """
  DEFAULT_GAME = DEFAULT_GAME
  DEFAULT_FRAME_SKIP = 2

  def __init__(self, game: str = DEFAULT_GAME, *, size: int | tuple[int, int] = 64,
               frame_skip: int = 2, max_tics: int = MAX_TICS):
    _require_vizdoom()
    self._config_path = scenario_config(game)
    self.game = os.path.basename(self._config_path)[:-4]
    self.size, self.frame_skip = frame_args(size, frame_skip)
    self.max_tics = int(max_tics)
    self.num_actions = 0
    self.action_names: list[str] = []
    self.noop = None
    self.control_dim = CONTROL_DIM
    self.control_names = list(CONTROL_NAMES)
    self._scale = np.array([MAX_TURN_DEG_PER_TIC, MAX_FORWARD, MAX_STRAFE], np.float64)
    self._game = self._make_game()
    self.reset(seed=0)

  @property
  def fps(self) -> float:
    return TICS_PER_SECOND / self.frame_skip

  @property
  def max_yaw_deg_per_frame(self) -> float:
    """Degrees turned in one recorded frame at controls[0] = +-1."""
    return MAX_TURN_DEG_PER_TIC * self.frame_skip

  def _make_game(self):
    g = vzd.DoomGame()
    g.load_config(self._config_path)
    # ZDoom writes its settings file; keep it out of the working directory.
    g.set_doom_config_path(os.path.join(tempfile.gettempdir(), "aapt_jax_vizdoom.ini"))
    g.set_window_visible(False)
    g.set_sound_enabled(False)
    g.set_screen_resolution(vzd.ScreenResolution.RES_160X120)
    g.set_screen_format(vzd.ScreenFormat.RGB24)
    g.set_render_hud(False)
    g.set_render_weapon(False)
    g.set_render_crosshair(False)
    g.set_render_messages(False)
    g.set_available_buttons([vzd.Button.TURN_LEFT_RIGHT_DELTA,
                             vzd.Button.MOVE_FORWARD_BACKWARD_DELTA,
                             vzd.Button.MOVE_LEFT_RIGHT_DELTA])
    v = vzd.GameVariable
    g.set_available_game_variables([v.POSITION_X, v.POSITION_Y, v.POSITION_Z,
                                    v.ANGLE, v.PITCH])
    g.set_episode_timeout(self.max_tics)
    g.set_mode(vzd.Mode.PLAYER)
    g.set_audio_buffer_enabled(False)
    g.set_automap_buffer_enabled(False)
    if self.game in NO_MONSTERS:
      g.add_game_args("-nomonsters")
    g.init()
    return g

  def reset(self, seed: int = 0) -> np.ndarray:
    """Starts a new episode from `seed`; returns the first frame [h, w, 3]."""
    self._game.set_seed(int(seed) % (2**31))
    self._game.new_episode()
    self._game.make_action([0.0] * CONTROL_DIM, WARMUP_TICS)  # module docstring
    self._observe()
    return self._frame

  def _observe(self) -> bool:
    """Reads the screen and pose; False when the episode has no state left."""
    state = self._game.get_state()
    if state is None:
      return False
    self._frame = resize_area(state.screen_buffer, self.size)
    self._pose = np.asarray(state.game_variables, np.float32)
    return True

  def observe(self) -> np.ndarray:
    """The current frame [h, w, 3] (the last one shown once the episode ended)."""
    return self._frame

  def pose(self) -> np.ndarray:
    """The camera's pose now: float32 [5] = x, y, z, yaw, pitch (POSE_NAMES)."""
    return self._pose.copy()

  def game_over(self) -> bool:
    return bool(self._game.is_episode_finished())

  def check_controls(self, controls) -> np.ndarray:
    """`controls` as float64 [3]; ValueError unless 3 finite floats in [-1, 1]."""
    u = np.asarray(controls, np.float64)
    if u.shape != (CONTROL_DIM,) or not np.all(np.isfinite(u)):
      raise ValueError(f"controls must be {CONTROL_DIM} finite floats "
                       f"({', '.join(CONTROL_NAMES)}), got {controls!r}")
    if np.any(np.abs(u) > 1.0 + 1e-6):
      raise ValueError(f"controls must lie in [-1, 1], got {u.tolist()}")
    return np.clip(u, -1.0, 1.0)

  def _act(self, controls) -> tuple[bool, float, bool]:
    """Holds `controls` for frame_skip tics: (new frame shown?, reward, done)."""
    u = self.check_controls(controls)
    reward = self._game.make_action((u * self._scale).tolist(), self.frame_skip)
    done = self.game_over()
    shown = not done and self._observe()
    return shown, float(reward), done

  def step(self, controls) -> tuple[np.ndarray, float, bool]:
    """Holds `controls` (yaw, forward, strafe in [-1, 1]) for `frame_skip`
    tics; returns (frame, reward, done). Once done the frame is the last one
    shown (the game has no screen after its episode ends)."""
    _, reward, done = self._act(controls)
    return self._frame, reward, done

  def record_episode(self, seed: int = 0, policy=None, max_frames: int | None = None,
                     action_hold: int = 1) -> Episode:
    """Plays one episode from `seed` until it ends or `max_frames` frames.

    `policy(frame, pose) -> controls [3]` defaults to
    `ExplorerPolicy(seed=seed)`; it is asked every `action_hold` frames (one
    latent frame of a temporal-factor-r VAE with `action_hold=r`). The step
    that ends the episode shows no new screen and is not recorded.
    """
    if policy is None:
      policy = ExplorerPolicy(seed=seed)
    if max_frames is not None and max_frames < 1:
      raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    if action_hold < 1:
      raise ValueError(f"action_hold must be >= 1, got {action_hold}")
    frames, poses = [self.reset(seed)], [self.pose()]
    controls, rewards = [np.zeros(CONTROL_DIM, np.float32)], [0.0]
    done = self.game_over()
    u = controls[0]
    while not done and (max_frames is None or len(frames) < max_frames):
      if (len(frames) - 1) % action_hold == 0:
        u = np.asarray(policy(frames[-1], poses[-1]), np.float32)
      shown, reward, done = self._act(u)
      if not shown:
        break
      frames.append(self._frame)
      poses.append(self.pose())
      controls.append(u)
      rewards.append(reward)
    return Episode(frames=np.stack(frames), controls=np.stack(controls).astype(np.float32),
                   poses=np.stack(poses), rewards=np.asarray(rewards, np.float32),
                   seed=int(seed), game_over=bool(done))

  def episodes(self, num_episodes: int, seed: int = 0, *, max_frames: int | None = None,
               action_hold: int = 1) -> Iterator[Episode]:
    """`num_episodes` episodes of the explorer policy; episode k uses seed
    `seed + k` for both the game and the policy."""
    for k in range(num_episodes):
      yield self.record_episode(seed + k, ExplorerPolicy(seed=seed + k), max_frames,
                                action_hold)

  def replay_with_poses(self, controls, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(frames [T, h, w, 3], poses [T, 5]) from resetting with `seed` and
    holding `controls[1:]` ([T, 3]; controls[0] is ignored). Identical to the
    recorded ones for the same seed and controls; fewer when the episode ends
    before the controls do."""
    frames, poses = [self.reset(seed)], [self.pose()]
    for u in np.asarray(controls, np.float32)[1:]:
      if self.game_over() or not self._act(u)[0]:
        break
      frames.append(self._frame)
      poses.append(self.pose())
    return np.stack(frames), np.stack(poses)

  def replay(self, controls, seed: int = 0) -> np.ndarray:
    """Frames [T, h, w, 3] replaying `controls` from `seed` (replay_with_poses)."""
    return self.replay_with_poses(controls, seed)[0]

  def close(self) -> None:
    self._game.close()
