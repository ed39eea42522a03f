"""Image helpers shared by the worlds (recording) and the server (uploaded
start frames): numpy only, no JAX."""
from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=32)
def _area_weights(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] box-filter weights: each output pixel averages the input
  pixels its footprint covers, weighted by the overlap (rows sum to 1)."""
  edges = np.arange(n_out + 1, dtype=np.float64) * (n_in / n_out)
  lo, hi = edges[:-1, None], edges[1:, None]
  i = np.arange(n_in, dtype=np.float64)[None, :]
  w = np.clip(np.minimum(i + 1, hi) - np.maximum(i, lo), 0.0, None)
  w = (w / w.sum(axis=1, keepdims=True)).astype(np.float32)
  w.flags.writeable = False  # cached and shared
  return w


def resize_area(frames: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
  """Area-resizes uint8 images ``[..., H, W, C]`` to ``[..., h, w, C]``."""
  h, w = (size, size) if isinstance(size, int) else size
  frames = np.asarray(frames)
  H, W = frames.shape[-3], frames.shape[-2]
  if (H, W) == (h, w):
    return frames.astype(np.uint8, copy=True)
  lead, C = frames.shape[:-3], frames.shape[-1]
  x = frames.reshape((-1, H, W * C)).astype(np.float32)
  x = np.matmul(_area_weights(H, h), x)                      # [N, h, W*C]
  x = x.reshape(-1, h, W, C).transpose(0, 1, 3, 2).reshape(-1, W)  # [N*h*C, W]
  x = (x @ _area_weights(W, w).T).reshape(-1, h, C, w)      # [N, h, C, w]: one 2-D matmul
  x = x.transpose(0, 1, 3, 2).reshape(lead + (h, w, C))
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def center_crop_resize(frames: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
  """Center-crops uint8 images ``[..., H, W, C]`` to the aspect ratio of
  `size` (int or (h, w)), then area-resizes them (`resize_area`) to
  ``[..., h, w, C]``: nothing is stretched."""
  h, w = (size, size) if isinstance(size, int) else size
  frames = np.asarray(frames)
  H, W = frames.shape[-3], frames.shape[-2]
  if H * w > W * h:      # too tall: keep the middle H' = W * h / w rows
    ch = max(1, round(W * h / w))
    top = (H - ch) // 2
    frames = frames[..., top:top + ch, :, :]
  elif H * w < W * h:    # too wide
    cw = max(1, round(H * w / h))
    left = (W - cw) // 2
    frames = frames[..., :, left:left + cw, :]
  return resize_area(frames, (h, w))
