"""The block-causal attention before its custom VJP (plain autodiff through an
online softmax, one block offset at a time), kept as the tests' reference for
values, gradients and compiled memory. General path only (no T = 1 step).
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


def reference_block_causal_attention(q, k, v, *, counter, window: int, theta: float,
                                     sink=None, ring=None):
  """Same arguments and result as `attention.block_causal_attention` (T >= 1, any cache)."""
  b, t, p, h, d = q.shape
  n = window
  q = q * jnp.asarray(d ** -0.5, q.dtype)
  block_index = counter + jnp.arange(t)
  state = _init(q)
  if sink is None:
    sink_k, sink_v = k[:, 0], v[:, 0]
  else:
    first = counter == 0
    sink_k = jnp.where(first, k[:, 0], jnp.swapaxes(sink[0], 1, 2).astype(k.dtype))
    sink_v = jnp.where(first, v[:, 0], jnp.swapaxes(sink[1], 1, 2).astype(v.dtype))
  q_sink = rotate_time(q, jnp.minimum(block_index, n + 1)[None, :, None, None], theta)
  scores = jnp.einsum("btphd,bkhd->bthpk", q_sink, sink_k, preferred_element_type=jnp.float32)
  state = _add(state, scores, True, sink_v, "bthpk,bkhd->btphd")
  if ring is not None:
    ring_k, ring_v = ring[0].astype(k.dtype), ring[1].astype(v.dtype)
    held = kvc.ring_block_indices(counter, n)
    ahead = counter - held
    # the ring stores slot s's keys at R(j_s): back to unrotated, then R(-ahead)
    k_r = rotate_time(rotate_time(ring_k, -held[None, None, :, None], theta),
                      -ahead[None, None, :, None], theta)
    q_r = rotate_time(q, jnp.arange(t)[None, :, None, None], theta)
    scores = jnp.einsum("btphd,bhnkd->bthpnk", q_r, k_r, preferred_element_type=jnp.float32)
    valid = (held[None, :] >= 1) & (jnp.arange(t)[:, None] + ahead[None, :] <= n)
    state = _add(state, scores.reshape(b, t, h, p, n * p),
                 jnp.repeat(valid, p, axis=1)[None, :, None, None, :],
                 ring_v.reshape(b, h, n * p, d), "bthpk,bhkd->btphd")
  for o in range(min(n, t - 1) + 1):
    k_o = k[:, :t - o] if o == 0 else rotate_time(k[:, :t - o], -o, theta)
    scores = jnp.einsum("btphd,btkhd->bthpk", q[:, o:], k_o, preferred_element_type=jnp.float32)
    valid = (block_index[:t - o] >= 1)[None, :, None, None, None]
    state = _add(state, scores, valid, v[:, :t - o], "bthpk,btkhd->btphd", start=o)
  return _finish(state, q.dtype)
