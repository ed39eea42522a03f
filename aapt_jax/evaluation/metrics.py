"""Per-frame metrics of a predicted video against the real one, horizon
buckets, and spreads over seeds.

Every per-frame series is a float array over frame indices 0..T (NaN where a
value does not exist: frame 0, the shared start frame; frames past the end of
the emulator's game; frames a predictor did not make). Buckets average a
series over frame ranges, NaNs left out; `spread` summarises one number per
seed. PSNR, SSIM, roughness and change are `aapt_jax.inference.quality`'s.
"""
from __future__ import annotations

import math

import numpy as np

from aapt_jax.inference.quality import change, psnr, roughness, ssim

PSNR_CAP = 100.0   # dB for identical frames (their PSNR is infinite), as quality.py caps it


def horizon_buckets(clip_frames: int, frames: int,
                    ends: tuple[int, ...] = ()) -> list[tuple[int, int]]:
  """Frame ranges [first, last] (inclusive, latent frames, frame 0 = the start
  frame) for a rollout of `frames` frames after the start frame: the training
  clip, up to 10/3 and 10 clips, then 40 and 120 clips (12 -> 1-12, 13-40,
  41-120, 121-480, 481-1440), cut at `frames`; or, given `ends` (increasing
  last frames, e.g. (40, 80, 120) for the thirds of 120 frames), those."""
  if clip_frames < 1 or frames < 1:
    raise ValueError(f"clip_frames and frames must be >= 1, got {clip_frames}, {frames}")
  check_horizon_ends(ends)
  edges = [0, *ends] if ends else [0, clip_frames, round(10 * clip_frames / 3),
                                   10 * clip_frames, 40 * clip_frames, 120 * clip_frames]
  out = []
  for lo, hi in zip(edges[:-1], edges[1:]):
    if hi <= lo or lo >= frames:
      continue
    out.append((lo + 1, min(hi, frames)))
  if out[-1][1] < frames:
    out.append((out[-1][1] + 1, frames))
  return out


def check_horizon_ends(ends: tuple[int, ...]):
  """ValueError unless `ends` (the horizons' last frames) increase from >= 1."""
  if any(not isinstance(e, int) for e in ends) or any(
      b <= a for a, b in zip((0, *ends), ends)):
    raise ValueError(f"--horizons must be increasing last frames >= 1 (e.g. 40,80,120), "
                     f"got {','.join(str(e) for e in ends)}")


def bucket_label(bucket: tuple[int, int]) -> str:
  return f"{bucket[0]}-{bucket[1]}"


def bucket_means(series: np.ndarray, buckets: list[tuple[int, int]]) -> list[float]:
  """Mean of `series` [T+1] over each bucket, NaNs left out (NaN if none)."""
  out = []
  for lo, hi in buckets:
    part = np.asarray(series[lo:hi + 1], np.float64)
    part = part[np.isfinite(part)]
    out.append(float(part.mean()) if part.size else float("nan"))
  return out


def spread(values) -> dict:
  """{"mean", "std", "min", "max", "n", "per_seed"} of per-seed values, NaNs
  left out of the statistics (std is the population std; all None when no
  seed has a value); "per_seed" keeps every seed's value (None = none), so
  two predictors on the same episodes can be compared seed by seed."""
  per_seed = [float(x) if x is not None and math.isfinite(x) else None for x in values]
  v = np.asarray([x for x in per_seed if x is not None], np.float64)
  if not v.size:
    return {"mean": None, "std": None, "min": None, "max": None, "n": 0, "per_seed": per_seed}
  return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()),
          "max": float(v.max()), "n": int(v.size), "per_seed": per_seed}


def paired_difference(a: dict, b: dict) -> dict:
  """The spread of a - b seed by seed, for two `spread`s over the same seeds
  (seeds where either has no value are left out)."""
  return spread([x - y if x is not None and y is not None else None
                 for x, y in zip(a["per_seed"], b["per_seed"])])


def _per_frame(fn, predicted: np.ndarray, real: np.ndarray, valid: np.ndarray) -> np.ndarray:
  out = np.full(len(predicted), np.nan)
  for i in np.nonzero(valid)[0]:
    out[i] = fn(predicted[i], real[i])
  return out


def comparable(predicted_valid: np.ndarray, real_frames: int) -> np.ndarray:
  """bool [T+1]: frames 1.. where the predictor made a frame and the emulator
  still runs (frame 0 is the given start frame)."""
  valid = np.array(predicted_valid, bool).copy()
  valid[0] = False
  valid[real_frames:] = False
  return valid


def psnr_series(predicted: np.ndarray, real: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """PSNR (dB, capped at PSNR_CAP) per frame where `valid`, else NaN.
  predicted, real: uint8 [T+1, H, W, 3]."""
  return _per_frame(lambda a, b: min(psnr(a, b), PSNR_CAP), predicted, real, valid)


def ssim_series(predicted: np.ndarray, real: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """SSIM per frame where `valid`, else NaN."""
  return _per_frame(ssim, predicted, real, valid)


def change_series(predicted: np.ndarray, previous: np.ndarray, real: np.ndarray,
                  valid: np.ndarray) -> dict[str, np.ndarray]:
  """How much of the real change a one-step prediction makes, per frame where
  `valid` (else NaN): `change_corr`, the correlation over pixels of
  (predicted - previous) with (real - previous), and `change_gain`, the
  predicted change's mean |value| over the real change's (1 = as large; a
  one-step mean that shrinks every change below 1 blurs open loop).
  predicted, previous, real: uint8 [T+1, H, W, 3]; NaN where the real frame
  does not change (or, for the correlation, the prediction does not)."""
  out = {k: np.full(len(predicted), np.nan) for k in ("change_corr", "change_gain")}
  for i in np.nonzero(valid)[0]:
    made = (predicted[i].astype(np.float64) - previous[i]).ravel()
    true = (real[i].astype(np.float64) - previous[i]).ravel()
    size = np.abs(true).mean()
    if size == 0:
      continue
    out["change_gain"][i] = np.abs(made).mean() / size
    if made.std() > 0:
      out["change_corr"][i] = float(np.corrcoef(made, true)[0, 1])
  return out


def drift_series(frames: np.ndarray, count: int | None = None) -> dict[str, np.ndarray]:
  """Statistics of a video uint8 [T+1, H, W, 3] per frame, for drift curves:
  `mean_colour` (mean of all pixels, 0-255), `roughness` (adjacent-pixel
  |difference|: noise raises it) and `change` (|frame - previous frame|: 0 =
  frozen; NaN at frame 0). Frames at or past `count` are NaN."""
  n = len(frames) if count is None else int(count)
  out = {k: np.full(len(frames), np.nan) for k in ("mean_colour", "roughness", "change")}
  for i in range(min(n, len(frames))):
    out["mean_colour"][i] = float(frames[i].astype(np.float32).mean())
    out["roughness"][i] = roughness(frames[i])
    if i:
      out["change"][i] = change(frames[i], frames[i - 1])
  return out
