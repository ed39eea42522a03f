"""The generator's contracts (its docstring): cached == full within and far
beyond the window, fixed shapes and one compile, block-causality, the window,
commit=False, scan == unrolled, remat on == off."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import compiled, frame, random_inputs, step_all, tiny
from aapt_jax.models import layer_by_layer, scanned_params

B = 2
TOL = dict(atol=2e-5, rtol=2e-5)


@pytest.fixture(scope="module")
def rollout():
  """One step-by-step rollout of 3N+2 frames on the tiny model."""
  config, model, params = tiny()
  n = model.spec.window_frames
  call, step = compiled(model)
  latents, timesteps, cond = random_inputs(model.spec, B, 3 * n + 2)
  caches = []
  outs = []
  cache = model.init_cache(B)
  for i in range(latents.shape[1]):
    out, cache = step(params, latents[:, i:i + 1], timesteps[:, i:i + 1], frame(cond, i), cache)
    outs.append(out)
    caches.append(cache)
  return dict(model=model, params=params, latents=latents, timesteps=timesteps, cond=cond,
              stepped=jnp.concatenate(outs, 1), caches=caches, step=step, call=call)


@pytest.mark.parametrize("which", ["3", "N+2", "N+3", "3N+2"])
def test_cached_steps_equal_full_call(rollout, which):
  n = rollout["model"].spec.window_frames
  t = {"3": 3, "N+2": n + 2, "N+3": n + 3, "3N+2": 3 * n + 2}[which]
  cond = rollout["cond"]
  cond_t = cond.replace(previous=cond.previous[:, :t], actions=cond.actions[:, :t],
                        controls=cond.controls[:, :t])
  full = rollout["call"](rollout["params"], rollout["latents"][:, :t],
                         rollout["timesteps"][:, :t], cond_t)
  np.testing.assert_allclose(np.asarray(rollout["stepped"][:, :t]), np.asarray(full), **TOL)
  assert float(jnp.abs(full).mean()) > 1e-2  # not vacuous


def test_fresh_call_on_last_window_is_not_the_reference(rollout):
  """The trap the window rule implies: a cached block's keys were computed in its
  own window, so re-running only [sink, last N blocks] differs for a deep model."""
  n = rollout["model"].spec.window_frames
  t = 3 * n + 2
  keep = [0] + list(range(t - n - 1, t))
  cond = rollout["cond"]
  sub = lambda a: a[:, jnp.array(keep)]
  fresh = rollout["call"](rollout["params"], sub(rollout["latents"]), sub(rollout["timesteps"]),
                          cond.replace(previous=sub(cond.previous), actions=sub(cond.actions),
                                       controls=sub(cond.controls)))
  assert float(jnp.abs(fresh[:, -1] - rollout["stepped"][:, -1]).max()) > 1e-4


def test_call_continues_a_cached_prefix(rollout):
  """__call__(cache=prefix) on later frames == stepping them (the cache is read, not written)."""
  n = rollout["model"].spec.window_frames
  for prefix in (1, n + 2):
    cache = rollout["caches"][prefix - 1]
    sl = slice(prefix, prefix + n + 1)
    cond = rollout["cond"]
    got = rollout["call"](rollout["params"], rollout["latents"][:, sl], rollout["timesteps"][:, sl],
                          cond.replace(previous=cond.previous[:, sl], actions=cond.actions[:, sl],
                                       controls=cond.controls[:, sl]), cache)
    np.testing.assert_allclose(np.asarray(got), np.asarray(rollout["stepped"][:, sl]), **TOL)


def test_no_growth_and_one_compile(rollout):
  """Cache shapes never change, step compiled once, frame 3N runs frame N+1's shapes."""
  model = rollout["model"]
  n = model.spec.window_frames
  shapes = lambda c: jax.tree.map(lambda a: (a.shape, a.dtype), c)
  init = shapes(model.init_cache(B))
  for cache in rollout["caches"]:
    assert shapes(cache) == init
  assert rollout["step"]._cache_size() == 1
  assert int(rollout["caches"][-1].counter) == 3 * n + 2
  # the lowered program for frame N+1 and for frame 3N is the same text
  lower = lambda c, i: rollout["step"].lower(
      rollout["params"], rollout["latents"][:, i:i + 1], rollout["timesteps"][:, i:i + 1],
      frame(rollout["cond"], i), c).as_text()
  assert lower(rollout["caches"][n], n + 1) == lower(rollout["caches"][3 * n - 1], 3 * n)


