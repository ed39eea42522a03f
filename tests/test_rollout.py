"""Student-forcing rollout: equals the streaming generator and the parallel
recompute; scan and recompute gradients agree in both segment modes; the
gradient crosses segments end to end and stops at the boundary when truncated."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aapt_jax import rollout as ro
from aapt_jax.models import Conditioning
from aapt_jax.objectives import adversarial as adv
from helpers import compiled, frame, tiny

B, L, S, O = 2, 7, 4, 1  # segments [0, 4) and [3, 7)


@pytest.fixture(scope="module")
def setup():
  _, model, params = tiny((("model.text_dim", 0),))
  s = model.spec
  ks = jax.random.split(jax.random.key(11), 4)
  inputs = jax.random.normal(ks[0], (B, L, *s.latent_size, s.latent_channels))
  cond = Conditioning(actions=jax.random.randint(ks[1], (B, L), 0, s.num_actions),
                      controls=jax.random.normal(ks[2], (B, L, s.control_dim)))
  weights = [jax.random.normal(k, (B, S, *s.latent_size, s.latent_channels))
             for k in jax.random.split(ks[3], 2)]
  return model, params["params"], inputs, cond, weights


def test_rollout_equals_streaming_steps_and_recompute(setup):
  model, params, inputs, cond, _ = setup
  frames, _ = jax.jit(lambda p, x, c: ro.rollout_student_forcing(model, p, x, c))(params, inputs,
                                                                                 cond)
  # by hand: T calls of Generator.step
  _, step = compiled(model)
  cache = model.init_cache(B)
  prev = jnp.zeros_like(inputs[:, :1])
  manual = []
  for i in range(L):
    t = jnp.full((B, 1), 0.0 if i == 0 else 1.0)
    c = frame(cond.replace(previous=prev), 0).replace(actions=cond.actions[:, i:i + 1],
                                                      controls=cond.controls[:, i:i + 1])
    v, cache = step({"params": params}, inputs[:, i:i + 1], t, c, cache)
    x = inputs[:, i:i + 1] if i == 0 else inputs[:, i:i + 1] - v
    manual.append(x)
    prev = x
  manual = jnp.concatenate(manual, 1)
  np.testing.assert_allclose(np.asarray(frames), np.asarray(manual), atol=2e-5, rtol=2e-5)
  rec = jax.jit(lambda p: ro.recompute_frames(model, p, inputs, frames, cond))(params)
  np.testing.assert_allclose(np.asarray(rec), np.asarray(frames), atol=2e-5, rtol=2e-5)
  assert float(jnp.abs(frames[:, 1:] - inputs[:, 1:]).mean()) > 1e-2  # really generated


def _loss_fn(model, inputs, cond, weights, gradient, segment_gradient, last_only=False):
  starts = adv.segment_starts(L, S, O)

  def loss(params, inputs):
    segs = ro.segment_frames(model, params, inputs, cond, starts, S, gradient=gradient,
                             segment_gradient=segment_gradient)
    terms = [jnp.mean(f * w[:, :f.shape[1]]) for f, w in zip(segs, weights)]
    return terms[-1] if last_only else sum(terms)

  return jax.jit(jax.grad(loss, argnums=(0, 1)))


@pytest.mark.parametrize("segment_gradient", ["end_to_end", "truncated"])
def test_scan_and_recompute_give_equal_gradients(setup, segment_gradient):
  model, params, inputs, cond, weights = setup
  g_scan = _loss_fn(model, inputs, cond, weights, "scan", segment_gradient)(params, inputs)
  g_rec = _loss_fn(model, inputs, cond, weights, "recompute", segment_gradient)(params, inputs)
  for a, b in zip(jax.tree.leaves(g_scan), jax.tree.leaves(g_rec)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=2e-4)
  # recompute from a rollout already made (what stage 3's D judged): the same gradient
  starts = adv.segment_starts(L, S, O)
  rollout = ro.rollout_student_forcing(model, params, inputs, cond,
                                       cache_at=starts if segment_gradient == "truncated" else ())

  def reused(p):
    segs = ro.segment_frames(model, p, inputs, cond, starts, S, gradient="recompute",
                             segment_gradient=segment_gradient, rollout=rollout)
    return sum(jnp.mean(f * w[:, :f.shape[1]]) for f, w in zip(segs, weights))

  g_reused = jax.jit(jax.grad(reused))(params)
  for a, b in zip(jax.tree.leaves(g_reused), jax.tree.leaves(g_rec[0])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=2e-4)
  assert float(jnp.abs(g_scan[0]["time_proj"]["kernel"]).max()) > 0


def test_gradient_crosses_segments_only_end_to_end(setup):
  """The last segment's loss reaches frame 1's noise (a block of the first
  segment, through the KV cache) end to end, and not at all when truncated."""
  model, params, inputs, cond, weights = setup
  _, g_e2e = _loss_fn(model, inputs, cond, weights, "scan", "end_to_end", True)(params, inputs)
  _, g_tr = _loss_fn(model, inputs, cond, weights, "scan", "truncated", True)(params, inputs)
  assert float(jnp.abs(g_e2e[:, 1]).max()) > 1e-6
  assert float(jnp.abs(g_tr[:, 1]).max()) == 0.0
  # inside the last segment the truncated gradient is alive
  assert float(jnp.abs(g_tr[:, 4]).max()) > 1e-6


def test_recycled_input_carries_no_gradient_but_the_cache_does(setup):
  """d frame_2 / d eps_1 in the scan: the recycled path (x_1 as frame 2's
  input) is stop_gradient, so only the cache path is left — it equals the
  gradient of a parallel pass where the recycled frames are constants, and it
  is not zero."""
  model, params, inputs, cond, _ = setup
  x3 = inputs[:, :3]

  def frame2_scan(eps1):
    frames, _ = ro.rollout_student_forcing(model, params, x3.at[:, 1].set(eps1), cond)
    return jnp.sum(frames[:, 2])

  g = jax.grad(frame2_scan)(x3[:, 1])
  rolled, _ = ro.rollout_student_forcing(model, params, x3, cond)
  g_const = jax.grad(lambda e: jnp.sum(ro.recompute_frames(
      model, params, x3.at[:, 1].set(e), rolled, cond)[:, 2]))(x3[:, 1])
  np.testing.assert_allclose(np.asarray(g), np.asarray(g_const), atol=1e-6, rtol=1e-4)
  assert float(jnp.abs(g).max()) > 1e-6


def test_segments_by_hand():
  assert [list(r) for r in adv.segments(10, 4, 1)] == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
  assert [list(r) for r in adv.segments(11, 4, 1)] == [
      [0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9], [9, 10]]
  assert [list(r) for r in adv.segments(5, 8, 2)] == [[0, 1, 2, 3, 4]]
  assert adv.segment_starts(12, 6, 0) == [0, 6]
  with pytest.raises(ValueError, match="overlap"):
    adv.segment_starts(10, 4, 4)


def test_relativistic_losses_and_r1_by_hand():
  real = jnp.array([[1.0, 0.0]])
  fake = jnp.array([[0.0, 2.0]])
  sp = lambda x: np.log1p(np.exp(x))
  assert float(adv.generator_loss(real, fake)) == pytest.approx((sp(1.0) + sp(-2.0)) / 2, 1e-6)
  assert float(adv.discriminator_loss(real, fake)) == pytest.approx((sp(-1.0) + sp(2.0)) / 2,
                                                                    1e-6)
  x = jnp.arange(6.0).reshape(2, 3)
  rng = jax.random.key(0)
  eps = jax.random.normal(rng, x.shape)
  disc = lambda y: 2.0 * y.sum(axis=-1)  # D(x) - D(x + s eps) = -2 s sum(eps)
  want = np.mean((2.0 * 0.1 * np.asarray(eps).sum(-1)) ** 2)
  assert float(adv.approx_r1(disc, x, 0.1, rng)) == pytest.approx(want, rel=1e-5)


def test_weighted_losses_leave_out_zero_weight_pairs():
  """A pair of weight 0 (stage 3: frame 0 of segment 0) is in no loss:
  changing its logits changes nothing; the rest is the plain mean."""
  real = jnp.array([[1.0, 0.0, 3.0]])
  fake = jnp.array([[0.0, 2.0, -1.0]])
  w = jnp.array([[0.0, 1.0, 1.0]])
  moved = lambda x: x.at[0, 0].add(5.0)
  for loss in (adv.generator_loss, adv.discriminator_loss, adv.r1_penalty):
    want = float(loss(real[:, 1:], fake[:, 1:]))
    assert float(loss(real, fake, w)) == pytest.approx(want, rel=1e-6)
    assert float(loss(moved(real), moved(moved(fake)), w)) == pytest.approx(want, rel=1e-6)


def test_text_keys_values_once_per_rollout_same_gradient(monkeypatch):
  """The rollout computes the prompt's text keys/values once before its scan:
  frames and parameter gradients equal a rollout whose every step projects the
  text itself."""
  _, model, params = tiny()
  s = model.spec
  ks = jax.random.split(jax.random.key(12), 4)
  inputs = jax.random.normal(ks[0], (B, 4, *s.latent_size, s.latent_channels))
  cond = Conditioning(text=jax.random.normal(ks[1], (B, 5, s.text_dim)),
                      text_mask=jnp.arange(5)[None] < jnp.array([[3], [5]]),
                      actions=jax.random.randint(ks[2], (B, 4), 0, s.num_actions),
                      controls=jax.random.normal(ks[3], (B, 4, s.control_dim)))

  def loss(params):
    frames, _ = ro.rollout_student_forcing(model, params, inputs, cond)
    return jnp.mean(frames[:, 1:] * inputs[:, 1:]), frames

  (l0, f0), g0 = jax.jit(jax.value_and_grad(loss, has_aux=True))(params["params"])
  monkeypatch.setattr(ro, "with_text_kv", lambda model, params, cond: cond)
  (l1, f1), g1 = jax.jit(jax.value_and_grad(loss, has_aux=True))(params["params"])
  np.testing.assert_allclose(np.asarray(f0), np.asarray(f1), atol=2e-5, rtol=2e-5)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)
  text_grad = g0["transformer"]["blocks"]["attn2"]["to_k"]["kernel"]
  assert float(jnp.abs(text_grad).max()) > 0  # the text path does get gradient
