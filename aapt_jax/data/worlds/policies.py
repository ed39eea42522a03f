"""Policies that play a world while it is recorded: (frame) -> action id for a
world of discrete actions, (frame, pose) -> control vector for a camera world;
`make_policy` builds one by name for a world ("": the world's own)."""
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


class PongRallyPolicy:
  """Plays Pong's player paddle (the right, green one) to keep the ball in
  play, so a recording shows rallies, not mostly serves and misses. Returns
  action ids of Pong's minimal set (`action_names`: RIGHT moves the paddle
  up, LEFT down, NOOP holds; the FIRE variants move alike and are taken half
  of the time, so every id keeps its meaning in the data).

  Each call reads the console's RAM (`ram()` -> uint8 [128], now) for where
  the ball is (`aapt_jax.evaluation.ram_objects.PongRam`) and:

  * while the ball comes toward the paddle, steers toward the row where the
    ball's path (its motion since it was last seen, folded at the field's
    walls) crosses the paddle's column, plus an aim offset drawn once per
    approach: uniform in +-`aim_spread` rows (where the ball meets the paddle
    sets the return's angle, so rallies vary), or, with probability
    `miss_prob`, past the paddle's end (a miss: the score moves). With
    probability `slip_prob` per call it takes a random action instead.
  * otherwise (the ball going away, or gone between points) it plays
    sticky-random (`StickyRandomPolicy(repeat_prob)`): varied moves of every
    action while nothing is at stake.

  Steering: Pong's paddle is a knob the keys turn; the paddle glides to the
  knob's row with a lag of a few frames. The policy keeps the knob's row
  itself (each held key moves it `KNOB_SPEED` rows per emulator frame, for
  `frame_skip` frames per call, between `KNOB_RANGE`), re-reading it from
  the paddle whenever the paddle has come to rest, and turns it toward the
  target until it is within half a call's turn of it (within `NUDGE` rows
  in the last call before the ball arrives: a key pressed then moves the
  lagging paddle part of a turn by the time they meet). The knob's rows are
  a grid of that turn (23 rows at frame skip 4, more than the ~18 rows of
  contact), so a paddle aimed perfectly still misses some balls.

  Deterministic given `seed` and the RAM it reads.
  """
  PADDLE_X = 139.0           # ball centre x where it meets the paddle (columns 140..143)
  BALL_Y = (36.0, 192.0)     # ball centre rows between the field's walls
  # The ball (centre row b) meets the paddle (drawn centre row p) for b - p
  # in about [-10, 8] (read off hits and misses on the emulator): the middle
  # of that span is HIT_ROW rows above p, its half-width CONTACT.
  HIT_ROW, CONTACT = -1.0, 9.0
  LAST_CALL, NUDGE = 1.0, 6.0  # within LAST_CALL calls of contact: rest within NUDGE rows
  MAX_GAP = 3                # calls the ball may be unseen (it blinks at a wall)
  KNOB_SPEED = 5.75          # measured on the emulator (tests/test_policies_pong.py)
  KNOB_RANGE = (10.0, 199.0)

  def __init__(self, action_names, ram: Callable[[], np.ndarray], seed: int = 0,
               frame_skip: int = 4, repeat_prob: float = 0.75, aim_spread: float = 4.0,
               miss_prob: float = 0.05, slip_prob: float = 0.03):
    from aapt_jax.evaluation.ram_objects import RAM_TABLES  # the one Pong RAM table
    names = list(action_names)
    missing = {"NOOP", "RIGHT", "LEFT"} - set(names)
    if missing:
      raise ValueError(f"PongRallyPolicy needs Pong's actions; {sorted(missing)} are not "
                       f"in {names}")
    for name, p in (("miss_prob", miss_prob), ("slip_prob", slip_prob)):
      if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {p}")
    self._table = RAM_TABLES["Pong"]
    self._ids = {move: [names.index(a) for a in keys if a in names]
                 for move, keys in ((0, ("NOOP", "FIRE")), (-1, ("RIGHT", "RIGHTFIRE")),
                                    (1, ("LEFT", "LEFTFIRE")))}   # move: -1 up, +1 down
    self._move_of = {i: move for move, ids in self._ids.items() for i in ids}
    self.num_actions = len(names)
    self.ram = ram
    self.turn = self.KNOB_SPEED * int(frame_skip)   # knob rows per call with a key held
    self.aim_spread, self.miss_prob = float(aim_spread), float(miss_prob)
    self.slip_prob = float(slip_prob)
    self._rng = np.random.default_rng(seed)
    self._wander = StickyRandomPolicy(self.num_actions, repeat_prob,
                                      seed=int(self._rng.integers(2**31)))
    self._ball, self._gap = None, 0   # the ball when last seen, calls since then
    self._velocity = None             # the ball's motion per call when last measured
    self._knob = None                 # the knob's row (the paddle's resting centre)
    self._paddle = None               # the paddle's centre row at the previous call
    self._still = 0                   # calls since a key was last held
    self._aim = None                  # this approach's aim offset; None: not approaching
    self._action = self._ids[0][0]

  def _landing_y(self, ball, velocity) -> float | None:
    """Where the ball's centre crosses the paddle's column, or None when it
    is not coming toward it."""
    (x, y), (dx, dy) = ball, velocity
    if dx <= 0 or x > self.PADDLE_X:
      return None
    lo, hi = self.BALL_Y
    y = (y + dy * (self.PADDLE_X - x) / dx - lo) % (2 * (hi - lo))  # fold at the walls
    return lo + (2 * (hi - lo) - y if y > hi - lo else y)

  def _ball_velocity(self, ball):
    """The ball's motion per call since it was last seen (None: unknown). A
    step that bounced off a wall moved less far up or down than the ball
    goes: while its horizontal motion holds (no paddle hit), the vertical
    speed is the larger of this step's and the last one's."""
    last, gap = self._ball, self._gap + 1
    if ball is None:
      self._gap = gap
      if gap > self.MAX_GAP:
        self._ball, self._velocity = None, None
      return None
    self._ball, self._gap = ball, 0
    if last is None:
      return None
    dx, dy = (ball[0] - last[0]) / gap, (ball[1] - last[1]) / gap
    if self._velocity is not None and self._velocity[0] == dx:
      dy = float(np.copysign(max(abs(dy), abs(self._velocity[1])), dy))
    self._velocity = (dx, dy)
    return self._velocity

  def _read_knob(self, paddle: float) -> None:
    """Re-reads the knob from the paddle once it rests (no key for 2 calls,
    not moved since the last), away from the walls that hide it."""
    if self._knob is None or (self._still >= 2 and abs(paddle - self._paddle) <= 1.0
                              and 40.0 < paddle < 188.0):
      self._knob = paddle
    self._paddle = paddle

  def _act(self, action: int) -> int:
    """Returns `action`, turning the knob as it does."""
    move = self._move_of[action]
    self._still = 0 if move else self._still + 1
    lo, hi = self.KNOB_RANGE
    self._knob = float(np.clip(self._knob + move * self.turn, lo, hi))
    self._action = action
    return action

  def _press(self, move: int) -> int:
    """An id of `move`: the one held now if it is one, else one of them."""
    if self._move_of[self._action] == move:
      return self._act(self._action)
    ids = self._ids[move]
    return self._act(ids[int(self._rng.integers(len(ids)))])

  def __call__(self, frame: np.ndarray | None = None) -> int:
    del frame  # reads the RAM instead
    ram = self.ram()
    ball = self._table.objects(ram)["ball"]
    self._read_knob(self._table.player_centre_y(ram))
    velocity = self._ball_velocity(ball)
    landing = None if velocity is None else self._landing_y(ball, velocity)
    if ball is None and self._ball is not None and self._aim is not None:
      return self._act(self._action)   # the ball blinked at a wall: carry on
    if landing is None:
      self._aim = None
      return self._act(self._wander())
    if self._aim is None:              # a new approach
      if self._rng.random() < self.miss_prob:
        past = self.CONTACT + self._rng.uniform(2.0, 10.0)
        self._aim = past * (1.0 if self._rng.random() < 0.5 else -1.0)
      else:
        self._aim = self._rng.uniform(-self.aim_spread, self.aim_spread)
    if self._rng.random() < self.slip_prob:
      return self._act(int(self._rng.integers(self.num_actions)))
    error = landing - self.HIT_ROW + self._aim - self._knob   # > 0: the target is below
    # the knob's grid may rest the paddle past the contact span: a key pressed
    # as the ball arrives moves the paddle part of a turn first (it lags)
    arriving = (self.PADDLE_X - ball[0]) / velocity[0] <= self.LAST_CALL
    if abs(error) <= (self.NUDGE if arriving else self.turn / 2):
      return self._press(0)
    return self._press(1 if error > 0 else -1)