def test_commit_false_leaves_cache_unchanged(rollout):
  step, params = rollout["step"], rollout["params"]
  n = rollout["model"].spec.window_frames
  cache = rollout["caches"][n + 1]
  i = n + 2
  args = (params, rollout["latents"][:, i:i + 1], rollout["timesteps"][:, i:i + 1],
          frame(rollout["cond"], i))
  v_peek, same = step(*args, cache, commit=False)
  for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(cache)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  v_commit, _ = step(*args, cache, commit=True)
  np.testing.assert_allclose(np.asarray(v_peek), np.asarray(v_commit), atol=1e-6)
  np.testing.assert_allclose(np.asarray(v_commit), np.asarray(rollout["stepped"][:, i:i + 1]), **TOL)


def test_block_causality(rollout):
  """Perturbing everything of frame j changes no output before j, and changes frame j."""
  call, params = rollout["call"], rollout["params"]
  latents, timesteps, cond = rollout["latents"], rollout["timesteps"], rollout["cond"]
  j = 4
  base = call(params, latents, timesteps, cond)
  pert = call(params, latents.at[:, j].add(1.0), timesteps.at[:, j].set(0.9),
              cond.replace(previous=cond.previous.at[:, j].add(1.0),
                           actions=cond.actions.at[:, j].set((cond.actions[:, j] + 1) % 5),
                           controls=cond.controls.at[:, j].add(1.0)))
  np.testing.assert_array_equal(np.asarray(base[:, :j]), np.asarray(pert[:, :j]))
  assert float(jnp.abs(base[:, j] - pert[:, j]).max()) > 1e-3
  assert float(jnp.abs(base[:, -1] - pert[:, -1]).max()) > 1e-6  # later frames see it


def test_window_bounds_receptive_field():
  """One layer: block i sees blocks max(1, i-N)..i and the sink, nothing else."""
  _, model, params = tiny((("model.num_layers", 1),))
  n = model.spec.window_frames
  call, _ = compiled(model)
  latents, timesteps, cond = random_inputs(model.spec, B, n + 3, seed=3)
  base = call(params, latents, timesteps, cond)
  pert = call(params, latents.at[:, 1].add(1.0), timesteps, cond)
  # block 1 is inside block N+1's window and outside block N+2's
  assert float(jnp.abs(base[:, n + 1] - pert[:, n + 1]).max()) > 1e-4
  np.testing.assert_array_equal(np.asarray(base[:, n + 2]), np.asarray(pert[:, n + 2]))
  # the sink stays visible to every block
  sink_pert = call(params, latents.at[:, 0].add(1.0), timesteps, cond)
  assert float(jnp.abs(base[:, n + 2] - sink_pert[:, n + 2]).max()) > 1e-4


def _unstack_layers(params, num_layers):
  """Scanned params (blocks stacked on axis 0) -> unrolled blocks_0.. params."""
  p = jax.tree.map(lambda a: a, params)
  blocks = p["params"]["transformer"].pop("blocks")
  for i in range(num_layers):
    p["params"]["transformer"][f"blocks_{i}"] = jax.tree.map(lambda a, i=i: a[i], blocks)
  return p


def test_scan_equals_unrolled(rollout):
  config, model, params = tiny()
  _, unrolled, unrolled_init = tiny((("model.scan_layers", False),))
  converted = _unstack_layers(jax.device_get(jax.tree.map(lambda a: a, params)),
                              model.spec.num_layers)
  # same tree structure as the unrolled model's own init
  assert jax.tree.structure(converted) == jax.tree.structure(unrolled_init)
  call, step = compiled(unrolled)
  latents, timesteps, cond = rollout["latents"], rollout["timesteps"], rollout["cond"]
  t = model.spec.window_frames + 2
  cond_t = cond.replace(previous=cond.previous[:, :t], actions=cond.actions[:, :t],
                        controls=cond.controls[:, :t])
  got = call(converted, latents[:, :t], timesteps[:, :t], cond_t)
  np.testing.assert_allclose(np.asarray(got), np.asarray(rollout["stepped"][:, :t]), **TOL)
  stepped, _ = step_all(step, converted, unrolled.init_cache(B), latents[:, :t],
                        timesteps[:, :t], cond_t)
  np.testing.assert_allclose(np.asarray(stepped), np.asarray(rollout["stepped"][:, :t]), **TOL)


