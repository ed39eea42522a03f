"""The window rule, checked against a dense reference written from the rule itself.

Block i attends to the sink (block 0) once at temporal distance min(i, N+1),
and to blocks max(1, i-N)..i at distance i-j. The reference below builds that
key list explicitly per query block, with its own numpy rotary rotation, and
shares no code with `block_causal_attention`.
"""
import functools

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from aapt_jax.models import attention, kv_cache, splash_attention
from aapt_jax.models.rope import rope_split
from attention_reference import reference_block_causal_attention

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
  write = jax.jit(functools.partial(kv_cache.write_block, theta=THETA))
  for j in range(prefix):
    cache = write(cache, [(jnp.swapaxes(k[:, j], 1, 2), jnp.swapaxes(v[:, j], 1, 2))])
  assert int(cache.counter) == prefix
  layer = cache.layers[0]
  got = _attend(
      q[:, prefix:], k[:, prefix:], v[:, prefix:], counter=jnp.int32(prefix), window=N,
      theta=THETA, sink=(layer.sink_k, layer.sink_v), ring=(layer.ring_k, layer.ring_v))
  want = reference(q, k, v, N)[:, prefix:]
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("position", [1, 5, 2**24 + 3, 2**30 + 12345, 2**31 - 7])
def test_absolute_rotation_is_exact_at_any_index(position):
  """The cache stores keys at R(j), a step's query sits at R(i): their
  product must be the distance's rotation R(i - j) at any index, as exactly
  as at small ones (float32 angles i * w lose whole radians past 2^24)."""
  from aapt_jax.models.rope import absolute_rotation, rotate_time, rotate_with
  x = jax.random.normal(jax.random.key(7), (3, D))
  for distance in (0, 1, N + 1):
    i = absolute_rotation(jnp.int32(position), D, THETA)
    minus_j = absolute_rotation(jnp.int32(-(position - distance)), D, THETA)
    got = rotate_with(rotate_with(x, *i), *minus_j)
    np.testing.assert_allclose(np.asarray(got), np.asarray(rotate_time(x, distance, THETA)),
                               atol=3e-6)
  np.testing.assert_allclose(  # and R(i) itself is rotate_time's rotation at small i
      np.asarray(rotate_with(x, *absolute_rotation(jnp.int32(position % 97), D, THETA))),
      np.asarray(rotate_time(x, position % 97, THETA)), atol=2e-5)


@pytest.mark.parametrize("far", [2**20, 2**30])
def test_step_far_into_a_stream_equals_the_same_step_near_its_start(far):
  """The same sink and N ring blocks written at blocks 1..N and at far+1..far+N:
  the next step's attention is the same (only distances count), though the
  ring stores its keys at their absolute index."""
  q, k, v = _qkv(N + 2, seed=5)
  write = functools.partial(kv_cache.write_block, theta=THETA)
  heads = lambda a: jnp.swapaxes(a, 1, 2)
  out = []
  for start in (0, far):
    cache = write(kv_cache.init_cache(1, B, N, P, H, D), [(heads(k[:, 0]), heads(v[:, 0]))])
    cache = cache.replace(counter=jnp.int32(start + 1))
    for j in range(1, N + 1):
      cache = write(cache, [(heads(k[:, j]), heads(v[:, j]))])
    layer = cache.layers[0]
    out.append(_attend(q[:, -1:], k[:, -1:], v[:, -1:], counter=cache.counter, window=N,
                       theta=THETA, sink=(layer.sink_k, layer.sink_v),
                       ring=(layer.ring_k, layer.ring_v)))
  np.testing.assert_allclose(np.asarray(out[1]), np.asarray(out[0]), atol=2e-5, rtol=2e-5)
  want = reference(q, k, v, N)[:, -1:]  # blocks 0..N+1 of one sequence
  np.testing.assert_allclose(np.asarray(out[0]), want, atol=2e-5, rtol=2e-5)


def test_sink_distance_is_capped():
  """Far beyond the window the sink's distance stays N+1: queries at blocks
  N+2 and 5N see the sink identically (same q, k, v content)."""
  t = 5 * N + 1
  q, k, v = _qkv(t, seed=2)
  # make every non-sink block identical so only the rule's distances matter
  k = k.at[:, 1:].set(k[:, 1:2])
  v = v.at[:, 1:].set(v[:, 1:2])
  q = q.at[:, 1:].set(q[:, 1:2])
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


# ---------------------------------------------------------------- the custom VJP
# Values and gradients against the plain-autodiff implementation it replaced
# (tests/attention_reference.py), and the compiled memory of the gradient.

P5 = 5  # tokens per frame: chunks of 2 leave a padded last chunk


