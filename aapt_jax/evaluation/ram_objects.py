"""Object truth from the emulator's RAM: where the game's objects are, per game.

Positions are the centres of the objects' visible pixels in the full Atari
screen (160 wide, 210 tall; pixel (x, y) covers [x, x+1) x [y, y+1)), or None
where the object is not on the screen (a Pong ball between points). Scale them
to a resized frame with `to_frame`.

The table, one entry per supported game (`RAM_TABLES`), names the RAM bytes;
their mapping to screen pixels was measured against the screen itself (every
sticky-random frame of a 400-frame Pong game; see tests/test_evaluation_objects.py).
"""
from __future__ import annotations

import dataclasses

import numpy as np

SCREEN_W, SCREEN_H = 160, 210
Position = tuple[float, float] | None   # (x, y) or None (not on the screen)


@dataclasses.dataclass(frozen=True)
class PongRam:
  """Pong (AtariARI's annotations: ball_x 49, ball_y 54, player_y 51,
  enemy_y 50). Measured on the screen: the ball's left column is
  ram[49] - 49 and its top row ram[54] - 14 (2 x 4 pixels); the player's
  (green, right) paddle rows start at ram[51] - 13, the enemy's (orange, left)
  at ram[50] - 15 (4 x 16 pixels, cut by the field's edges, rows 34..193);
  the paddles' columns are 140..143 and 16..19."""
  ball_x: int = 49
  ball_y: int = 54
  player_y: int = 51
  enemy_y: int = 50
  field_rows: tuple[int, int] = (34, 194)   # [top, bottom) of the playing field

  def objects(self, ram: np.ndarray) -> dict[str, Position]:
    top, bottom = self.field_rows
    x, y = int(ram[self.ball_x]) - 49, int(ram[self.ball_y]) - 14
    ball = None
    if ram[self.ball_y] != 0 and top <= y and y + 4 <= bottom + 1 and 0 <= x < SCREEN_W:
      ball = (x + 1.0, (y + min(y + 4, bottom)) / 2.0)

    def paddle(row, column):
      lo, hi = max(row, top), min(row + 16, bottom)
      return None if hi <= lo else (column + 2.0, (lo + hi) / 2.0)

    return {"ball": ball,
            "player": paddle(int(ram[self.player_y]) - 13, 140),
            "enemy": paddle(int(ram[self.enemy_y]) - 15, 16)}

  def player_centre_y(self, ram: np.ndarray) -> float:
    """The player's paddle's centre row, also where the field's edges hide
    part of it (`objects` gives the visible part's centre)."""
    return int(ram[self.player_y]) - 13 + 8.0


RAM_TABLES = {"Pong": PongRam()}


def supported(game: str) -> bool:
  return game in RAM_TABLES


def objects_from_ram(game: str, ram: np.ndarray) -> dict[str, Position]:
  """{object name: (x, y) screen centre or None} for `game` (a display name as
  `AtariWorld.game`); ValueError for a game without a RAM table."""
  if game not in RAM_TABLES:
    raise ValueError(f"no RAM table for {game!r}: object truth is known for "
                     f"{sorted(RAM_TABLES)} (aapt_jax/evaluation/ram_objects.py)")
  return RAM_TABLES[game].objects(np.asarray(ram))


def to_frame(position: Position, frame_size: tuple[int, int]) -> Position:
  """A screen position scaled to a frame of `frame_size` (H, W) (the area
  resize of AtariWorld keeps pixel centres' relative places)."""
  if position is None:
    return None
  h, w = frame_size
  return (position[0] * w / SCREEN_W, position[1] * h / SCREEN_H)
