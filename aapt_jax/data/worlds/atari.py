"""Atari worlds from ale-py: frames + the actions that produced them.

Conventions (the records and the model rely on them):

* Sticky actions are OFF (``repeat_action_probability=0``; ALE's default 0.25
  would silently repeat the previous action and we would record the wrong
  one), so the recorded action is the action actually executed.
* ``frames[0]`` is the screen one ``frame_skip`` of NOOP after reset (some
  games, Pong among them, show a power-on screen of another colour for the
  very first emulator frame, which no later frame resembles: a start frame
  no model should have to leave); ``frames[i]`` (i >= 1) is the
  screen after holding ``actions[i]`` for ``frame_skip`` emulator frames, so
  ``actions[i]`` is the action whose effect frame i shows. ``actions[0]`` is
  NOOP (nothing produced the first frame).
* Action ids index the game's *minimal* action set (``action_names``).
* Frames are the full 210x160 RGB screen area-averaged ("box" filter, exact
  pixel-overlap weights, like OpenCV's INTER_AREA) to ``size x size``.
* The emulator is deterministic given ``seed`` and the action sequence:
  `AtariWorld.replay(actions, seed)` reproduces a recorded episode exactly.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Iterator

import numpy as np

from aapt_jax.data.worlds import frame_args
from aapt_jax.data.worlds.policies import Policy, StickyRandomPolicy
from aapt_jax.image_utils import resize_area

try:
  import ale_py
  from ale_py import roms as _roms
except ImportError as _e:  # pragma: no cover - ale-py is in install_requires
  ale_py = None
  _IMPORT_ERROR = _e

EMULATOR_FPS = 60.0
MAX_EMULATOR_FRAMES = 108_000  # 30 minutes of play, the usual ALE cap.

def _require_ale():
  if ale_py is None:
    raise ImportError("the Atari world needs ale-py: pip install 'ale-py>=0.9'") \
        from _IMPORT_ERROR


def _display_name(rom_id: str) -> str:
  return "".join(part.capitalize() for part in rom_id.split("_"))


def _normalise(name: str) -> str:
  return re.sub(r"[^a-z0-9]", "", name.lower())


def available_games() -> list[str]:
  """Display names ("Pong", "MsPacman", ...) of all ROMs shipped with ale-py."""
  _require_ale()
  return sorted(_display_name(r) for r in _roms.get_all_rom_ids())


def rom_id(game: str) -> str:
  """ale-py's ROM id for a game name: "MsPacman", "ms_pacman", "ms-pacman" ->
  "ms_pacman". Unknown names raise ValueError listing valid ones."""
  _require_ale()
  ids = {_normalise(r): r for r in _roms.get_all_rom_ids()}
  key = _normalise(str(game))
  if key in ids:
    return ids[key]
  close = difflib.get_close_matches(key, list(ids), n=3, cutoff=0.6)
  hint = f" Did you mean {', '.join(_display_name(ids[c]) for c in close)}?" if close else ""
  examples = ["Pong", "Breakout", "Freeway", "MsPacman", "SpaceInvaders",
              "Seaquest", "Enduro", "Boxing"]
  raise ValueError(
      f"unknown Atari game {game!r}.{hint} Valid names include "
      f"{', '.join(examples)} ({len(ids)} games; see "
      "aapt_jax.data.worlds.atari.available_games()).")


@dataclasses.dataclass
class Episode:
  frames: np.ndarray   # [T, size, size, 3] uint8
  actions: np.ndarray  # [T] int32; actions[i] produced frames[i]; actions[0] = NOOP
  rewards: np.ndarray  # [T] float32; reward collected while producing frames[i]
  seed: int            # replay(actions, seed) reproduces frames
  game_over: bool      # False when cut by max_frames

  def __len__(self) -> int:
    return int(self.frames.shape[0])


class AtariWorld:
  """One ALE emulator for one game (the world interface of
  `aapt_jax.data.worlds`; actions are ids, `control_dim` = 0).

  Args:
    game: a game name ("Pong", "Breakout", "Freeway", "MsPacman", ...).
    size: frames are resized to `size x size` (int) or `(h, w)`.
    frame_skip: emulator frames each action is held for per recorded frame;
      the recorded video runs at `fps = 60 / frame_skip`.
    max_emulator_frames: ALE's per-episode cap (a safety net for games that
      never end under a random policy).
    mode, difficulty: optional ALE game mode / difficulty.
  """
  DEFAULT_GAME = "Pong"
  DEFAULT_FRAME_SKIP = 4

  def __init__(self, game: str, *, size: int | tuple[int, int] = 64,
               frame_skip: int = 4, max_emulator_frames: int = MAX_EMULATOR_FRAMES,
               mode: int | None = None, difficulty: int | None = None):
    _require_ale()
    self.rom_id = rom_id(game)
    self.game = _display_name(self.rom_id)
    self.size, self.frame_skip = frame_args(size, frame_skip)
    self.max_emulator_frames = int(max_emulator_frames)
    self.mode, self.difficulty = mode, difficulty
    ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Error)
    self._ale = None
    self.reset(seed=0)
    self._actions = list(self._ale.getMinimalActionSet())
    self.action_names = [a.name for a in self._actions]
    self.num_actions = len(self._actions)
    self.noop = self.action_names.index("NOOP") if "NOOP" in self.action_names else 0
    self.control_dim = 0

  @property
  def fps(self) -> float:
    return EMULATOR_FPS / self.frame_skip

  @property
  def ale(self):
    """The underlying `ale_py.ALEInterface` (read settings back from it)."""
    return self._ale

  def reset(self, seed: int = 0) -> np.ndarray:
    """Starts a new game from `seed`; returns the first frame [h, w, 3]."""
    ale = ale_py.ALEInterface()
    ale.setInt("random_seed", int(seed) % (2**31))
    ale.setFloat("repeat_action_probability", 0.0)  # sticky actions OFF
    ale.setInt("frame_skip", 1)  # we hold actions ourselves (see step)
    ale.setInt("max_num_frames_per_episode", self.max_emulator_frames)
    ale.loadROM(_roms.get_rom_path(self.rom_id))
    if self.mode is not None:
      ale.setMode(int(self.mode))
    if self.difficulty is not None:
      ale.setDifficulty(int(self.difficulty))
    ale.reset_game()
    for _ in range(self.frame_skip):  # past the power-on screen (module docstring)
      ale.act(ale_py.Action.NOOP)
    self._ale = ale
    return self.observe()

  def observe(self) -> np.ndarray:
    return resize_area(self._ale.getScreenRGB(), self.size)

  def ram(self) -> np.ndarray:
    """The console's 128 bytes of RAM now (uint8 [128], a copy): positions and
    scores as the game itself keeps them, ground truth for evaluation."""
    return np.array(self._ale.getRAM(), np.uint8)

  def game_over(self) -> bool:
    return bool(self._ale.game_over())

  def step(self, action: int) -> tuple[np.ndarray, float, bool]:
    """Holds `action` (an index into `action_names`) for `frame_skip`
    emulator frames (fewer if the game ends); returns (frame, reward, done)."""
    action = int(action)
    if not 0 <= action < self.num_actions:
      raise ValueError(f"action {action} out of range [0, {self.num_actions}) "
                       f"for {self.game} ({self.action_names})")
    reward = 0.0
    for _ in range(self.frame_skip):
      reward += self._ale.act(self._actions[action])
      if self._ale.game_over():
        break
    return self.observe(), float(reward), self.game_over()

  def record_episode(self, seed: int = 0, policy: Policy | None = None,
                     max_frames: int | None = None, action_hold: int = 1) -> Episode:
    """Plays one episode from `seed` until game over or `max_frames` frames.

    `policy` defaults to `StickyRandomPolicy(num_actions, seed=seed)`; it is
    asked for a new action every `action_hold` frames (hold an action for one
    latent frame of a temporal-factor-r VAE with `action_hold=r`: frames
    1..r share an action, r+1..2r the next, ...), with the emulator at the
    frame it is given (a policy may read `ram()`, as `PongRallyPolicy` does).
    """
    if policy is None:
      policy = StickyRandomPolicy(self.num_actions, seed=seed)
    if max_frames is not None and max_frames < 1:
      raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    if action_hold < 1:
      raise ValueError(f"action_hold must be >= 1, got {action_hold}")
    frame = self.reset(seed)
    frames, actions, rewards = [frame], [self.noop], [0.0]
    done = self.game_over()
    action = self.noop
    while not done and (max_frames is None or len(frames) < max_frames):
      if (len(frames) - 1) % action_hold == 0:
        action = int(policy(frame))
      frame, reward, done = self.step(action)
      frames.append(frame)
      actions.append(action)
      rewards.append(reward)
    return Episode(frames=np.stack(frames), actions=np.asarray(actions, np.int32),
                   rewards=np.asarray(rewards, np.float32), seed=int(seed),
                   game_over=bool(done))

  def episodes(self, num_episodes: int, seed: int = 0, *, max_frames: int | None = None,
               repeat_prob: float = 0.75, action_hold: int = 1) -> Iterator[Episode]:
    """`num_episodes` episodes with a sticky-random policy; episode k uses
    seed `seed + k` for both the emulator and the policy."""
    for k in range(num_episodes):
      policy = StickyRandomPolicy(self.num_actions, repeat_prob, seed=seed + k)
      yield self.record_episode(seed + k, policy, max_frames, action_hold)

  def replay(self, actions, seed: int = 0) -> np.ndarray:
    """Frames [T, h, w, 3] from resetting with `seed` and executing
    `actions[1:]` (actions[0] is the initial no-op, ignored). Identical to the
    recorded frames for the same seed and actions. Stops early (fewer frames)
    if the game ends before the actions do."""
    frames = [self.reset(seed)]
    for a in np.asarray(actions)[1:]:
      if self.game_over():
        break
      frames.append(self.step(int(a))[0])
    return np.stack(frames)