def _cache_for(k, v, prefix):
  cache = kv_cache.init_cache(1, B, N, k.shape[2], H, D)
  for j in range(prefix):
    cache = kv_cache.write_block(cache, [(jnp.swapaxes(k[:, j], 1, 2), jnp.swapaxes(v[:, j], 1, 2))],
                                  THETA)
  layer = cache.layers[0]
  return (layer.sink_k, layer.sink_v), (layer.ring_k, layer.ring_v)


def _value_and_grads(attend, q, k, v, w, counter, sink, ring, **kw):
  def loss(q, k, v, sink, ring):
    out = attend(q, k, v, counter=counter, window=N, theta=THETA, sink=sink, ring=ring, **kw)
    return jnp.sum(out * w)
  argnums = (0, 1, 2) if sink is None else (0, 1, 2, 3, 4)
  return jax.jit(jax.value_and_grad(loss, argnums=argnums))(q, k, v, sink, ring)


@pytest.mark.parametrize("prefix,t,chunk", [(0, 3 * N + 1, 2), (0, N + 2, 128), (N + 2, 2 * N, 2),
                                            (1, 3, 3), (0, 4, 2)])
def test_custom_vjp_matches_autodiff_reference(prefix, t, chunk):
  """Values and d/d(q, k, v, cached sink, cached ring) equal plain autodiff
  (fp32): T past the window, a cached prefix with counter > 0, a fresh cache
  at counter 0 (its sink comes from this sequence), padded query chunks."""
  ks = jax.random.split(jax.random.key(prefix * 7 + t), 4)
  q, k, v = (jax.random.normal(kk, (B, prefix + t, P5, H, D)) for kk in ks[:3])
  sink, ring = (None, None)
  if prefix or t == 4:  # t == 4: a cache at counter 0
    sink, ring = _cache_for(k, v, prefix)
  q, k, v = q[:, prefix:], k[:, prefix:], v[:, prefix:]
  w = jax.random.normal(ks[3], q.shape)
  counter = jnp.int32(prefix)
  got = _value_and_grads(attention.block_causal_attention, q, k, v, w, counter, sink, ring,
                         query_chunk=chunk)
  want = _value_and_grads(reference_block_causal_attention, q, k, v, w, counter, sink, ring)
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=2e-5, rtol=2e-5)
  if prefix > 1:  # the cached sink and ring do carry gradient when a caller lets them
    assert float(jnp.abs(got[1][3][0]).max()) > 1e-3 and float(jnp.abs(got[1][4][0]).max()) > 1e-3


def _grad_temp_bytes(attend, p, t=6, **kw):
  x = jax.ShapeDtypeStruct((1, t, p, H, 32), jnp.float32)
  loss = lambda q, k, v, w: jnp.sum(
      attend(q, k, v, counter=0, window=N, theta=THETA, **kw) * w)
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x, x).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_gradient_memory_is_linear_in_tokens_per_frame():
  """4x the tokens per frame: the custom VJP's compiled temp memory grows < 5x
  (linear, query chunks of 16), plain autodiff's by more (it keeps every
  offset's [P, P] probabilities)."""
  new = [_grad_temp_bytes(attention.block_causal_attention, p, query_chunk=16) for p in (16, 64)]
  ref = [_grad_temp_bytes(reference_block_causal_attention, p) for p in (16, 64)]
  new_ratio, ref_ratio = new[1] / new[0], ref[1] / ref[0]
  assert new_ratio < 5.0, (new, ref)
  assert ref_ratio > new_ratio + 1.0, (new, ref)


@pytest.mark.parametrize("counter", [0, 1, 2, N + 1, 3 * N + 2])
def test_fused_step_layout_equals_step(counter):
  """The cudnn backend's streaming step ([sink | self | ring] keys, a valid
  prefix instead of a mask), run through XLA's dot_product_attention here,
  equals the XLA step at every fill level of the ring."""
  q, k, v = _qkv(counter + 1, seed=4)
  sink, ring = _cache_for(k, v, counter)
  q, k, v = (a[:, counter:] * (D ** -0.5 if a is q else 1.0) for a in (q, k, v))
  c = jnp.int32(counter)
  got = attention._one_block_fused(q, k, v, c, N, THETA, sink, ring, "xla")
  want = attention._one_block(q, k, v, c, N, THETA, sink, ring)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend,match", [("flash", "one of"), ("cudnn", "needs a GPU"),
                                           ("splash", "needs a TPU")])
def test_unknown_or_unavailable_backend_is_a_config_error(backend, match):
  from aapt_jax import load_config
  from aapt_jax.models import build_generator
  from helpers import config_path
  config = load_config(config_path("tiny.py"), {"model.attention_backend": backend,
                                                "model.dtype": "bfloat16"})
  if {"cudnn": "gpu", "splash": "tpu"}.get(backend) == jax.default_backend():
    pytest.skip(f"{backend} is available here")
  with pytest.raises(ValueError, match=f"model.attention_backend.*{match}"):
    build_generator(config)


# --- splash (Pallas, interpret mode off TPU): the full-sequence call --------

