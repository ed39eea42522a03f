"""The discriminator: one logit per latent frame, block-causal, its backbone
from the stage-1 generator, input noising on and off."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aapt_jax import load_config
from aapt_jax.models import abstract_params
from aapt_jax.models import discriminator as dm
from helpers import config_path, random_inputs, tiny


@pytest.fixture(scope="module")
def disc_setup():
  config, model, gen_params = tiny()
  disc = dm.build_discriminator(config)
  params = nn.meta.unbox(dm.init_discriminator_params(disc, jax.random.key(5)))
  params = {"params": dm.params_from_generator(params["params"], gen_params["params"])}
  call = jax.jit(lambda p, x, t, c, r=None: disc.apply(p, x, t, c, noise_rng=r))
  return config, disc, params, gen_params, call


def test_backbone_starts_from_the_generator(disc_setup):
  _, _, params, gen_params, _ = disc_setup
  backbone = params["params"]["backbone"]
  for key, tree in backbone.items():
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(gen_params["params"][key])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert "proj_out" not in backbone  # the velocity head is not part of D


def test_one_logit_per_frame_and_block_causal(disc_setup):
  _, disc, params, _, call = disc_setup
  x, t, cond = random_inputs(disc.spec, 2, 5, seed=2)
  cond = cond.replace(previous=None)
  logits = call(params, x, t, cond)
  assert logits.shape == (2, 5)
  pert = call(params, x.at[:, 3].add(1.0), t, cond)
  np.testing.assert_array_equal(np.asarray(logits[:, :3]), np.asarray(pert[:, :3]))
  assert float(jnp.abs(logits[:, 3] - pert[:, 3]).max()) > 1e-5


def test_noise_input_both_ways(disc_setup):
  config, disc, params, _, call = disc_setup
  x, t, cond = random_inputs(disc.spec, 2, 3, seed=3)
  cond = cond.replace(previous=None)
  clean = call(params, x, t, cond)
  # disc_noise_input=False: a noise rng changes nothing
  np.testing.assert_array_equal(np.asarray(clean), np.asarray(call(params, x, t, cond,
                                                                   jax.random.key(1))))
  config_noisy = load_config(config_path("tiny.py"), {"adversarial.disc_noise_input": True})
  noisy_disc = dm.build_discriminator(config_noisy)
  noisy = noisy_disc.apply(params, x, t, cond, noise_rng=jax.random.key(1))
  assert float(jnp.abs(noisy - clean).max()) > 1e-5
  # at t = 0 the noised input is the frame itself
  zero_t = jnp.zeros_like(t)
  np.testing.assert_allclose(
      np.asarray(noisy_disc.apply(params, x, zero_t, cond, noise_rng=jax.random.key(1))),
      np.asarray(call(params, x, zero_t, cond)), atol=1e-6)


def test_abstract_discriminator_params_and_bad_head_layers():
  p = abstract_params(load_config(config_path("tiny.py")), kind="discriminator")
  assert "backbone" in p and "head_1" in p
  with pytest.raises(ValueError, match="disc_head_layers"):
    dm.build_discriminator(load_config(config_path("tiny.py"),
                                       {"adversarial.disc_head_layers": (0, 7)}))


def test_every_discriminator_parameter_has_logical_axis_names():
  from aapt_jax.parallel import LOGICAL_AXIS_NAMES
  disc = dm.build_discriminator(load_config(config_path("tiny.py")))
  boxed = jax.eval_shape(lambda: dm.init_discriminator_params(disc, jax.random.key(0)))
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(l, nn.LogicallyPartitioned) for l in leaves)
  assert all(n in LOGICAL_AXIS_NAMES for l in leaves for n in l.names)


def _by_parts(disc, params, frames, t, cond):
  """D's logits from its parts: the backbone's features with the recycled
  slot holding `frames` shifted by one (zeros at frame 0), summed heads."""
  from aapt_jax.models import Generator
  previous = jnp.concatenate([jnp.zeros_like(frames[:, :1]), frames[:, :-1]], axis=1)
  feats = Generator(disc.spec).apply({"params": params["params"]["backbone"]}, frames, t,
                                     cond.replace(previous=previous), method="features")
  return sum(dm.LogitHead(disc.spec).apply({"params": params["params"][f"head_{i}"]}, feats[i])
             for i in disc.head_layers)


def test_recycled_slot_holds_the_input_frames_noised_like_them(disc_setup):
  """D's input is the clip alone: its recycled slot holds its own input frame
  i - 1 — with disc_noise_input, the noised one (x_t = (1 - t) x + t·noise), so
  no clean frame reaches D — and an explicit `noise` is the draw used."""
  from aapt_jax.objectives.flow_matching import interpolate
  config, disc, params, _, call = disc_setup
  x, t, cond = random_inputs(disc.spec, 2, 4, seed=4)
  cond = cond.replace(previous=None)
  np.testing.assert_allclose(np.asarray(call(params, x, t, cond)),
                             np.asarray(_by_parts(disc, params, x, t, cond)), atol=1e-5)
  noisy_disc = dm.build_discriminator(load_config(config_path("tiny.py"),
                                                  {"adversarial.disc_noise_input": True}))
  key = jax.random.key(7)
  noise = jax.random.normal(key, x.shape)
  want = _by_parts(disc, params, interpolate(x, noise, t), t, cond)
  np.testing.assert_allclose(np.asarray(noisy_disc.apply(params, x, t, cond, noise_rng=key)),
                             np.asarray(want), atol=1e-5)
  np.testing.assert_allclose(np.asarray(noisy_disc.apply(params, x, t, cond, noise=noise)),
                             np.asarray(want), atol=1e-5)
  with pytest.raises(ValueError, match="previous"):
    disc.apply(params, x, t, cond.replace(previous=x))


@pytest.mark.parametrize("remat", ["none", "full"])
def test_features_at_chosen_depths_equal_every_depth_sliced(remat):
  """`features(layers=...)` (one scan per stretch of layers over slices of the
  stacked params: the other depths are never stored) equals the full scan's
  outputs at those depths, and so do its gradients (fp32; params and input)."""
  from aapt_jax.models import Generator
  config, model, params = tiny((("model.remat", remat), ("model.num_layers", 4)))
  x, t, cond = random_inputs(model.spec, 2, 3, seed=6)
  depths = (0, 2)
  n = model.spec.num_layers
  weights = jax.random.normal(jax.random.key(8), (len(depths), 1, 1, 1, model.spec.dim))

  def loss(p, x, layers):
    f = Generator(model.spec).apply(p, x, t, cond, layers=layers, method="features")
    f = f if layers is not None else f[jnp.asarray(depths)]
    return jnp.sum(jnp.sin(f.astype(jnp.float32)) * weights), f

  (got, f_got), g_got = jax.jit(jax.value_and_grad(
      lambda p, x: loss(p, x, depths), argnums=(0, 1), has_aux=True))(params, x)
  (want, f_want), g_want = jax.jit(jax.value_and_grad(
      lambda p, x: loss(p, x, None), argnums=(0, 1), has_aux=True))(params, x)
  assert f_got.shape == (len(depths),) + f_want.shape[1:] and n > max(depths) + 1
  np.testing.assert_allclose(np.asarray(f_got), np.asarray(f_want), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)
  with pytest.raises(ValueError, match="feature_layers"):
    Generator(model.spec).apply(params, x, t, cond, layers=(2, 0), method="features")
