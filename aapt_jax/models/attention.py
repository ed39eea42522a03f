"""Attention: block-causal self-attention (sink + sliding window), plain
bidirectional attention (Wan mode), and text cross-attention.

Frame-blockwise, never a dense [L, L] mask. Block i attends to the sink
(block 0) once, at temporal distance min(i, N + 1), and to blocks
max(1, i - N) .. i at distance i - j. The parts — the sink, the cached ring,
and the in-sequence window one block offset at a time — are merged with an
online (log-sum-exp) softmax, so memory per part is one block-pair of scores.
The same function serves the full-sequence call (no cache), a call that
continues a cached prefix, and the one-frame `step`.

This is the XLA backend (CPU, and any device); flash/splash backends can
slot in behind `block_causal_attention` with the same arguments.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from aapt_jax.models import kv_cache as kvc
from aapt_jax.models.rope import rotate_time

_NEG_INF = -jnp.inf


@flax.struct.dataclass
class _OnlineSoftmax:
  m: jax.Array    # [B, T, H, P] running max (no gradient)
  l: jax.Array    # [B, T, H, P] running sum of exp
  acc: jax.Array  # [B, T, P, H, Dh] running sum of exp * v


def _init(q) -> _OnlineSoftmax:
  b, t, p, h, d = q.shape
  return _OnlineSoftmax(m=jnp.full((b, t, h, p), _NEG_INF, jnp.float32),
                        l=jnp.zeros((b, t, h, p), jnp.float32),
                        acc=jnp.zeros((b, t, p, h, d), jnp.float32))


def _add(state: _OnlineSoftmax, scores, valid, v, pv_spec: str, start: int = 0):
  """Adds keys with `scores` [B, T', H, P, K] (T' = T - start) for query blocks start..T-1."""
  scores = jnp.where(valid, scores, _NEG_INF)
  m_old, l_old, acc_old = state.m[:, start:], state.l[:, start:], state.acc[:, start:]
  m_new = jax.lax.stop_gradient(jnp.maximum(m_old, jnp.max(scores, axis=-1)))
  m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
  p = jnp.exp(scores - m_safe[..., None])
  corr = jnp.exp(m_old - m_safe)                       # [B, T', H, P]
  l_new = l_old * corr + jnp.sum(p, axis=-1)
  pv = jnp.einsum(pv_spec, p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  acc_new = acc_old * jnp.swapaxes(corr, 2, 3)[..., None] + pv
  if start == 0:
    return _OnlineSoftmax(m_new, l_new, acc_new)
  return _OnlineSoftmax(state.m.at[:, start:].set(m_new), state.l.at[:, start:].set(l_new),
                        state.acc.at[:, start:].set(acc_new))


def _finish(state: _OnlineSoftmax, dtype):
  l = jnp.swapaxes(state.l, 2, 3)[..., None]  # [B, T, P, H, 1]
  out = jnp.where(l > 0, state.acc / jnp.where(l > 0, l, 1.0), 0.0)
  return out.astype(dtype)


def block_causal_attention(q, k, v, *, counter, window: int, theta: float,
                           sink=None, ring=None):
  """Block-causal attention for blocks counter .. counter + T - 1.

  q, k, v: [B, T, P, H, Dh], q/k normed and spatially rotated, no temporal
    rotation (temporal rotations here are distances only).
  counter: int or int32 [] — the absolute index of the first block.
  window: N, previous blocks kept besides the sink.
  sink: (k, v) [B, H, P, Dh] of block 0 from a cache (heads-major, as the
    cache stores it), or None when block 0 is the first block of this
    sequence (counter == 0).
  ring: (k, v) [B, H, N, P, Dh] of the cached previous blocks, or None.
  Returns [B, T, P, H, Dh] in q.dtype.
  """
  b, t, p, h, d = q.shape
  n = window
  q = q * jnp.asarray(d ** -0.5, q.dtype)
  block_index = counter + jnp.arange(t)  # absolute index of each query block [T]
  if ring is not None and t == 1:
    return _one_block(q, k, v, counter, n, theta, sink, ring)
  state = _init(q)

  # 1. The sink, once, at distance min(i, N + 1): rotate the queries by it.
  if sink is None:
    sink_k, sink_v = k[:, 0], v[:, 0]
  else:
    first = counter == 0
    sink_k = jnp.where(first, k[:, 0], jnp.swapaxes(sink[0], 1, 2).astype(k.dtype))
    sink_v = jnp.where(first, v[:, 0], jnp.swapaxes(sink[1], 1, 2).astype(v.dtype))
  q_sink = rotate_time(q, jnp.minimum(block_index, n + 1)[None, :, None, None], theta)
  scores = jnp.einsum("btphd,bkhd->bthpk", q_sink, sink_k, preferred_element_type=jnp.float32)
  state = _add(state, scores, True, sink_v, "bthpk,bkhd->btphd")

  # 2. The cached ring: slot s holds block j_s at distance (i' + e_s) from
  #    query block i' (e_s = counter - j_s), i.e. R(-e_s) on the key, R(i') on the query.
  if ring is not None:
    ring_k, ring_v = ring[0].astype(k.dtype), ring[1].astype(v.dtype)  # [B, H, N, P, Dh]
    held = kvc.ring_block_indices(counter, n)                 # [N]
    ahead = counter - held                                     # e_s in 1..N where valid
    k_r = rotate_time(ring_k, -ahead[None, None, :, None], theta)
    q_r = rotate_time(q, jnp.arange(t)[None, :, None, None], theta)
    scores = jnp.einsum("btphd,bhnkd->bthpnk", q_r, k_r, preferred_element_type=jnp.float32)
    valid = (held[None, :] >= 1) & (jnp.arange(t)[:, None] + ahead[None, :] <= n)  # [T, N]
    state = _add(state, scores.reshape(b, t, h, p, n * p),
                 jnp.repeat(valid, p, axis=1)[None, :, None, None, :],
                 ring_v.reshape(b, h, n * p, d), "bthpk,bhkd->btphd")

  # 3. The in-sequence window, one block offset o at a time: query block i
  #    reads key block i - o (if it is not the sink), at distance o.
  for o in range(min(n, t - 1) + 1):
    k_o = k[:, :t - o] if o == 0 else rotate_time(k[:, :t - o], -o, theta)
    scores = jnp.einsum("btphd,btkhd->bthpk", q[:, o:], k_o, preferred_element_type=jnp.float32)
    valid = (block_index[:t - o] >= 1)[None, :, None, None, None]
    state = _add(state, scores, valid, v[:, :t - o], "bthpk,btkhd->btphd", start=o)
  return _finish(state, q.dtype)


def _one_block(q, k, v, counter, n, theta, sink, ring):
  """The streaming step (T = 1): one softmax over [sink | ring | self], heads-major.

  The same rule as the general path, with the temporal distances put on the
  keys: the sink at min(counter, N + 1), ring slot s at counter - j_s, self at
  0. q is already scaled. The three parts' scores are concatenated (small);
  values are read in place from the cache.
  """
  b, _, p, h, d = q.shape
  f32 = jnp.float32
  heads_major = lambda a: jnp.swapaxes(a[:, 0], 1, 2)          # [B, 1, P, H, D] -> [B, H, P, D]
  q1, k1, v1 = heads_major(q), heads_major(k), heads_major(v)
  first = counter == 0
  sink_k = jnp.where(first, k1, sink[0].astype(k.dtype))
  sink_v = jnp.where(first, v1, sink[1].astype(v.dtype))
  sink_k = rotate_time(sink_k, -jnp.minimum(counter, n + 1), theta)
  held = kvc.ring_block_indices(counter, n)                      # [N]
  ahead = counter - held
  ring_k = rotate_time(ring[0].astype(k.dtype), -ahead[None, None, :, None], theta)
  ring_v = ring[1].astype(v.dtype).reshape(b, h, n * p, d)
  s_sink = jnp.einsum("bhpd,bhkd->bhpk", q1, sink_k, preferred_element_type=f32)
  s_ring = jnp.einsum("bhpd,bhkd->bhpk", q1, ring_k.reshape(b, h, n * p, d),
                      preferred_element_type=f32)
  s_self = jnp.einsum("bhpd,bhkd->bhpk", q1, k1, preferred_element_type=f32)
  ring_ok = jnp.repeat((held >= 1) & (ahead <= n), p)            # [N * P]
  scores = jnp.concatenate([
      s_sink, jnp.where(ring_ok, s_ring, _NEG_INF),
      jnp.where(counter >= 1, s_self, _NEG_INF)], axis=-1)        # [B, H, P, (N + 2) P]
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  p_sink, p_ring, p_self = probs[..., :p], probs[..., p:p + n * p], probs[..., p + n * p:]
  out = (jnp.einsum("bhpk,bhkd->bhpd", p_sink, sink_v, preferred_element_type=f32)
         + jnp.einsum("bhpk,bhkd->bhpd", p_ring, ring_v, preferred_element_type=f32)
         + jnp.einsum("bhpk,bhkd->bhpd", p_self, v1, preferred_element_type=f32))
  return jnp.swapaxes(out, 1, 2)[:, None].astype(q.dtype)


def full_attention(q, k, v, *, theta: float):
  """Plain bidirectional attention over all frames (Wan mode).

  q, k, v: [B, T, P, H, Dh] spatially rotated; frames at absolute positions 0..T-1.
  """
  b, t, p, h, d = q.shape
  pos = jnp.arange(t)[None, :, None, None]
  q = rotate_time(q, pos, theta).reshape(b, t * p, h, d)
  k = rotate_time(k, pos, theta).reshape(b, t * p, h, d)
  out = cross_attention(q, k, v.reshape(b, t * p, h, d))
  return out.reshape(b, t, p, h, d)


def cross_attention(q, k, v, mask=None):
  """q [B, S, H, Dh] attends to k, v [B, L, H, Dh]; mask [B, L] (True = attend).

  A query whose keys are all masked gets zeros.
  """
  d = q.shape[-1]
  scores = jnp.einsum("bshd,blhd->bhsl", q, k, preferred_element_type=jnp.float32) * d ** -0.5
  if mask is not None:
    scores = jnp.where(mask[:, None, None, :], scores, _NEG_INF)
  m = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(scores - m)
  l = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(l > 0, l, 1.0)
  return jnp.einsum("bhsl,blhd->bshd", p.astype(v.dtype), v,
                    preferred_element_type=jnp.float32).astype(q.dtype)
