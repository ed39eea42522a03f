"""Camera following: does the picture turn when the yaw control says so?

The image's horizontal motion between consecutive frames is measured by
phase correlation (numpy FFT, a Hann window against the frame edges,
sub-pixel by a parabola through the peak) and compared with the commanded
yaw rate: turning right (controls[..., 0] > 0) moves the scene LEFT (a
negative shift), turning left moves it right. It needs no model internals:
the same functions score the emulator's frames (the reference) and a model's
generated frames for the same controls.
"""
from __future__ import annotations

import numpy as np

YAW_THRESHOLD = 0.2     # |yaw| below this counts as "not turning"
MOTION_FRACTION = 1 / 128  # of the frame width (0.5 px at 64): a smaller shift
                           # counts as "not moving"


def _gray(frame: np.ndarray) -> np.ndarray:
  """[H, W, 3] uint8 or float -> [H, W] float64 luminance."""
  x = np.asarray(frame, np.float64)
  return x @ np.array([0.299, 0.587, 0.114]) if x.ndim == 3 else x


def _parabola_offset(left: float, centre: float, right: float) -> float:
  """Sub-sample offset in (-0.5, 0.5) of the maximum of a parabola through 3 samples."""
  denom = left - 2 * centre + right
  return 0.0 if denom == 0 else float(np.clip(0.5 * (left - right) / denom, -0.5, 0.5))


def image_shift(previous: np.ndarray, current: np.ndarray) -> tuple[float, float]:
  """(dx, dy) in pixels by which the picture's content moved from `previous`
  to `current` ([H, W, 3] or [H, W]): dx > 0 = moved right, dy > 0 = moved
  down. Phase correlation: the peak of IFFT(F(cur) conj(F(prev)) / |...|)."""
  a, b = _gray(previous), _gray(current)
  if a.shape != b.shape:
    raise ValueError(f"frames differ in shape: {a.shape} vs {b.shape}")
  h, w = a.shape
  window = np.outer(np.hanning(h), np.hanning(w))
  fa = np.fft.fft2((a - a.mean()) * window)
  fb = np.fft.fft2((b - b.mean()) * window)
  cross = fb * np.conj(fa)
  cross /= np.maximum(np.abs(cross), 1e-12)
  surface = np.fft.ifft2(cross).real                 # [H, W], peak at the shift
  iy, ix = np.unravel_index(int(np.argmax(surface)), surface.shape)
  dy = iy + _parabola_offset(surface[iy - 1, ix], surface[iy, ix], surface[(iy + 1) % h, ix])
  dx = ix + _parabola_offset(surface[iy, ix - 1], surface[iy, ix], surface[iy, (ix + 1) % w])
  dx = dx - w if dx > w / 2 else dx                  # wrap to [-W/2, W/2)
  dy = dy - h if dy > h / 2 else dy
  return float(dx), float(dy)


def horizontal_motion(frames: np.ndarray) -> np.ndarray:
  """float [T - 1]: the content's horizontal shift (pixels, + = right) from
  frame t-1 to frame t of `frames` [T, H, W, 3]."""
  frames = np.asarray(frames)
  return np.array([image_shift(frames[t - 1], frames[t])[0]
                   for t in range(1, len(frames))], np.float64)


def moved_with_turn(yaw, against, width: int):
  """Whether a shift `against` the turn (pixels, + = content moved left) follows
  the yaw: at least MOTION_FRACTION of the frame `width` in the turn's direction
  (right turn -> content left). Elementwise over arrays; the one rule of
  camera_following, follow_series and turning_test."""
  return np.sign(yaw) * against >= MOTION_FRACTION * width


