"""How good a generated video is, measured against the real world replaying
the same actions: PSNR and SSIM per frame, and statistics that tell a
learned world from the two ways a one-step generator fails — per-pixel noise
(far more pixel-to-pixel change within a frame than the real video has) and a
frozen image (far less change from frame to frame).

Pure numpy on uint8 frames [H, W, 3]; nothing is kept per frame but a few
numbers, so a 1440-frame video costs no memory.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

# SSIM constants of Wang et al. (2004): K1 = 0.01, K2 = 0.03, an 11-tap
# Gaussian window of sigma 1.5 (truncate 3.5 sigma -> radius 5).
_K1, _K2, _SIGMA, _TRUNCATE = 0.01, 0.03, 1.5, 3.5


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
  """Peak signal-to-noise ratio in dB of two frames of equal shape (inf if equal)."""
  mse = float(np.mean(np.square(a.astype(np.float64) - b.astype(np.float64))))
  return float("inf") if mse == 0.0 else 10.0 * np.log10(peak * peak / mse)


def ssim(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
  """Mean structural similarity of two frames [H, W] or [H, W, C] (per channel,
  Gaussian window, reflected borders), in [-1, 1]; 1 iff equal."""
  if a.shape != b.shape:
    raise ValueError(f"ssim: frames differ in shape: {a.shape} vs {b.shape}")
  x, y = a.astype(np.float64), b.astype(np.float64)
  sigma = (_SIGMA, _SIGMA) + (0.0,) * (x.ndim - 2)  # no blur across channels
  blur = lambda z: ndimage.gaussian_filter(z, sigma, mode="reflect", truncate=_TRUNCATE)
  mx, my = blur(x), blur(y)
  vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
  c1, c2 = (_K1 * peak) ** 2, (_K2 * peak) ** 2
  s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
  return float(np.mean(s))


def roughness(frame: np.ndarray) -> float:
  """Mean |difference| of horizontally and vertically adjacent pixels (0-255):
  what per-pixel noise inflates."""
  f = frame.astype(np.float32)
  return float((np.abs(np.diff(f, axis=0)).mean() + np.abs(np.diff(f, axis=1)).mean()) / 2)


def change(frame: np.ndarray, previous: np.ndarray) -> float:
  """Mean |frame - previous| (0-255): what a frozen video lacks."""
  return float(np.abs(frame.astype(np.float32) - previous.astype(np.float32)).mean())


class VideoQuality:
  """Running quality of generated frames against real ones, per horizon.

  `add(generated, real)` per video frame; `summary()` gives PSNR/SSIM over
  frames [1, split) and [split, end) (frame 0 is the shared real start frame),
  and roughness and frame-to-frame change of both videos over all frames.
  """

  def __init__(self, split: int):
    self.split = max(int(split), 2)
    self.n = 0
    self.sums: dict[str, float] = {}
    self.counts: dict[str, int] = {}
    self._previous = None

  def _add(self, key: str, value: float) -> None:
    self.sums[key] = self.sums.get(key, 0.0) + value
    self.counts[key] = self.counts.get(key, 0) + 1

  def add(self, generated: np.ndarray, real: np.ndarray) -> None:
    if self.n:  # frame 0 is the given start frame: not generated
      part = "early" if self.n < self.split else "late"
      self._add(f"psnr_{part}", min(psnr(generated, real), 100.0))
      self._add(f"ssim_{part}", ssim(generated, real))
      self._add("roughness", roughness(generated))
      self._add("real_roughness", roughness(real))
      self._add("change", change(generated, self._previous[0]))
      self._add("real_change", change(real, self._previous[1]))
    self._previous = (generated, real)
    self.n += 1

  def summary(self) -> dict:
    mean = lambda k: round(self.sums[k] / self.counts[k], 3) if self.counts.get(k) else None
    out = {"quality_frames": (f"early = frames 1-{self.split - 1}, "
                              f"late = frames {self.split}-{max(self.n - 1, self.split)}")}
    for k in ("psnr_early", "ssim_early", "psnr_late", "ssim_late", "roughness",
              "real_roughness", "change", "real_change"):
      out[k] = mean(k)
    return out


def describe(summary: dict) -> str:
  """A few lines a person reads after a run."""
  def fmt(k, unit=""):
    v = summary.get(k)
    return "n/a" if v is None else f"{v:.3g}{unit}"
  return (f"quality vs the emulator replaying the same actions ({summary['quality_frames']}):\n"
          f"  PSNR early {fmt('psnr_early', ' dB')}, late {fmt('psnr_late', ' dB')}; "
          f"SSIM early {fmt('ssim_early')}, late {fmt('ssim_late')}\n"
          f"  pixel-to-pixel roughness {fmt('roughness')} (real {fmt('real_roughness')}; "
          f"far above = noise); frame-to-frame change {fmt('change')} "
          f"(real {fmt('real_change')}; near 0 = frozen)")
