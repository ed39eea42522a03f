"""Object-level scores of predicted frames against the emulator's RAM truth,
and action following (does the player's paddle move the way the action says).

Per-frame series over frames 0..T (NaN where not defined), as in metrics.py:
  `<obj>_present`  1/0: the detector finds the object in the predicted frame,
                   on frames where the RAM says it is on the screen (recall);
  `<obj>_phantom`  1/0: found where the RAM says it is not (false presence);
  `<obj>_error`    distance (frame pixels) from the RAM position, where both;
  `follow`         1/0: on frames whose action moves the player's paddle, the
                   detected paddle moved that way since the frame before.
"""
from __future__ import annotations

import numpy as np

from aapt_jax.evaluation import ram_objects
from aapt_jax.evaluation.detectors import detect

# Per game: the actions that move the player's paddle, with the sign of the
# frame-row change they ask for (Pong: RIGHT = up the screen). Measured on the
# emulator (tests/test_evaluation_objects.py).
# A move smaller than this (frame pixels) is detector jitter, not a move.
MOVE_MIN = 0.2
PLAYER_MOVES = {"Pong": ("player", {"RIGHT": -1, "RIGHTFIRE": -1, "LEFT": 1, "LEFTFIRE": 1})}


def ram_truth(game: str, rams: np.ndarray, frame_size) -> list[dict]:
  """Per frame {object: (x, y) in frame pixels or None} from rams uint8 [T+1, 128]."""
  return [{k: ram_objects.to_frame(p, frame_size)
           for k, p in ram_objects.objects_from_ram(game, r).items()} for r in rams]


def detections(game: str, frames: np.ndarray, valid: np.ndarray) -> list[dict | None]:
  """Per frame the detector's {object: position or None}; None where not `valid`."""
  return [detect(game, f) if ok else None for f, ok in zip(frames, valid)]


def object_series(truth: list[dict], found: list[dict | None]) -> dict[str, np.ndarray]:
  """`<obj>_present`, `<obj>_phantom`, `<obj>_error` series (module docstring);
  `truth` may be shorter than `found` (the emulator's game ended)."""
  n = len(found)
  names = list(truth[0]) if truth else []
  out = {f"{k}_{s}": np.full(n, np.nan) for k in names for s in ("present", "phantom", "error")}
  for i in range(1, min(n, len(truth))):
    if found[i] is None:
      continue
    for k in names:
      t, d = truth[i][k], found[i][k]
      if t is None:
        out[f"{k}_phantom"][i] = float(d is not None)
        continue
      out[f"{k}_present"][i] = float(d is not None)
      if d is not None:
        out[f"{k}_error"][i] = float(np.hypot(d[0] - t[0], d[1] - t[1]))
  return out


def follow_series(game: str, action_names: list[str], actions: np.ndarray,
                  found: list[dict | None], before: list[dict | None]) -> np.ndarray:
  """1/0 per frame i whose action moves the player: the paddle detected in
  frame i (`found[i]`) moved the asked way from `before[i]` (the frame the
  predictor started from: its own previous frame open loop, the real previous
  frame teacher forced); NaN elsewhere or when either detection is missing."""
  out = np.full(len(found), np.nan)
  if game not in PLAYER_MOVES:
    return out
  name, moves = PLAYER_MOVES[game]
  for i in range(1, len(found)):
    sign = moves.get(action_names[int(actions[i])])
    if sign is None or found[i] is None or before[i] is None:
      continue
    now, then = found[i][name], before[i][name]
    if now is None or then is None:
      continue
    moved = now[1] - then[1]
    out[i] = float(abs(moved) >= MOVE_MIN and np.sign(moved) == sign)
  return out
