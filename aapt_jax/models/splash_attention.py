"""The full-sequence block-causal attention as one splash-attention kernel
(Pallas, block-sparse), the "splash" value of `model.attention_backend`.

The rule is `attention.block_causal_attention`'s for a sequence that starts at
the sink (counter 0, no cache): query block i reads the sink (block 0) at
temporal distance min(i, N + 1) and blocks max(1, i - N) .. i at distance
i - j. Splash takes one key sequence and a static mask, so the distances are
put on the keys and queries and the sink's clamp on copies of it:

  queries  q_i rotated by R(i)                        [T P tokens]
  keys     [frames | sink copies]
           frame j: k_j rotated by R(j)                [T P tokens]
           sink copy i: k_0 rotated by R(i - min(i, N + 1))   [T P tokens]

so <R(i) q, R(j) k_j> has distance i - j and <R(i) q, copy_i> distance
min(i, N + 1). `FrameWindowMask` lets query block i read frames
max(1, i - N) .. i and sink copy i only; both sequences are zero-padded to
the kernel's block size and the padding is masked out (padded queries read
one real key and are dropped). The kernel skips every all-masked tile, so the
extra copies cost one [P, P] tile per frame.

Under a mesh (`jax.set_mesh`) the kernel runs per shard with `jax.shard_map`:
batch over the mesh axes the logical rules give "batch", heads over those of
"heads", where they divide; the kernel's own VJP gives the gradient.

Off TPU the kernel runs in Pallas interpret mode (the tests, on CPU); the
config check (`ModelSpec`) admits "splash" only on a TPU. Not yet run on one:
tile sizes and the head-dim/dtype limits of Mosaic are unmeasured there.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

from aapt_jax.models.rope import rotate_time

# Tokens per kernel tile (queries and keys); sequences are padded to a multiple.
MAX_BLOCK = 512
LANES = 128


class FrameWindowMask(masks.Mask):
  """[Lq, Lk] mask of the layout above: `frames` blocks of `tokens` tokens,
  window N; Lq, Lk padded lengths (rows past frames*tokens read key 0)."""

  def __init__(self, frames: int, tokens: int, window: int, q_len: int, kv_len: int):
    self.frames, self.tokens, self.window = frames, tokens, window
    self._shape = (q_len, kv_len)

  @property
  def shape(self):
    return self._shape

  def __getitem__(self, idx) -> np.ndarray:
    q_slice, kv_slice = idx
    rows = np.arange(self._shape[0])[q_slice][:, None]
    cols = np.arange(self._shape[1])[kv_slice][None, :]
    return frame_window_mask(rows, cols, self.frames, self.tokens, self.window)

  def __eq__(self, other):
    return isinstance(other, FrameWindowMask) and self._key() == other._key()

  def __hash__(self):
    return hash(self._key())

  def _key(self):
    return (self.frames, self.tokens, self.window, self._shape)


def frame_window_mask(rows, cols, frames: int, tokens: int, window: int) -> np.ndarray:
  """Which key token `cols` each query token `rows` reads (numpy, broadcast)."""
  seq = frames * tokens
  i = rows // tokens                                   # query block
  j = cols // tokens                                   # frame block, or seq + copy
  is_frame = cols < seq
  reads_frame = is_frame & (j >= 1) & (j <= i) & (j >= i - window)
  reads_sink = (cols >= seq) & (cols < 2 * seq) & ((cols - seq) // tokens == i)
  padded_row = rows >= seq
  return np.where(padded_row, cols == 0, reads_frame | reads_sink)


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def block_sizes(q_len: int, kv_len: int, max_block: int) -> tuple[int, int, int]:
  """(tile, padded Lq, padded Lk): tiles of min(max_block, Lq rounded to 128)."""
  tile = min(max_block, _round_up(q_len, LANES))
  return tile, _round_up(q_len, tile), _round_up(kv_len, tile)


def _kernel(frames: int, tokens: int, window: int, heads: int, interpret: bool, max_block: int):
  seq = frames * tokens
  tile, q_len, kv_len = block_sizes(seq, 2 * seq, max_block)
  mask = FrameWindowMask(frames, tokens, window, q_len, kv_len)
  sizes = splash.BlockSizes(block_q=tile, block_kv=tile, block_kv_compute=tile,
                            block_q_dkv=tile, block_kv_dkv=tile, block_kv_dkv_compute=tile,
                            block_q_dq=tile, block_kv_dq=tile)
  return splash.make_splash_mha(masks.MultiHeadMask([mask] * heads), block_sizes=sizes,
                                head_shards=1, q_seq_shards=1, interpret=interpret)


def _layout(q, k, v, window: int, theta: float, max_block: int):
  """q, k, v [B, T, P, H, Dh] -> splash's q [B, H, Lq, Dh], k, v [B, H, Lk, Dh]
  (rotated as the module docstring says, zero-padded)."""
  b, t, p, h, d = q.shape
  heads_major = lambda a: jnp.transpose(a, (0, 3, 1, 2, 4))           # [B, H, T, P, Dh]
  q, k, v = heads_major(q), heads_major(k), heads_major(v)
  block = jnp.arange(t)[None, None, :, None]                            # [1, 1, T, 1]
  q = rotate_time(q, block, theta)
  frames_k = rotate_time(k, block, theta)
  copies = jnp.broadcast_to(k[:, :, :1], k.shape)                       # [B, H, T, P, Dh]
  copies_k = rotate_time(copies, block - jnp.minimum(block, window + 1), theta)
  copies_v = jnp.broadcast_to(v[:, :, :1], v.shape)
  seq = t * p
  _, q_len, kv_len = block_sizes(seq, 2 * seq, max_block)
  flat = lambda a: a.reshape(b, h, seq, d)
  pad = lambda a, n: jnp.pad(a, ((0, 0), (0, 0), (0, n - a.shape[2]), (0, 0)))
  keys = pad(jnp.concatenate([flat(frames_k), flat(copies_k)], axis=2), kv_len)
  values = pad(jnp.concatenate([flat(v), flat(copies_v)], axis=2), kv_len)
  return pad(flat(q), q_len), keys, values


def _shard_specs(mesh, batch: int, heads: int):
  """PartitionSpec of [B, H, L, Dh] over `mesh`: the mesh axes the active
  logical rules give "batch" and "heads", each kept only if it divides."""
  def axes(name, size):
    kept = []
    mapped = nn.logical_to_mesh_axes((name,))[0]
    for a in (mapped,) if isinstance(mapped, str) else (mapped or ()):
      n = mesh.shape[a]
      if size % n == 0 and n > 1:
        kept.append(a)
        size //= n
    return tuple(kept) or None
  return jax.sharding.PartitionSpec(axes("batch", batch), axes("heads", heads), None, None)


def splash_block_causal_attention(q, k, v, *, window: int, theta: float,
                                  max_block: int = MAX_BLOCK):
  """q (already scaled), k, v [B, T, P, H, Dh], blocks 0 .. T-1 (no cache) ->
  [B, T, P, H, Dh] in q.dtype; `attention.block_causal_attention`'s rule.
  max_block: the kernel's tile, at most (tokens; a multiple of 128)."""
  b, t, p, h, d = q.shape
  qs, ks, vs = _layout(q, k, v, window, theta, max_block)
  interpret = jax.devices()[0].platform != "tpu"

  def attend(q_, k_, v_):
    kernel = _kernel(t, p, window, q_.shape[1], interpret, max_block)
    return jax.vmap(kernel)(q_, k_, v_)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    out = attend(qs, ks, vs)
  else:
    spec = _shard_specs(mesh, b, h)
    out = jax.shard_map(attend, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                        check_vma=False)(qs, ks, vs)
  out = out[:, :, :t * p].reshape(b, h, t, p, d)
  return jnp.transpose(out, (0, 2, 3, 1, 4)).astype(q.dtype)