def test_remat_on_equals_off():
  _, model, params = tiny()
  _, remat_model, _ = tiny((("model.remat", "full"),))
  latents, timesteps, cond = random_inputs(model.spec, B, 4, seed=5)

  def loss(m):
    return lambda p: jnp.mean(jnp.square(m.apply(p, latents, timesteps, cond)))

  l0, g0 = jax.jit(jax.value_and_grad(loss(model)))(params)
  l1, g1 = jax.jit(jax.value_and_grad(loss(remat_model)))(params)
  np.testing.assert_allclose(float(l0), float(l1), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)
  # the gradient reaches the first layer's sink path and the action table
  assert float(jnp.abs(g0["params"]["action_embedding"]).max()) > 0


def test_text_mask_and_text_none():
  """Masked text tokens have no effect; text=None runs (cross-attention unused)."""
  _, model, params = tiny()
  call, _ = compiled(model)
  latents, timesteps, cond = random_inputs(model.spec, B, 3, seed=6)
  noisy = cond.text.at[0, 3:].add(5.0)  # sample 0 masks tokens 3, 4
  a = call(params, latents, timesteps, cond)
  b = call(params, latents, timesteps, cond.replace(text=noisy))
  np.testing.assert_allclose(np.asarray(a[0]), np.asarray(b[0]), atol=1e-6)
  c = call(params, latents, timesteps, cond.replace(text=None, text_mask=None))
  assert c.shape == a.shape and bool(jnp.all(jnp.isfinite(c)))


@pytest.mark.parametrize("prediction", ["x0", "frame_delta"])
def test_x0_prediction_is_the_head_turned_into_a_velocity(rollout, prediction):
  """model.prediction="x0": the same params' head output (what the velocity
  model returns) is read as x0 ("frame_delta": as x0 minus the recycled
  frame), so x_t - max(t, x0_min_t) * v gives it back, the one-step frame
  eps - v(eps, 1) is it, and step == full call still."""
  _, x0_model, _ = tiny((("model.prediction", prediction),))
  call, step = compiled(x0_model)
  params, latents, cond = rollout["params"], rollout["latents"][:, :5], rollout["cond"]
  cond5 = cond.replace(previous=cond.previous[:, :5], actions=cond.actions[:, :5],
                       controls=cond.controls[:, :5])
  # t in {0 (sink), below the clamp, above it, 1}
  t = jnp.array([[0.0, 0.01, 0.3, 0.7, 1.0]] * B)
  head = rollout["call"](params, latents, t, cond5)  # velocity model = the raw head
  if prediction == "frame_delta":
    head = head + cond5.previous
  v = call(params, latents, t, cond5)
  t_used = jnp.maximum(t, x0_model.spec.x0_min_t)[:, :, None, None, None]
  np.testing.assert_allclose(np.asarray(latents - t_used * v), np.asarray(head), atol=1e-4)
  assert not np.allclose(np.asarray(v), np.asarray(head), atol=1e-2)
  np.testing.assert_allclose(np.asarray(latents[:, 4] - v[:, 4]), np.asarray(head[:, 4]),
                             atol=1e-5)
  stepped, _ = step_all(step, params, x0_model.init_cache(B), latents, t, cond5)
  np.testing.assert_allclose(np.asarray(stepped), np.asarray(v), atol=1e-3, rtol=1e-4)


def test_fresh_frame_delta_model_copies_the_recycled_frame(rollout):
  """A freshly initialised "frame_delta" model's head is zero: its one-step
  frame eps - v(eps, 1) is exactly the recycled frame, whatever the noise
  (training starts from "copy the previous frame")."""
  _, model, params = tiny((("model.prediction", "frame_delta"),))
  call, _ = compiled(model)
  latents, cond = rollout["latents"][:, :4], rollout["cond"]
  cond4 = cond.replace(previous=cond.previous[:, :4], actions=cond.actions[:, :4],
                       controls=cond.controls[:, :4])
  v = call(params, latents, jnp.ones((B, 4)), cond4)
  np.testing.assert_allclose(np.asarray(latents - v), np.asarray(cond4.previous), atol=1e-5)


