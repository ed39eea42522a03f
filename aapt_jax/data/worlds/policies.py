"""Policies that play a world while it is recorded: (frame) -> action id."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

Policy = Callable[[np.ndarray], int]  # (current frame [H, W, 3]) -> action id


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
