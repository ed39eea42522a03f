"""Rallies in a Pong game, from the emulator's RAM: how much of a recording
shows the ball in play, and how often the player sends it back."""
from __future__ import annotations

import numpy as np

from aapt_jax.evaluation import ram_objects

# A return is the ball's horizontal motion turning from rightward to leftward
# in the right half of the screen (the player's paddle is at columns 140..143).
_RIGHT_HALF = ram_objects.SCREEN_W / 2
# The ball blinks out for a frame or two at the walls; a longer absence is
# the pause between points.
_BLINK_FRAMES = 3


def pong_rallies(rams: np.ndarray, rewards: np.ndarray) -> dict[str, float]:
  """Rally statistics of a Pong game: `rams` uint8 [T, 128] (the RAM after
  each frame), `rewards` [T] (the player's reward per frame).

  Returns {"frames", "ball_visible" (the fraction of frames with the ball on
  the screen), "returns" (times the player's paddle sent the ball back),
  "rallies" (stretches of frames with the ball on the screen, absences of up
  to 3 frames -- it blinks at the walls -- included: serve to point, the
  last one possibly cut by the recording's end),
  "mean_rally" (returns per rally), "points_won", "points_lost"}.
  """
  balls = [ram_objects.objects_from_ram("Pong", r)["ball"] for r in np.asarray(rams)]
  returns = rallies = 0
  prev, heading = None, 0    # the ball's last position and horizontal direction (+1 right)
  unseen = _BLINK_FRAMES + 1  # frames since the ball was last seen
  for ball in balls:
    if ball is None:
      unseen += 1
      if unseen > _BLINK_FRAMES:
        prev, heading = None, 0
      continue
    unseen = 0
    if prev is None:
      rallies += 1
    elif ball[0] != prev[0]:
      direction = 1 if ball[0] > prev[0] else -1
      returns += heading == 1 and direction == -1 and ball[0] > _RIGHT_HALF
      heading = direction
    prev = ball
  rewards = np.asarray(rewards)
  return {"frames": len(balls),
          "ball_visible": float(np.mean([b is not None for b in balls])) if balls else 0.0,
          "returns": int(returns), "rallies": int(rallies),
          "mean_rally": returns / rallies if rallies else 0.0,
          "points_won": int(np.sum(rewards > 0)), "points_lost": int(np.sum(rewards < 0))}


def episode_rams(world, actions, seed: int) -> np.ndarray:
  """The RAM uint8 [T, 128] after each frame of the Atari `world`'s episode
  of `actions` (actions[0], the start frame's, is not played) from `seed`:
  a replay reading the console after each step."""
  world.reset(seed)
  rams = [world.ram()]
  for a in np.asarray(actions)[1:]:
    world.step(int(a))
    rams.append(world.ram())
  return np.stack(rams)