POLICIES = ("sticky_random", "rally", "explorer")
_FIELD = "recording policy (config field data.policy, launch/prepare_data.py --policy)"


def policy_name(name: str, *, game: str, control_dim: int) -> str:
  """The recording policy `name` means for a world playing `game` (its
  display name, e.g. "Pong") with `control_dim` controls: "" is the world's
  own ("explorer" for a camera world, control_dim > 0, else
  "sticky_random"); "rally" (`PongRallyPolicy`) plays Pong only. ValueError
  naming the field for an unknown name or one the world cannot play."""
  camera = int(control_dim) > 0
  name = name or ("explorer" if camera else "sticky_random")
  if name not in POLICIES:
    raise ValueError(f"unknown {_FIELD} {name!r}: choose from {', '.join(POLICIES)}, or "
                     "'' for the world's own")
  if camera and name != "explorer":
    raise ValueError(f"{_FIELD} {name!r} presses keys, but this world is steered by "
                     f"{control_dim} controls: use 'explorer' (or '')")
  if not camera and name == "explorer":
    raise ValueError(f"{_FIELD} 'explorer' steers a camera world; {game} takes actions: "
                     "use 'sticky_random' or 'rally' (Pong)")
  if name == "rally" and game != "Pong":
    raise ValueError(f"{_FIELD} 'rally' plays Pong only, not {game}: use 'sticky_random'")
  return name


def make_policy(name: str, world, seed: int = 0, repeat_prob: float = 0.75):
  """The recording policy `name` (see `policy_name`; "" = the world's own)
  for `world`, seeded with `seed`: `StickyRandomPolicy(repeat_prob)`,
  `PongRallyPolicy` (reading `world.ram()`; its wandering keeps
  `repeat_prob`) or `ExplorerPolicy`."""
  name = policy_name(name, game=world.game, control_dim=getattr(world, "control_dim", 0))
  if name == "explorer":
    return ExplorerPolicy(seed=seed)
  if name == "rally":
    return PongRallyPolicy(world.action_names, world.ram, seed=seed,
                           frame_skip=world.frame_skip, repeat_prob=repeat_prob)
  return StickyRandomPolicy(world.num_actions, repeat_prob, seed=seed)