def camera_following(frames: np.ndarray, yaw: np.ndarray) -> dict[str, float]:
  """How well the picture follows the yaw control.

  `frames` [T, H, W, 3]; `yaw` [T], the yaw control whose effect frame t
  shows (controls[:, 0] of a record: yaw[0] is ignored). Returns:

  * ``sign_agreement``: among frames turned with |yaw| >= YAW_THRESHOLD, the
    fraction whose shift is at least MOTION_FRACTION of the width against
    the turn (right turn -> content moves left); NaN when none turned;
  * ``correlation``: Pearson correlation of -shift with yaw over all frames
    (NaN when either is constant);
  * ``pixels_per_unit_yaw``: least-squares slope of -shift on yaw (how many
    pixels a full-rate turn moves the picture per frame);
  * ``turning_frames``: how many frames the agreement is over.
  """
  yaw = np.asarray(yaw, np.float64)
  if len(yaw) != len(frames):
    raise ValueError(f"yaw has {len(yaw)} entries for {len(frames)} frames")
  if len(frames) < 2:
    raise ValueError("camera following needs at least 2 frames")
  against = -horizontal_motion(frames)              # [T - 1], + = content moved left
  u = yaw[1:]
  turning = np.abs(u) >= YAW_THRESHOLD
  agree = moved_with_turn(u, against, np.shape(frames)[2])[turning]
  if np.std(u) > 0 and np.std(against) > 0:
    correlation = float(np.corrcoef(u, against)[0, 1])
  else:
    correlation = float("nan")
  slope = float(u @ against / (u @ u)) if u @ u > 0 else float("nan")
  return {"sign_agreement": float(agree.mean()) if agree.size else float("nan"),
          "correlation": correlation, "pixels_per_unit_yaw": slope,
          "turning_frames": int(turning.sum())}


def compare_camera_following(generated: np.ndarray, emulator: np.ndarray,
                             yaw: np.ndarray) -> dict[str, dict[str, float]]:
  """`camera_following` of a model's frames and of the emulator's frames for
  the same yaw controls: {"generated": {...}, "emulator": {...}}."""
  n = min(len(generated), len(emulator), len(yaw))
  return {"generated": camera_following(generated[:n], yaw[:n]),
          "emulator": camera_following(emulator[:n], yaw[:n])}


def follow_series(frames: np.ndarray, previous: np.ndarray, yaw: np.ndarray,
                  made: np.ndarray) -> np.ndarray:
  """float [T+1]: per frame i, 1.0 when the picture moved from `previous[i]`
  to `frames[i]` ([T+1, H, W, 3] each) by at least MOTION_FRACTION of the width
  against the turn yaw[i] (right turn -> content left), 0.0 when it did not;
  NaN where |yaw[i]| < YAW_THRESHOLD, frame i was not made (`made` bool
  [T+1]), and at i = 0. Its mean over frames is `camera_following`'s
  sign_agreement; the evaluation suite averages it per horizon."""
  yaw = np.asarray(yaw, np.float64)
  out = np.full(len(frames), np.nan)
  for i in range(1, len(frames)):
    if made[i] and abs(yaw[i]) >= YAW_THRESHOLD:
      against = -image_shift(previous[i], frames[i])[0]
      out[i] = float(moved_with_turn(yaw[i], against, np.shape(frames)[2]))
  return out


def turn_controls(frames_each: int, control_dim: int) -> np.ndarray:
  """float32 [2 * frames_each + 1, control_dim]: the turning test's controls:
  the start frame's zeros, then a full-rate right turn (yaw +1) for
  `frames_each` frames, then a full-rate left turn (yaw -1) as long; no
  walking or strafing, so the whole picture's motion is the turn's."""
  if frames_each < 1:
    raise ValueError(f"the turning test needs at least 1 frame per direction, got {frames_each}")
  if control_dim < 1:
    raise ValueError("the turning test needs a camera world (control_dim >= 1, controls[0] = yaw)")
  controls = np.zeros((2 * frames_each + 1, control_dim), np.float32)
  controls[1:frames_each + 1, 0] = 1.0
  controls[frames_each + 1:, 0] = -1.0
  return controls


def turning_test(frames: np.ndarray, controls: np.ndarray) -> dict[str, dict[str, float]]:
  """How a video follows `turn_controls`' right-then-left turn: per phase
  ("right", "left"), `turned` = the fraction of its frames whose picture moved
  against the turn by at least MOTION_FRACTION of the width (right turn ->
  content left), and `px_per_frame` = the mean shift against the turn
  (pixels; negative = the wrong way). `frames` [T, H, W, 3] with T <=
  len(controls) (an emulator's episode may end early: its phase covers the
  frames there are; a phase with no frame gets NaN)."""
  n = min(len(frames), len(controls))
  yaw = np.asarray(controls, np.float64)[:n, 0]
  against = np.concatenate([[np.nan], -horizontal_motion(np.asarray(frames)[:n])])  # [n]
  out = {}
  for phase, sign in (("right", 1.0), ("left", -1.0)):
    rows = np.flatnonzero(yaw == sign)
    rows = rows[rows >= 1]
    turned = moved_with_turn(sign, against[rows], np.shape(frames)[2])
    out[phase] = {"turned": float(np.mean(turned)) if rows.size else float("nan"),
                  "px_per_frame": float(np.mean(sign * against[rows])) if rows.size
                  else float("nan")}
  return out
