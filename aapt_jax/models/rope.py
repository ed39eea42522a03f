"""3D rotary position embedding split over (t, h, w), Wan2.1's layout.

The head dim d splits into t = d - 4⌊d/6⌋ and h = w = 2⌊d/6⌋ dims (44/42/42
for d = 128), adjacent pairs (x[2i], x[2i+1]) rotate, θ = 10,000 per axis.
Rotations on disjoint pairs commute, so the spatial part (h, w) and the
temporal part (t) are applied separately:

* spatial: absolute (row, column) of the token inside its frame — bounded;
* temporal: scores only ever see a *distance* between blocks (window-
  relative), so frame 10,000 sees exactly the angles seen in training. A
  stream's cache stores each block's keys rotated by its absolute index j
  (`absolute_rotation`, exact for any int32 index) and the step's query by
  its own index i: <R(i) q, R(j) k> = <R(i - j) q, k>, so the ring is read
  as stored, never re-rotated per step; no table overflows and no precision
  is lost to large indices.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def rope_split(head_dim: int) -> tuple[int, int, int]:
  """(t, h, w) dims of a head of size head_dim (each even)."""
  hw = 2 * (head_dim // 6)
  return head_dim - 2 * hw, hw, hw


def axis_frequencies(axis_dim: int, theta: float):
  """[axis_dim / 2] float32 angular frequencies θ^(-2i/axis_dim)."""
  return 1.0 / (theta ** (jnp.arange(0, axis_dim, 2, dtype=jnp.float32) / axis_dim))


def _rotate(x, cos, sin):
  """Rotates adjacent pairs (x[2i], x[2i+1]) of x [..., Dh] by per-pair angles.

  cos, sin: [..., Dh] (each pair's value repeated twice; cos = 1, sin = 0 on
  pairs that do not rotate), broadcastable to x. One elementwise pass:
  x * cos + pairswap(x) * sin with pairswap(x)[2i] = -x[2i+1], [2i+1] = x[2i].
  """
  x32 = x.astype(jnp.float32)
  pairs = x32.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
  swapped = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
  return (x32 * cos + swapped * sin).astype(x.dtype)


def _full_width(angles, head_dim, offset):
  """Per-pair angles [..., K] placed at pairs offset..offset+K of a head -> cos, sin [..., Dh]."""
  pad = [(0, 0)] * (angles.ndim - 1) + [(offset, head_dim // 2 - offset - angles.shape[-1])]
  angles = jnp.repeat(jnp.pad(angles, pad), 2, axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def spatial_angles(grid_h: int, grid_w: int, head_dim: int, theta: float):
  """cos, sin [grid_h * grid_w, head_dim] rotating the (h, w) pairs (t pairs: identity).

  Tokens are row-major over (h, w), as Wan flattens them. Numpy float32
  constants (static shapes): no cos/sin is evaluated per token per call.
  """
  t_dim, h_dim, w_dim = rope_split(head_dim)
  rows = np.repeat(np.arange(grid_h, dtype=np.float32), grid_w)
  cols = np.tile(np.arange(grid_w, dtype=np.float32), grid_h)
  angles = np.concatenate([rows[:, None] * _np_frequencies(h_dim, theta),
                           cols[:, None] * _np_frequencies(w_dim, theta)], axis=-1)
  return _np_full_width(angles, head_dim, t_dim // 2)


def rotate_spatial(x, cos, sin):
  """x [B, T, P, H, Dh]: rotates the (h, w) pairs by the token's grid position."""
  return _rotate(x, cos[:, None, :], sin[:, None, :])


def rotate_time(x, distance, theta: float):
  """Rotates the temporal pairs of x [..., Dh] by `distance` blocks.

  distance: array broadcastable to x.shape[:-1] (e.g. shape [1, T, 1, 1] for
  x [B, T, P, H, Dh]).
  """
  head_dim = x.shape[-1]
  t_dim = rope_split(head_dim)[0]
  angles = jnp.asarray(distance, jnp.float32)[..., None] * axis_frequencies(t_dim, theta)
  cos, sin = _full_width(angles, head_dim, 0)
  return _rotate(x, cos, sin)


def _np_frequencies(axis_dim: int, theta: float):
  """`axis_frequencies` as a numpy float32 constant."""
  exponent = np.arange(0, axis_dim, 2, dtype=np.float32) / np.float32(axis_dim)
  return (np.float32(1.0) / np.power(np.float32(theta), exponent)).astype(np.float32)


def _np_full_width(angles, head_dim, offset):
  """`_full_width` of numpy angles: numpy float32 cos, sin [..., Dh]."""
  pad = [(0, 0)] * (angles.ndim - 1) + [(offset, head_dim // 2 - offset - angles.shape[-1])]
  angles = np.repeat(np.pad(angles, pad), 2, axis=-1).astype(np.float32)
  return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rotate_with(x, cos, sin):
  """x [..., Dh] rotated by per-pair tables cos, sin [..., Dh] (broadcastable to x)."""
  return _rotate(x, cos, sin)


_BYTE_LEVELS = 4  # an int32 index's magnitude as 4 bytes


def _byte_tables(head_dim: int, theta: float):
  """cos, sin [4, 256, t_dim / 2] (numpy float32): the temporal pairs' rotation
  by b * 256^l blocks for each byte value b of each level l. The angles are
  exact in float64 (b * 256^l has at most 8 significant bits, the frequency
  24) and reduced by numpy's cos/sin (full range reduction)."""
  freqs = _np_frequencies(rope_split(head_dim)[0], theta).astype(np.float64)
  steps = np.arange(256, dtype=np.float64)[None, :] * (256.0 ** np.arange(_BYTE_LEVELS))[:, None]
  angles = steps[..., None] * freqs                            # [4, 256, t / 2]
  return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def absolute_rotation(position, head_dim: int, theta: float):
  """cos, sin [..., Dh] rotating the temporal pairs by `position` blocks
  (int32 array of any shape; other pairs: identity), for `rotate_with`.

  Exact for every int32 position (|position| < 2^31), not only small ones:
  the rotation is composed from one table entry per byte of |position|
  (angles exact in float64), so its error is a few float32 roundings at
  block 10^9 as at block 1, and R(i) R(j)^-1 = R(i - j) to that rounding.
  This is what lets a cache store keys at their absolute block index.
  """
  position = jnp.asarray(position, jnp.int32)
  magnitude = jnp.abs(position)
  table_cos, table_sin = (jnp.asarray(a) for a in _byte_tables(head_dim, theta))
  cos = sin = None
  for level in range(_BYTE_LEVELS):
    byte = jnp.right_shift(magnitude, 8 * level) & 255
    c, s = table_cos[level][byte], table_sin[level][byte]     # [..., t / 2]
    cos, sin = (c, s) if cos is None else (cos * c - sin * s, sin * c + cos * s)
  sin = jnp.where((position < 0)[..., None], -sin, sin)
  pad = [(0, 0)] * position.ndim + [(0, head_dim // 2 - cos.shape[-1])]
  cos = jnp.repeat(jnp.pad(cos, pad, constant_values=1.0), 2, axis=-1)
  sin = jnp.repeat(jnp.pad(sin, pad), 2, axis=-1)
  return cos, sin
