"""Attention: block-causal self-attention (sink + sliding window), plain
bidirectional attention (Wan mode), and text cross-attention.

Frame-blockwise, never a dense [L, L] mask. Block i attends to the sink
(block 0) once, at temporal distance min(i, N + 1), and to blocks
max(1, i - N) .. i at distance i - j. The parts — the sink, the cached ring,
and the in-sequence window one block offset at a time — are merged with an
online (log-sum-exp) softmax, so memory per part is one block-pair of scores.
The same function serves the full-sequence call (no cache), a call that
continues a cached prefix, and the one-frame `step`. Its gradient is a custom
VJP that recomputes each part's scores from the saved log-sum-exp (flash-
attention style), so training memory is linear in frames and tokens per frame.

Backends (`model.attention_backend`): "xla" everywhere (any device);
"cudnn" runs the streaming step's one-frame attention (over sink + ring +
self, a prefix of valid keys, no mask) with cuDNN's fused kernel on GPU
(`jax.nn.dot_product_attention`; not yet verified on a GPU); "splash" runs
the full-sequence call (training, no cache) as one block-sparse Pallas
splash-attention kernel on TPU (`splash_attention.py`; tested in Pallas
interpret mode on CPU, not yet verified on a TPU). Calls a backend does not
cover use "xla".
"""
from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp

from aapt_jax.models import kv_cache as kvc
from aapt_jax.models.rope import absolute_rotation, rotate_time, rotate_with
from aapt_jax.models.splash_attention import splash_block_causal_attention

_NEG_INF = -jnp.inf


@flax.struct.dataclass
class _OnlineSoftmax:
  m: jax.Array    # [B, H, T, P] running max (no gradient)
  l: jax.Array    # [B, H, T, P] running sum of exp
  acc: jax.Array  # [B, H, T, P, Dh] running sum of exp * v


def _init(q) -> _OnlineSoftmax:
  b, h, t, p, d = q.shape
  return _OnlineSoftmax(m=jnp.full((b, h, t, p), _NEG_INF, jnp.float32),
                        l=jnp.zeros((b, h, t, p), jnp.float32),
                        acc=jnp.zeros((b, h, t, p, d), jnp.float32))


