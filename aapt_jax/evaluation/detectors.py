"""Object detectors on (generated or real) frames, one per supported game.

They work at the model's frame size (64 x 64 for the shipped world), where
the area resize blends a 2 x 4-pixel Pong ball into a few pixels of the
brown field. So the Pong detector unmixes colours: on the field every pixel
is the background plus some coverage of the ball's white, the player's green
and the enemy's orange; the three colours' offsets from the background are
independent in RGB, so a 3 x 3 solve gives each pixel's coverage of each.
An object is present where its coverage adds up to a good part of its area,
and sits at the coverage-weighted centre.

Positions are (x, y) in frame pixels (pixel (i, j) covers [j, j+1) x [i, i+1)),
as `ram_objects.to_frame` gives the truth; None = not found.
"""
from __future__ import annotations

import numpy as np

from aapt_jax.evaluation.ram_objects import SCREEN_H, SCREEN_W, Position

# Pong's colours (ALE palette) on the full screen.
_PONG_BACKGROUND = np.array([144, 72, 17], np.float64)
_PONG_COLOURS = np.array([[236, 236, 236],    # ball (white)
                          [92, 186, 92],      # player paddle (green, right)
                          [213, 130, 74]],    # enemy paddle (orange, left)
                         np.float64)
_PONG_UNMIX = np.linalg.inv((_PONG_COLOURS - _PONG_BACKGROUND).T)   # RGB offset -> coverages
# Presence thresholds, in screen pixels of coverage: at least half the ball
# (8 pixels) in its window, an eighth of a paddle (64 pixels; paddles are cut
# at the field's edges) in its window. And isolation:
# the object's window must hold most of the colour around it, which a noisy or
# textured field (colour everywhere) does not.
_BALL_MIN_AREA, _PADDLE_MIN_AREA = 4.0, 8.0
_ISOLATION = 0.7


def pong_coverage(frame: np.ndarray) -> np.ndarray:
  """[H, W, 3] uint8 -> [H, W, 3] coverage in [0, 1] of (ball, player, enemy)
  colour per pixel (negative parts clipped)."""
  offset = frame.astype(np.float64) - _PONG_BACKGROUND                # [H, W, 3]
  return np.clip(offset @ _PONG_UNMIX.T, 0.0, 1.0)


def _window_sums(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Sums of `x` [H, W] over every size[0] x size[1] window (top-left anchored),
  [H - size[0] + 1, W - size[1] + 1]."""
  c = np.pad(np.cumsum(np.cumsum(x, 0), 1), ((1, 0), (1, 0)))
  a, b = size
  return c[a:, b:] - c[:-a, b:] - c[a:, :-b] + c[:-a, :-b]


def _centre(w: np.ndarray, top: int, left: int) -> tuple[float, float]:
  """Coverage-weighted (x, y) centre of window `w` placed at (top, left)."""
  ys, xs = np.mgrid[top:top + w.shape[0], left:left + w.shape[1]]
  total = w.sum()
  return float((w * (xs + 0.5)).sum() / total), float((w * (ys + 0.5)).sum() / total)


def _find(cover: np.ndarray, size: tuple[int, int], min_area: float, margin: int):
  """(x, y) of the window of `size` holding the most coverage, if it holds
  `min_area` (frame pixels) and `_ISOLATION` of the coverage within `margin`
  pixels around it; else None."""
  if cover.shape[0] < size[0] or cover.shape[1] < size[1]:
    return None
  sums = _window_sums(cover, size)
  i, j = np.unravel_index(int(np.argmax(sums)), sums.shape)
  best = sums[i, j]
  if best < min_area:
    return None
  lo_i, lo_j = max(i - margin, 0), max(j - margin, 0)
  around = cover[lo_i:i + size[0] + margin, lo_j:j + size[1] + margin].sum()
  if best < _ISOLATION * around:
    return None
  # centre over the window grown by one pixel (the area blur spreads an object)
  g_i, g_j = max(i - 1, 0), max(j - 1, 0)
  return _centre(cover[g_i:i + size[0] + 1, g_j:j + size[1] + 1], g_i, g_j)


def detect_pong(frame: np.ndarray) -> dict[str, Position]:
  """Ball, player paddle and enemy paddle in a Pong frame of any size."""
  h, w = frame.shape[:2]
  sx, sy = w / SCREEN_W, h / SCREEN_H                     # frame pixels per screen pixel
  area = sx * sy                                          # frame pixels per screen pixel^2
  # Field rows only (no score digits): for the ball (white) without the rows
  # the white walls blend into; for the paddles with them (a blend of wall and
  # field unmixes to white alone).
  cover = pong_coverage(frame)
  b_top, b_bottom = int(np.ceil(34 * sy)), int(np.floor(194 * sy))
  ball = (max(int(np.ceil(4 * sy)), 1) + 1, max(int(np.ceil(2 * sx)), 1) + 1)
  found = _find(cover[b_top:b_bottom, :, 0], ball, _BALL_MIN_AREA * area, margin=2)
  out: dict[str, Position] = {"ball": None if found is None else (found[0], found[1] + b_top)}
  top, bottom = int(np.floor(34 * sy)), int(np.ceil(194 * sy))
  # Paddles: in their own column bands (player x 140..143, enemy 16..19).
  for name, channel, x0 in (("player", 1, 140), ("enemy", 2, 16)):
    c0, c1 = int(np.floor((x0 - 2) * sx)), int(np.ceil((x0 + 6) * sx))
    band = cover[top:bottom, c0:c1, channel]
    size = (max(int(np.round(16 * sy)), 1), band.shape[1])
    found = _find(band, size, _PADDLE_MIN_AREA * area, margin=3)
    out[name] = None if found is None else (found[0] + c0, found[1] + top)
  return out


DETECTORS = {"Pong": detect_pong}


def detect(game: str, frame: np.ndarray) -> dict[str, Position]:
  """{object name: (x, y) or None} in `frame`; ValueError for a game without a detector."""
  if game not in DETECTORS:
    raise ValueError(f"no object detector for {game!r}: detectors exist for "
                     f"{sorted(DETECTORS)} (aapt_jax/evaluation/detectors.py)")
  return DETECTORS[game](np.asarray(frame))
