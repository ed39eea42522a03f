"""Policies that play a world while it is recorded: (frame) -> action id for a
world of discrete actions, (frame, pose) -> control vector for a camera world;
`default_policy` picks one for a world."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

Policy = Callable[[np.ndarray], int]  # (current frame [H, W, 3]) -> action id
# (current frame [H, W, 3], camera pose [5]: x, y, z, yaw, pitch) -> controls [3]
ControlPolicy = Callable[[np.ndarray, np.ndarray], np.ndarray]


class StickyRandomPolicy:
  """Keeps the previous action with probability `repeat_prob`, otherwise
  draws uniformly from all actions. Seeded, so runs are reproducible.

  Gives varied play with temporally coherent motion (held keys), unlike
  i.i.d. random actions which mostly jitter in place.
  """

  def __init__(self, num_actions: int, repeat_prob: float = 0.75, seed: int = 0):
    if not 0.0 <= repeat_prob < 1.0:
      raise ValueError(f"repeat_prob must be in [0, 1), got {repeat_prob}")
    self.num_actions = num_actions
    self.repeat_prob = repeat_prob
    self._rng = np.random.default_rng(seed)
    self._action = int(self._rng.integers(num_actions))

  def __call__(self, frame: np.ndarray | None = None) -> int:
    del frame  # a blind policy
    if self._rng.random() >= self.repeat_prob:
      self._action = int(self._rng.integers(self.num_actions))
    return self._action


class ExplorerPolicy:
  """Walks a camera world: smooth random turning and walking, and backing off
  and turning away when it stops moving (a wall). Seeded.

  Returns controls [3] float32 in [-1, 1]: yaw rate (+ = right), forward
  speed (+ = forward), strafe (+ = right). Each is a first-order low-pass
  (`smoothing` of the previous value kept per frame) of a target redrawn
  with probability `change_prob` per frame: the yaw target uniform in
  [-1, 1] (zero a third of the time, to walk straight), forward mostly ahead
  (0.3..1, backward 10 % of the time), strafe zero half of the time.

  Stuck: when the position (pose x, y) moved less than `stuck_distance` map
  units over the last `stuck_frames` frames while walking was asked for, it
  turns hard one way (chosen at random) while backing up for `escape_frames`
  frames, then draws new targets.
  """

  def __init__(self, seed: int = 0, change_prob: float = 0.08, smoothing: float = 0.75,
               stuck_frames: int = 6, stuck_distance: float = 16.0,
               escape_frames: int = 8):
    if not 0.0 <= change_prob <= 1.0:
      raise ValueError(f"change_prob must be in [0, 1], got {change_prob}")
    if not 0.0 <= smoothing < 1.0:
      raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    self.change_prob, self.smoothing = change_prob, smoothing
    self.stuck_frames, self.stuck_distance = int(stuck_frames), float(stuck_distance)
    self.escape_frames = int(escape_frames)
    self._rng = np.random.default_rng(seed)
    self._target = self._draw_target()
    self._controls = np.zeros(3, np.float64)
    self._positions: list[np.ndarray] = []
    self._escape = 0
    self._escape_turn = 1.0

  def _draw_target(self) -> np.ndarray:
    r = self._rng
    yaw = 0.0 if r.random() < 1 / 3 else r.uniform(-1.0, 1.0)
    forward = -r.uniform(0.3, 0.8) if r.random() < 0.1 else r.uniform(0.3, 1.0)
    strafe = 0.0 if r.random() < 0.5 else r.uniform(-0.8, 0.8)
    return np.array([yaw, forward, strafe])

  def _stuck(self) -> bool:
    if len(self._positions) <= self.stuck_frames:
      return False
    moved = np.linalg.norm(self._positions[-1] - self._positions[-1 - self.stuck_frames])
    return moved < self.stuck_distance and abs(self._target[1]) > 0.2

  def __call__(self, frame: np.ndarray | None = None,
               pose: np.ndarray | None = None) -> np.ndarray:
    del frame  # steers by the pose
    if pose is not None:
      self._positions = (self._positions + [np.asarray(pose[:2], np.float64)])[-32:]
    if self._escape > 0:
      self._escape -= 1
      target = np.array([self._escape_turn, -0.6, 0.0])
      if self._escape == 0:
        self._target = self._draw_target()
        self._positions = self._positions[-1:]
    elif self._stuck():
      self._escape = self.escape_frames
      self._escape_turn = 1.0 if self._rng.random() < 0.5 else -1.0
      target = np.array([self._escape_turn, -0.6, 0.0])
    else:
      if self._rng.random() < self.change_prob:
        self._target = self._draw_target()
      target = self._target
    a = self.smoothing
    self._controls = np.clip(a * self._controls + (1 - a) * target, -1.0, 1.0)
    return self._controls.astype(np.float32)


def default_policy(world, seed: int = 0, repeat_prob: float = 0.75):
  """The policy a world is recorded with: `StickyRandomPolicy` over its
  actions (keeping the previous one with probability `repeat_prob`) for a
  world of discrete actions, `ExplorerPolicy` for a camera world
  (control_dim > 0; `repeat_prob` unused)."""
  if getattr(world, "control_dim", 0):
    return ExplorerPolicy(seed=seed)
  return StickyRandomPolicy(world.num_actions, repeat_prob, seed=seed)