def _add(state: _OnlineSoftmax, scores, valid, v, pv_spec: str, start: int = 0):
  """Adds keys with `scores` [B, H, T', P, K] (T' = T - start) for query blocks start..T-1."""
  scores = jnp.where(valid, scores, _NEG_INF)
  m_old, l_old, acc_old = state.m[:, :, start:], state.l[:, :, start:], state.acc[:, :, start:]
  m_new = jax.lax.stop_gradient(jnp.maximum(m_old, jnp.max(scores, axis=-1)))
  m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
  p = jnp.exp(scores - m_safe[..., None])
  corr = jnp.exp(m_old - m_safe)                       # [B, H, T', P]
  l_new = l_old * corr + jnp.sum(p, axis=-1)
  pv = jnp.einsum(pv_spec, p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  acc_new = acc_old * corr[..., None] + pv
  if start == 0:
    return _OnlineSoftmax(m_new, l_new, acc_new)
  return _OnlineSoftmax(state.m.at[:, :, start:].set(m_new),
                        state.l.at[:, :, start:].set(l_new),
                        state.acc.at[:, :, start:].set(acc_new))


def _finish(state: _OnlineSoftmax, dtype):
  l = state.l[..., None]  # [B, H, T, P, 1]
  out = jnp.where(l > 0, state.acc / jnp.where(l > 0, l, 1.0), 0.0)
  return out.astype(dtype)


# Query tokens per chunk: the scores alive at once are [B, T', H, C, P] per
# part (a few parts at once), so memory is linear in P once P > C.
QUERY_CHUNK = 64


def block_causal_attention(q, k, v, *, counter, window: int, theta: float,
                           sink=None, ring=None, query_chunk: int = QUERY_CHUNK,
                           backend: str = "xla"):
  """Block-causal attention for blocks counter .. counter + T - 1.

  q, k, v: [B, T, P, H, Dh], q/k normed and spatially rotated, no temporal
    rotation (temporal rotations here are distances only).
  counter: int or int32 [] — the absolute index of the first block.
  window: N, previous blocks kept besides the sink.
  sink: (k, v) [B, H, P, Dh] of block 0 from a cache (heads-major, as the
    cache stores it), or None when block 0 is the first block of this
    sequence (counter == 0).
  ring: (k, v) [B, H, N, P, Dh] of the cached previous blocks as
    `kv_cache.write_block` stores them (slot s's keys at R(j_s)), or None.
  query_chunk: query tokens of a frame handled at once (a cap; P is split
    into equal chunks no larger than it).
  backend: "xla"; "cudnn" for the streaming step (T = 1 with a ring);
    "splash" for the full sequence (no sink, no ring); other calls use "xla".
  Returns [B, T, P, H, Dh] in q.dtype.

  Memory is linear in T and P (flash-attention style): the queries are
  processed in chunks of at most `query_chunk` tokens (a scan), each against
  the parts in turn; the gradient (a custom VJP) saves only q, k, v, the
  output and the log-sum-exp per query token and recomputes each part's
  scores. Gradients reach q, k, v and the cached sink/ring keys/values (the
  callers pass a detached cache, so that last one is normally unused and
  compiled away).
  """
  b, t, p, h, d = q.shape
  q = q * jnp.asarray(d ** -0.5, q.dtype)
  if ring is not None and t == 1:
    if backend == "cudnn":
      return _one_block_fused(q, k, v, counter, window, theta, sink, ring, "cudnn")
    return _one_block(q, k, v, counter, window, theta, sink, ring)
  if backend == "splash" and sink is None and ring is None:
    return splash_block_causal_attention(q, k, v, window=window, theta=theta)
  chunks = -(-p // max(1, query_chunk))
  # heads-major [B, H, T, P, Dh] inside: every part's einsum then has its
  # batch axes (b, h[, t]) leading, so no operand is transposed per part
  heads_major = lambda a: jnp.transpose(a, (0, 3, 1, 2, 4))
  out = _blockwise(window, theta, -(-p // chunks), heads_major(q), heads_major(k),
                   heads_major(v), jnp.asarray(counter, jnp.int32), sink, ring)
  return jnp.transpose(out, (0, 2, 3, 1, 4))


def _queries(q, counter, window: int, theta: float):
  """The queries of the parts, heads-major [B, H, T, P, Dh] each: (R(i') q for
  the ring and the in-sequence window, R(min(i, N + 1)) q for the sink), with
  i' = 0..T-1 the block's place in this call and i = counter + i' its index.

  <R(a) q, R(b) k> = <R(a - b) q, k>: every distance is a difference of the
  two rotations (the angles stay bounded by T and N + 1).
  """
  t = q.shape[2]
  block_index = counter + jnp.arange(t)                        # [T]
  return (rotate_time(q, jnp.arange(t)[None, None, :, None], theta),
          rotate_time(q, jnp.minimum(block_index, window + 1)[None, None, :, None], theta))


def _keys(k, v, counter, sink, ring, window: int, theta: float):
  """What the parts read, heads-major: (sink_k, sink_v [B, H, P, Dh], ring_k,
  ring_v [B, H, N P, Dh] or None, k, v [B, H, T, P, Dh]).

  The sink is block 0 of this sequence when counter == 0, else the cached
  one, unrotated (its distance is on the sink query). Ring slot s holds block
  j_s at distance (i' + e_s) from query block i' (e_s = counter - j_s): its
  keys, stored at R(j_s), carry R(-e_s) here (one rotation, by -counter, for
  the whole ring), the queries R(i'). The in-sequence keys of block
  j' carry R(j'), so block i' reads block i' - o at distance o.
  """
  b, h, t, p, d = k.shape
  k_in = rotate_time(k, jnp.arange(t)[None, None, :, None], theta)
  if sink is None:
    sink_k, sink_v = k[:, :, 0], v[:, :, 0]
  else:
    first = counter == 0
    sink_k = jnp.where(first, k[:, :, 0], sink[0].astype(k.dtype))
    sink_v = jnp.where(first, v[:, :, 0], sink[1].astype(v.dtype))
  ring_k = ring_v = None
  if ring is not None:  # stored at R(j_s) (kv_cache.write_block): R(j_s - counter) = R(-e_s)
    ring_k = rotate_with(ring[0].astype(k.dtype), *absolute_rotation(-counter, d, theta))
    ring_k = ring_k.reshape(b, h, window * p, d)
    ring_v = ring[1].astype(v.dtype).reshape(b, h, window * p, d)
  return sink_k, sink_v, ring_k, ring_v, k_in, v


@flax.struct.dataclass
class _Part:
  """One group of keys the queries attend to (the sink, the ring, or one block offset)."""
  key: int = flax.struct.field(pytree_node=False)    # index into `_keys`' tuple (value: key + 1)
  start: int = flax.struct.field(pytree_node=False)  # first query block that reads it
  stop: int | None = flax.struct.field(pytree_node=False)  # offsets: keys[:, :, first:stop];
  first: int = flax.struct.field(pytree_node=False)  # stop None: all keys (sink, ring)
  query: int = flax.struct.field(pytree_node=False)  # index into `_queries`' pair
  spec: str = flax.struct.field(pytree_node=False)   # scores einsum "query,key->scores"
  pv_spec: str = flax.struct.field(pytree_node=False)  # "scores,value->out"
  valid: jax.Array | bool = True     # broadcastable to the scores [B, H, T', C, K]


def _parts(t: int, p: int, counter, window: int, has_ring: bool, from_sink: bool):
  """The sink (at distance min(i, N + 1)), the ring, then the in-sequence
  window one block offset o at a time (query block i reads block i - o at
  distance o, if it is not the sink), in the order they are merged.

  from_sink: this call's block 0 is the sink (no cached sink, so counter ==
  0), known when tracing: each offset part then skips the sink's key block
  (query blocks o + 1.., key blocks 1..) instead of masking its scores."""
  n = window
  block_index = counter + jnp.arange(t)  # absolute index of each query block [T]
  parts = [_Part(0, 0, None, 0, 1, "bhtpd,bhkd->bhtpk", "bhtpk,bhkd->bhtpd")]
  if has_ring:
    held = kvc.ring_block_indices(counter, n)  # [N]
    valid = (held[None, :] >= 1) & (jnp.arange(t)[:, None] + (counter - held)[None, :] <= n)
    parts.append(_Part(2, 0, None, 0, 0, "bhtpd,bhkd->bhtpk", "bhtpk,bhkd->bhtpd",
                       jnp.repeat(valid, p, axis=1)[None, None, :, None, :]))
  for o in range(min(n, t - 1) + 1):
    if from_sink:
      if o + 1 < t:
        parts.append(_Part(4, o + 1, t - o, 1, 0, "bhtpd,bhtkd->bhtpk", "bhtpk,bhtkd->bhtpd"))
    else:
      parts.append(_Part(4, o, t - o, 0, 0, "bhtpd,bhtkd->bhtpk", "bhtpk,bhtkd->bhtpd",
                         (block_index[:t - o] >= 1)[None, None, :, None, None]))
  return parts


def _scores(part: _Part, q, key):
  """Scores [B, H, T', C, K] of queries q [B, H, T', C, Dh] (blocks start.., rotated
  by `_queries`) and `key` (rotated by `_keys`)."""
  return jnp.einsum(part.spec, q, key, preferred_element_type=jnp.float32)


def _operands(part: _Part, keys):
  key, value = keys[part.key], keys[part.key + 1]
  if part.stop is not None:
    key, value = key[:, :, part.first:part.stop], value[:, :, part.first:part.stop]
  return key, value


def _chunk_forward(qcs, keys, parts):
  """A chunk of `_queries`' pair qcs ([B, H, T, C, Dh] each) -> (out [B, H, T, C, Dh],
  log-sum-exp [B, H, T, C])."""
  state = _init(qcs[0])
  for part in parts:
    key, value = _operands(part, keys)
    scores = _scores(part, qcs[part.query][:, :, part.start:], key)
    state = _add(state, scores, part.valid, value, part.pv_spec, part.start)
    qcs, state = jax.lax.optimization_barrier((qcs, state))  # ask for one part at a time
  lse = jnp.where(state.l > 0, state.m + jnp.log(jnp.where(state.l > 0, state.l, 1.0)), jnp.inf)
  return _finish(state, qcs[0].dtype), lse


def _chunk_backward(qcs, out, lse, d_out, keys, d_keys, parts):
  """One query chunk's gradient: returns (the pair's dq [B, H, T, C, Dh] f32 each,
  d_keys + its share).

  Per part: p = exp(s - lse), dv += p^T do, ds = p (do v^T - rowsum(do * out)),
  and ds pulled back through the scores (with their rotations) to q and the keys.
  """
  f32 = jnp.float32
  delta = jnp.einsum("bhtpd,bhtpd->bhtp", d_out.astype(f32), out.astype(f32))  # [B, H, T, C]
  dqs = [jnp.zeros(qc.shape, f32) for qc in qcs]
  d_keys = list(d_keys)
  for part in parts:
    a, qc = part.start, qcs[part.query]
    key, value = _operands(part, keys)
    scores, pull = jax.vjp(lambda q_, k_, part=part: _scores(part, q_, k_), qc[:, :, a:], key)
    probs = jnp.exp(jnp.where(part.valid, scores, _NEG_INF) - lse[:, :, a:, ..., None])
    s_spec, v_spec, o_spec = part.pv_spec.replace("->", ",").split(",")
    d_value = jnp.einsum(f"{s_spec},{o_spec}->{v_spec}", probs.astype(value.dtype),
                         d_out[:, :, a:], preferred_element_type=f32)
    d_probs = jnp.einsum(f"{o_spec},{v_spec}->{s_spec}", d_out[:, :, a:], value,
                         preferred_element_type=f32)
    d_scores = probs * (d_probs - delta[:, :, a:, ..., None])
    d_q, d_key = pull(d_scores)
    dqs[part.query] = dqs[part.query].at[:, :, a:].add(d_q.astype(f32))
    for i, grad in ((part.key, d_key), (part.key + 1, d_value)):
      if part.stop is None:
        d_keys[i] = d_keys[i] + grad.astype(f32)
      else:
        d_keys[i] = d_keys[i].at[:, :, part.first:part.stop].add(grad.astype(f32))
    qcs, dqs, d_keys = jax.lax.optimization_barrier((qcs, dqs, d_keys))  # (XLA:CPU ignores it)
  return tuple(dqs), tuple(d_keys)


def _split(x, chunk):
  """[B, H, T, P, Dh] -> [P' / C, B, H, T, C, Dh], P zero-padded to a multiple P' of C."""
  b, h, t, p = x.shape[:4]
  chunks = -(-p // chunk)
  x = jnp.pad(x, [(0, 0)] * 3 + [(0, chunks * chunk - p), (0, 0)])
  return jnp.moveaxis(x.reshape(b, h, t, chunks, chunk, x.shape[4]), 3, 0)


def _merge(x, p):
  """The inverse of `_split`: [P' / C, B, H, T, C, Dh] -> [B, H, T, P, Dh]."""
  x = jnp.moveaxis(x, 0, 3)
  return x.reshape(*x.shape[:3], -1, x.shape[5])[:, :, :, :p]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _blockwise(window, theta, chunk, q, k, v, counter, sink, ring):
  """The general path of `block_causal_attention`: q (already scaled), k, v
  heads-major [B, H, T, P, Dh] -> [B, H, T, P, Dh]."""
  return _blockwise_fwd(window, theta, chunk, q, k, v, counter, sink, ring)[0]


def _blockwise_fwd(window, theta, chunk, q, k, v, counter, sink, ring):
  b, h, t, p = q.shape[:4]
  keys = _keys(k, v, counter, sink, ring, window, theta)
  parts = _parts(t, p, counter, window, ring is not None, sink is None)
  qs = tuple(_split(a, chunk) for a in _queries(q, counter, window, theta))  # [P' / C, B, H,
  _, (outs, lses) = jax.lax.scan(lambda c, qc: (c, _chunk_forward(qc, keys, parts)),  # T, C, Dh]
                                 None, qs, unroll=qs[0].shape[0] == 1)
  return _merge(outs, p), (q, k, v, counter, sink, ring, outs, lses)


def _blockwise_bwd(window, theta, chunk, residuals, d_out):
  q, k, v, counter, sink, ring, outs, lses = residuals
  b, h, t, p = q.shape[:4]
  keys, keys_vjp = jax.vjp(
      lambda k_, v_, sink_, ring_: _keys(k_, v_, counter, sink_, ring_, window, theta),
      k, v, sink, ring)
  queries, queries_vjp = jax.vjp(lambda q_: _queries(q_, counter, window, theta), q)
  parts = _parts(t, p, counter, window, ring is not None, sink is None)
  zeros = tuple(None if a is None else jnp.zeros(a.shape, jnp.float32) for a in keys)

  def body(d_keys, xs):
    qcs, out, lse, d_oc = xs
    dqs, d_keys = _chunk_backward(qcs, out, lse, d_oc, keys, d_keys, parts)
    return d_keys, dqs

  qs = tuple(_split(a, chunk) for a in queries)
  d_keys, dqs = jax.lax.scan(body, zeros, (qs, outs, lses, _split(d_out, chunk)),
                             unroll=qs[0].shape[0] == 1)
  d_keys = tuple(None if g is None else g.astype(a.dtype) for g, a in zip(d_keys, keys))
  dk, dv, d_sink, d_ring = keys_vjp(d_keys)
  (dq,) = queries_vjp(tuple(_merge(a, p).astype(q.dtype) for a in dqs))
  return dq, dk, dv, None, d_sink, d_ring


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def _one_block(q, k, v, counter, n, theta, sink, ring):
  """The streaming step (T = 1): one softmax over [sink | ring | self], heads-major.

  The same rule as the general path, with the distances carried by absolute
  rotations (`rope.absolute_rotation`, exact at any index): the query and
  this block's keys at R(counter), the ring as stored (slot s at R(j_s), so
  distance counter - j_s), the sink re-rotated to R(counter - min(counter,
  N + 1)) (one block). The whole ring is read in place, never rotated. The
  sink and this block share one score product (their keys side by side, 2P
  of them), the ring has its own; one max and one sum over both, without
  concatenating the ring. q is already scaled.
  """
  b, _, p, h, d = q.shape
  f32 = jnp.float32
  heads_major = lambda a: jnp.swapaxes(a[:, 0], 1, 2)          # [B, 1, P, H, D] -> [B, H, P, D]
  q1, k1, v1 = heads_major(q), heads_major(k), heads_major(v)
  first = counter == 0
  sink_k = jnp.where(first, k1, sink[0].astype(k.dtype))
  sink_v = jnp.where(first, v1, sink[1].astype(v.dtype))
  here = absolute_rotation(counter, d, theta)
  q_at = rotate_with(q1, *here)
  sink_k = rotate_with(sink_k, *absolute_rotation(counter - jnp.minimum(counter, n + 1), d, theta))
  # [sink | self] keys [B, H, 2P, D]; self is left out at counter 0 (the sink is this block)
  near_k = jnp.concatenate([sink_k, rotate_with(k1, *here)], axis=2)
  near_v = jnp.concatenate([sink_v, v1], axis=2)
  held = kvc.ring_block_indices(counter, n)                      # [N]
  ring_k = ring[0].astype(k.dtype).reshape(b, h, n * p, d)
  ring_v = ring[1].astype(v.dtype).reshape(b, h, n * p, d)
  s_near = jnp.einsum("bhpd,bhkd->bhpk", q_at, near_k, preferred_element_type=f32)
  s_ring = jnp.einsum("bhpd,bhkd->bhpk", q_at, ring_k, preferred_element_type=f32)
  near_ok = (jnp.arange(2 * p) < p) | (counter >= 1)             # [2P]
  ring_ok = jnp.repeat((held >= 1) & (counter - held <= n), p)   # [N * P]
  s_near = jnp.where(near_ok, s_near, _NEG_INF)
  s_ring = jnp.where(ring_ok, s_ring, _NEG_INF)
  # one softmax over both parts: a shared max (the sink's scores are always
  # finite), then each part's exp, summed and applied to its values in place
  m = jnp.maximum(jnp.max(s_near, axis=-1), jnp.max(s_ring, axis=-1))[..., None]  # [B, H, P, 1]
  e_near, e_ring = jnp.exp(s_near - m), jnp.exp(s_ring - m)
  total = (jnp.sum(e_near, axis=-1) + jnp.sum(e_ring, axis=-1))[..., None]        # [B, H, P, 1]
  out = (jnp.einsum("bhpk,bhkd->bhpd", e_near.astype(v.dtype), near_v, preferred_element_type=f32)
         + jnp.einsum("bhpk,bhkd->bhpd", e_ring.astype(v.dtype), ring_v,
                      preferred_element_type=f32)) / total
  return jnp.swapaxes(out, 1, 2)[:, None].astype(q.dtype)


def _one_block_fused(q, k, v, counter, n, theta, sink, ring, implementation: str):
  """The streaming step as one `jax.nn.dot_product_attention` (a fused kernel).

  Keys in the order [sink | self | ring slots]: ring slot s holds block
  s + 1 until the ring wraps, so the valid keys are always a prefix, of
  P (1 + [counter >= 1] + min(counter - 1, N)) tokens (at counter 0 the sink
  is this block itself and self is left out): a sequence length, no mask.
  Same rotations as `_one_block` (the ring read as stored); q is already scaled.
  """
  b, _, p, h, d = q.shape
  seq = lambda a: jnp.swapaxes(a, 1, 2)                          # [B, H, P, D] -> [B, P, H, D]
  q1, k1, v1 = q[:, 0], k[:, 0], v[:, 0]                         # [B, P, H, D]
  first = counter == 0
  sink_k = jnp.where(first, k1, seq(sink[0]).astype(k.dtype))
  sink_v = jnp.where(first, v1, seq(sink[1]).astype(v.dtype))
  here = absolute_rotation(counter, d, theta)
  sink_k = rotate_with(sink_k, *absolute_rotation(counter - jnp.minimum(counter, n + 1), d, theta))
  by_token = lambda a: jnp.transpose(a, (0, 2, 3, 1, 4)).reshape(b, n * p, h, d)
  keys = jnp.concatenate([sink_k, rotate_with(k1, *here), by_token(ring[0].astype(k.dtype))],
                         axis=1)                                  # [B, (N + 2) P, H, D]
  values = jnp.concatenate([sink_v, v1, by_token(ring[1].astype(v.dtype))], axis=1)
  valid = p * (1 + (counter >= 1).astype(jnp.int32) + jnp.clip(counter - 1, 0, n))
  out = jax.nn.dot_product_attention(rotate_with(q1, *here), keys, values, scale=1.0,
                                     key_value_seq_lengths=jnp.full((b,), valid, jnp.int32),
                                     implementation=implementation)
  return out[:, None].astype(q.dtype)


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


def cross_attention_heads_major(q, k_t, v_t, mask=None):
  """`cross_attention` with precomputed, transposed keys k_t and values v_t,
  both [B, H, Dh, L] (a prompt's TextKV): q [B, S, H, Dh] -> [B, S, H, Dh].

  The scale goes on q and the normalisation on the output (both [S, Dh]
  sized), so the [S, L] scores are read and written once (exp)."""
  d = q.shape[-1]
  q = q * jnp.asarray(d ** -0.5, q.dtype)
  scores = jnp.einsum("bshd,bhdl->bhsl", q, k_t, preferred_element_type=jnp.float32)
  if mask is not None:
    scores = jnp.where(mask[:, None, None, :], scores, _NEG_INF)
  m = jax.lax.stop_gradient(jnp.max(scores, axis=-1))             # [B, H, S]
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(scores - m[..., None])
  l = jnp.swapaxes(jnp.sum(p, axis=-1), 1, 2)[..., None]          # [B, S, H, 1]
  out = jnp.einsum("bhsl,bhdl->bshd", p.astype(v_t.dtype), v_t, preferred_element_type=jnp.float32)
  return (out / jnp.where(l > 0, l, 1.0)).astype(q.dtype)