def test_precomputed_text_kv_equals_text(rollout):
  """Steps and calls with the prompt's TextKV (computed once) equal those that
  project the text themselves; a TextKV of the wrong shape is refused."""
  model, params, step, call = rollout["model"], rollout["params"], rollout["step"], rollout["call"]
  latents, timesteps, cond = rollout["latents"], rollout["timesteps"], rollout["cond"]
  text_kv = jax.jit(lambda p, t: model.apply(p, t, method="text_kv"))(params, cond.text)
  s = model.spec
  assert text_kv.k.shape == (s.num_layers, B, s.num_heads, s.head_dim, cond.text.shape[1])
  assert text_kv.v.shape == (s.num_layers, B, s.num_heads, s.head_dim, cond.text.shape[1])
  with_kv = cond.replace(text=None, text_kv=text_kv)  # the text itself is not read
  t = s.window_frames + 2
  stepped, _ = step_all(step, params, model.init_cache(B), latents[:, :t], timesteps[:, :t],
                        with_kv)
  np.testing.assert_allclose(np.asarray(stepped), np.asarray(rollout["stepped"][:, :t]), **TOL)
  full = call(params, latents, timesteps, with_kv)
  np.testing.assert_allclose(np.asarray(full), np.asarray(rollout["stepped"]), **TOL)
  bad = with_kv.replace(text_kv=jax.tree.map(lambda a: a[:1], text_kv))
  with pytest.raises(ValueError, match="cond.text_kv"):
    model.apply(params, latents, timesteps, bad)


def test_layer_by_layer_donated_steps_equal_scanned_steps(rollout):
  """Steps of `layer_by_layer`'s unscanned model on the split params, with the
  cache donated (each layer's ring written in place, after its reads), equal
  the scanned model's steps: the same velocities far past the window, and
  the same cache contents, sink, every ring slot and the counter."""
  model, params = rollout["model"], rollout["params"]
  assert model.spec.scan_layers
  split_model, split_params = layer_by_layer(model, params)
  assert not split_model.spec.scan_layers and "blocks_0" in split_params["params"]["transformer"]
  assert "to_qkv" in split_params["params"]["transformer"]["blocks_0"]["attn1"]  # one matmul
  step = jax.jit(lambda p, x, t, c, k: split_model.apply(p, x, t, c, k, method="step"),
                 donate_argnums=4)
  stepped, cache = step_all(step, split_params, model.init_cache(B), rollout["latents"],
                            rollout["timesteps"], rollout["cond"])
  np.testing.assert_allclose(np.asarray(stepped), np.asarray(rollout["stepped"]), **TOL)
  want = rollout["caches"][-1]
  assert int(cache.counter) == int(want.counter)
  for got_layer, want_layer in zip(cache.layers, want.layers):
    for got_a, want_a in zip(jax.tree.leaves(got_layer), jax.tree.leaves(want_layer)):
      np.testing.assert_allclose(np.asarray(got_a), np.asarray(want_a), **TOL)


def test_layer_by_layer_round_trips_for_scanned_and_unscanned_models(rollout):
  """`scanned_params` undoes `layer_by_layer` exactly (q/k/v split again, the
  layers stacked for a scanned model, left per layer for an unscanned one),
  and an unscanned model's stream params are fused too."""
  model, params = rollout["model"], rollout["params"]
  unscanned, split = layer_by_layer(model, params)
  assert jax.tree.all(jax.tree.map(np.array_equal, scanned_params(model, split), params))
  per_layer = scanned_params(unscanned, split)  # the unscanned model's own layout
  assert set(per_layer["params"]["transformer"]["blocks_1"]["attn1"]) >= {"to_q", "to_k", "to_v"}
  again, fused = layer_by_layer(unscanned, per_layer)
  assert not again.spec.scan_layers
  assert jax.tree.all(jax.tree.map(np.array_equal, fused, split))
  assert jax.tree.all(jax.tree.map(np.array_equal, scanned_params(unscanned, fused), per_layer))


def test_per_layer_text_kv_equals_stacked(rollout):
  """The TextKV of `layer_by_layer`'s unscanned model (one array per layer)
  gives the same steps on that model and on the scanned one (which stacks
  it) as the text itself."""
  model, params, cond = rollout["model"], rollout["params"], rollout["cond"]
  split_model, split_params = layer_by_layer(model, params)
  text_kv = split_model.apply(split_params, cond.text, method="text_kv")
  assert isinstance(text_kv.k, tuple) and len(text_kv.k) == model.spec.num_layers
  with_kv = cond.replace(text=None, text_kv=text_kv)
  t = model.spec.window_frames + 3
  latents, timesteps = rollout["latents"][:, :t], rollout["timesteps"][:, :t]
  split_step = jax.jit(lambda p, x, ts, c, k: split_model.apply(p, x, ts, c, k, method="step"))
  for step, p in ((split_step, split_params), (rollout["step"], params)):
    stepped, _ = step_all(step, p, model.init_cache(B), latents, timesteps, with_kv)
    np.testing.assert_allclose(np.asarray(stepped), np.asarray(rollout["stepped"][:, :t]), **TOL)
