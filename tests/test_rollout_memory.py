"""Memory of differentiating the student-forcing rollout (compiled memory
analysis, two rollout lengths): `recompute` grows like a teacher-forcing
step over the same frames, `scan` by at least one whole KV cache per frame.

The model remats each block (`model.remat="full"`, as large configs do), so
a teacher-forcing step keeps only layer inputs per frame and the cache a
scan saves at every step stands out.
"""
import jax
import jax.numpy as jnp
import pytest

from aapt_jax import rollout as ro
from aapt_jax.models import Conditioning
from helpers import tiny

B = 2
LENGTHS = (8, 16)
OVERRIDES = (("model.text_dim", 0), ("model.control_dim", 0), ("model.window_frames", 16),
             ("model.latent_size", (4, 4)), ("model.dim", 128), ("model.num_heads", 1),
             ("model.ffn_dim", 128), ("model.num_layers", 4), ("model.remat", "full"))


def _temp_bytes(fn, *args):
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.fixture(scope="module")
def growth():
  """{kind: temp bytes at LENGTHS[1] - at LENGTHS[0]}, and one cache's bytes."""
  _, model, params = tiny(OVERRIDES)
  p, s = params["params"], model.spec
  temps = {}
  for length in LENGTHS:
    x = jnp.zeros((B, length, *s.latent_size, s.latent_channels))
    cond = Conditioning(actions=jnp.zeros((B, length), jnp.int32))

    def teacher_forcing(p, x=x, cond=cond):
      v = model.apply({"params": p}, x, jnp.full(x.shape[:2], 0.5), cond.replace(previous=x))
      return jnp.mean(v ** 2)

    def rollout_loss(gradient, x=x, cond=cond):
      def loss(p):
        (frames,) = ro.segment_frames(model, p, x, cond, [0], x.shape[1], gradient=gradient)
        return jnp.mean(frames ** 2)
      return loss

    for kind, fn in (("teacher_forcing", teacher_forcing),
                     ("recompute", rollout_loss("recompute")), ("scan", rollout_loss("scan"))):
      temps.setdefault(kind, []).append(_temp_bytes(jax.grad(fn), p))
  cache = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(model.init_cache(B)))
  return {k: v[1] - v[0] for k, v in temps.items()}, cache


def test_recompute_grows_like_teacher_forcing(growth):
  g, cache = growth
  frames = LENGTHS[1] - LENGTHS[0]
  assert g["teacher_forcing"] > 0
  assert g["recompute"] <= 1.1 * g["teacher_forcing"], g
  assert g["recompute"] < frames * cache, (g, cache)  # no cache kept per frame


def test_scan_keeps_a_cache_per_frame(growth):
  g, cache = growth
  frames = LENGTHS[1] - LENGTHS[0]
  assert g["scan"] >= frames * cache, (g, cache)
  assert g["scan"] > 1.5 * g["recompute"], g
