"""The window rule, checked against a dense reference written from DESIGN section 5.

Block i attends to the sink (block 0) once at temporal distance min(i, N+1),
and to blocks max(1, i-N)..i at distance i-j. The reference below builds that
key list explicitly per query block, with its own numpy rotary rotation, and
shares no code with `block_causal_attention`.
"""
import numpy as np
import jax
import jax.numpy as jnp
import pytest

from aapt_jax.models import attention, kv_cache
from aapt_jax.models.rope import rope_split

THETA = 10000.0
N = 3
B, P, H, D = 2, 4, 2, 12


def _rotate_time_np(x, distance):
  """numpy: rotate the temporal pairs of x [..., D] by `distance`."""
  t_dim = rope_split(x.shape[-1])[0]
  freqs = 1.0 / THETA ** (np.arange(0, t_dim, 2) / t_dim)
  out = x.astype(np.float64).copy()
  ang = distance * freqs
  x0, x1 = x[..., 0:t_dim:2], x[..., 1:t_dim:2]
  out[..., 0:t_dim:2] = x0 * np.cos(ang) - x1 * np.sin(ang)
  out[..., 1:t_dim:2] = x0 * np.sin(ang) + x1 * np.cos(ang)
  return out


def reference(q, k, v, window):
  """Dense per-block reference: [B, T, P, H, D] -> [B, T, P, H, D] (float64)."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  t = q.shape[1]
  out = np.zeros_like(q)
  for i in range(t):
    keys, values = [], []
    # the sink, once, at distance min(i, N+1) (block 0 attends only to itself)
    keys.append(_rotate_time_np(k[:, 0], -min(i, window + 1)))
    values.append(v[:, 0])
    for j in range(max(1, i - window), i + 1):
      keys.append(_rotate_time_np(k[:, j], -(i - j)))
      values.append(v[:, j])
    kk, vv = np.concatenate(keys, 1), np.concatenate(values, 1)  # [B, K, H, D]
    s = np.einsum("bphd,bkhd->bhpk", q[:, i], kk) / np.sqrt(q.shape[-1])
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    out[:, i] = np.einsum("bhpk,bkhd->bphd", s, vv)
  return out


_attend = jax.jit(attention.block_causal_attention, static_argnames=("window", "theta"))


def _qkv(t, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return [jax.random.normal(kk, (B, t, P, H, D)) for kk in ks]


@pytest.mark.parametrize("t", [1, 3, N + 2, N + 3, 3 * N + 2])
def test_full_sequence_matches_reference(t):
  q, k, v = _qkv(t)
  got = _attend(q, k, v, counter=0, window=N, theta=THETA)
  np.testing.assert_allclose(np.asarray(got), reference(q, k, v, N), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("prefix,t", [(1, 1), (1, 4), (N + 2, 1), (N + 2, 3), (3 * N, 2 * N)])
def test_cached_prefix_matches_reference(prefix, t):
  """Blocks prefix..prefix+t-1 read blocks < prefix from the sink + ring only."""
  q, k, v = _qkv(prefix + t, seed=1)
  cache = kv_cache.init_cache(1, B, N, P, H, D)
  write = jax.jit(kv_cache.write_block)
  for j in range(prefix):
    cache = write(cache, [(jnp.swapaxes(k[:, j], 1, 2), jnp.swapaxes(v[:, j], 1, 2))])
  assert int(cache.counter) == prefix
  layer = cache.layers[0]
  got = _attend(
      q[:, prefix:], k[:, prefix:], v[:, prefix:], counter=jnp.int32(prefix), window=N,
      theta=THETA, sink=(layer.sink_k, layer.sink_v), ring=(layer.ring_k, layer.ring_v))
  want = reference(q, k, v, N)[:, prefix:]
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=2e-5)


def test_sink_distance_is_capped():
  """Far beyond the window the sink's distance stays N+1: queries at blocks
  N+2 and 5N see the sink identically (same q, k, v content)."""
  t = 5 * N + 1
  q, k, v = _qkv(t, seed=2)
  # make every non-sink block identical so only the rule's distances matter
  k = k.at[:, 1:].set(k[:, 1:2]); v = v.at[:, 1:].set(v[:, 1:2]); q = q.at[:, 1:].set(q[:, 1:2])
  out = _attend(q, k, v, counter=0, window=N, theta=THETA)
  np.testing.assert_allclose(np.asarray(out[:, N + 2]), np.asarray(out[:, 5 * N]), atol=1e-6)
  # ... while inside the window (block 2 vs N+2) the sink distance differs
  assert float(jnp.abs(out[:, 2] - out[:, N + 2]).max()) > 1e-4


def test_cross_attention_mask_and_empty_rows():
  ks = jax.random.split(jax.random.key(3), 3)
  q = jax.random.normal(ks[0], (2, 5, H, D))
  k = jax.random.normal(ks[1], (2, 4, H, D))
  v = jax.random.normal(ks[2], (2, 4, H, D))
  mask = jnp.array([[True, True, False, False], [False] * 4])
  out = attention.cross_attention(q, k, v, mask)
  want = attention.cross_attention(q[:1], k[:1, :2], v[:1, :2])
  np.testing.assert_allclose(np.asarray(out[:1]), np.asarray(want), atol=1e-6)
  assert float(jnp.abs(out[1]).max()) == 0.0  # all keys masked -> zeros, not NaN
