"""A world's first frames for seed starts, computed in a child process.

ale-py holds the GIL while it loads a ROM and resets (~0.3 s for Pong on
one core), so even on a worker thread a seed start would stall the play
server's event loop, and every other stream with it. `WorldResets` runs
them in one spawned process (started at the first seed start) that keeps
its world between calls.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing

import numpy as np

_WORLDS = {}  # in the child: (world, game, size, frame_skip) -> world


def first_frame(world: str, game: str, size: int, frame_skip: int, seed: int) -> np.ndarray:
  """The world's first frame after a reset with `seed` (runs in the child)."""
  from aapt_jax.data.worlds import make_world
  key = (world, game, size, frame_skip)
  if key not in _WORLDS:
    _WORLDS[key] = make_world(world, game, size=size, frame_skip=frame_skip)
  return _WORLDS[key].reset(seed)


class WorldResets:
  """Seed starts of the world `config.data` names, off the server's process."""

  def __init__(self, config):
    d = config.data
    self._args = (str(d.world), str(d.game), int(d.frame_size), int(d.frame_skip))
    self._pool: concurrent.futures.ProcessPoolExecutor | None = None

  async def frame(self, seed: int) -> np.ndarray:
    """uint8 [H, W, 3]: the world's frame after a reset with `seed`."""
    if self._pool is None:
      self._pool = concurrent.futures.ProcessPoolExecutor(
          1, mp_context=multiprocessing.get_context("spawn"))
    return await asyncio.get_running_loop().run_in_executor(
        self._pool, first_frame, *self._args, int(seed))

  def close(self) -> None:
    if self._pool is not None:
      self._pool.shutdown(wait=False, cancel_futures=True)
      self._pool = None