def _splash(q, k, v, max_block=splash_attention.MAX_BLOCK):
  return attention.block_causal_attention(q, k, v, counter=0, window=N, theta=THETA,
                                          backend="splash") if max_block is None else \
      splash_attention.splash_block_causal_attention(q * D ** -0.5, k, v, window=N, theta=THETA,
                                                     max_block=max_block)


@pytest.mark.parametrize("t", [1, 2, N + 2, 2 * N + 3])
def test_splash_full_sequence_matches_reference(t):
  """The splash layout ([frames | sink copies] keys, one static mask) equals
  the rule's dense reference, through block_causal_attention's dispatch."""
  q, k, v = _qkv(t, seed=t)
  got = _splash(q, k, v, max_block=None)
  np.testing.assert_allclose(np.asarray(got), reference(q, k, v, N), atol=2e-5, rtol=2e-5)


def test_splash_with_frames_across_tiles_matches_reference():
  """Frames of 48 tokens over tiles of 128 (frames straddle tiles, 3 query
  tiles, 5 key tiles, padding in both): still the rule."""
  ks = jax.random.split(jax.random.key(9), 3)
  q, k, v = [jax.random.normal(kk, (1, 2 * N + 2, 48, H, D)) for kk in ks]
  got = _splash(q, k, v, max_block=128)
  np.testing.assert_allclose(np.asarray(got), reference(q, k, v, N), atol=2e-5, rtol=2e-5)


def test_splash_gradients_equal_xla():
  """Gradients through the kernel's own VJP equal the xla path's (T past the window)."""
  q, k, v = _qkv(2 * N + 1, seed=11)

  def loss(backend):
    return lambda q, k, v: jnp.sum(jnp.sin(attention.block_causal_attention(
        q, k, v, counter=0, window=N, theta=THETA, backend=backend)))

  got = jax.grad(loss("splash"), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
  assert float(jnp.abs(got[1][:, 0]).max()) > 0  # the sink's copies reach block 0's keys


def test_splash_mask_is_block_sparse():
  """Query block i reads frames max(1, i-N)..i and its own sink copy: with
  one frame per tile, the tiles the kernel visits grow as T (N + 2), not T^2."""
  t, p = 16, 128
  mask = splash_attention.FrameWindowMask(t, p, N, t * p, 2 * t * p)
  tiles = [[mask[i * p:(i + 1) * p, j * p:(j + 1) * p].any() for j in range(2 * t)]
           for i in range(t)]
  frames_read = [sum(row[:t]) for row in tiles]
  assert frames_read == [0] + [min(i, N + 1) for i in range(1, t)]
  assert [row[t:].index(True) for row in tiles] == list(range(t))
  assert sum(map(sum, tiles)) == t + sum(frames_read) < t * (N + 2)


def test_splash_sharded_over_the_mesh_equals_xla():
  """Under a (data, fsdp, tensor) mesh the kernel runs per shard (shard_map:
  batch over data x fsdp, heads over tensor); values and gradients equal the
  unsharded xla path."""
  import flax.linen as nn
  from jax.sharding import AxisType, PartitionSpec
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  rules = (("batch", ("data", "fsdp")), ("heads", "tensor"))
  ks = jax.random.split(jax.random.key(12), 3)
  q, k, v = [jax.random.normal(kk, (4, N + 2, P, H, D)) for kk in ks]

  def loss(backend):
    return lambda q, k, v: jnp.sum(jnp.sin(attention.block_causal_attention(
        q, k, v, counter=0, window=N, theta=THETA, backend=backend)))

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    assert splash_attention._shard_specs(mesh, 4, H) == PartitionSpec(
        ("data", "fsdp"), "tensor", None, None)
    assert splash_attention._shard_specs(mesh, 2, H) == PartitionSpec(("data",), "tensor", None, None)
    step = jax.jit(jax.value_and_grad(loss("splash"), argnums=(0, 1, 2)))
    assert "manual_computation" in step.lower(q, k, v).as_text()
    got = step(q, k, v)
  want = jax.value_and_grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
  np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)
  for a, b in zip(got[1], want[1]):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_splash_backend_reaches_the_generator(monkeypatch):
  """model.attention_backend = "splash" routes the generator's full call
  through the kernel (the config check is told it runs on a TPU; the kernel
  then runs interpreted) and gives the xla model's output."""
  from helpers import random_inputs, tiny
  _, model, params = tiny()
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  _, splash_model, _ = tiny((("model.attention_backend", "splash"),))
  monkeypatch.undo()
  calls = []
  kernel = splash_attention.splash_block_causal_attention
  monkeypatch.setattr(attention, "splash_block_causal_attention",
                      lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
  latents, timesteps, cond = random_inputs(model.spec, 2, 4, seed=2)
  want = model.apply(params, latents, timesteps, cond)
  got = splash_model.apply(params, latents, timesteps, cond)
  assert calls
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
