"""The emulator's game and the model's open-loop rollout on the same actions.

Per seed: the world resets with `seed`, a seeded sticky-random policy picks an
action per latent frame, the emulator plays them (its frames and RAM are the
truth), and the model, started from the emulator's frame 0, is stepped with
the same actions and never sees another real frame (open loop). The game may
end (Pong under random play lasts ~800-1000 frames): the emulator's frames stop
there while the policy keeps drawing actions for the model's rollout.

A camera world (control_dim > 0, e.g. doom) is played by its explorer policy
instead (`world.record_episode`): `actions` holds its control vectors
[T+1, A] (zeros after its episode ends) and `ram` is empty ([R, 0]); the
camera poses are in `poses`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from aapt_jax.data.worlds.policies import StickyRandomPolicy


@dataclasses.dataclass
class Episode:
  """One seed's frames. `actions[i]` is the action whose effect frame i shows
  (actions[0] = NOOP, the start frame's)."""
  seed: int
  actions: np.ndarray     # int32 [T+1]; a camera world: float32 controls [T+1, A]
  real: np.ndarray        # uint8 [R, H, W, 3], R <= T+1 (the game may end)
  ram: np.ndarray         # uint8 [R, 128]
  generated: np.ndarray | None = None   # uint8 [T+1, H, W, 3]
  poses: np.ndarray | None = None       # float32 [R, 5]: a camera world's camera

  @property
  def frames(self) -> int:
    """Latent frames after the start frame (T)."""
    return len(self.actions) - 1


def play_emulator(world, seed: int, frames: int,
                  repeat_prob: float = 0.75) -> Episode:
  """`frames` actions of the sticky-random policy seeded with `seed` and the
  emulator's frames and RAM for them (until its game ends); in a camera world
  the explorer's controls, frames and poses (module docstring)."""
  if world.control_dim:
    ep = world.record_episode(seed, max_frames=frames + 1)
    pad = np.zeros((frames + 1 - len(ep), world.control_dim), np.float32)
    return Episode(seed=int(seed), actions=np.concatenate([ep.controls, pad]),
                   real=ep.frames, ram=np.zeros((len(ep), 0), np.uint8), poses=ep.poses)
  policy = StickyRandomPolicy(world.num_actions, repeat_prob, seed=seed)
  actions = [world.noop] + [policy() for _ in range(frames)]
  real, ram = [world.reset(seed)], [world.ram()]
  for a in actions[1:]:
    if world.game_over():
      break
    real.append(world.step(a)[0])
    ram.append(world.ram())
  return Episode(seed=int(seed), actions=np.asarray(actions, np.int32),
                 real=np.stack(real), ram=np.stack(ram))


def roll_out(session, episode: Episode, on_frame: Callable[[], None] | None = None) -> np.ndarray:
  """The model's open-loop frames uint8 [T+1, H, W, 3] from the episode's
  real start frame and actions (`session`: a StreamingSession of a world with
  one video frame per latent frame; its noise seed is the episode's seed).
  `on_frame` is called after each frame (a progress bar)."""
  if session.model.frames_per_latent != 1:
    raise ValueError("the evaluation compares one video frame per latent frame; this "
                     f"model decodes {session.model.frames_per_latent} (a VAE world)")
  out = [session.start(first_frame=episode.real[0], seed=episode.seed)[0]]
  for a in episode.actions[1:]:
    out.append(session.step(a if np.ndim(a) else int(a))[0])  # a control vector or an id
    if on_frame:
      on_frame()
  return np.stack(out)
