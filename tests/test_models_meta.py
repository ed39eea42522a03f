"""Parameter counts (by eval_shape, no allocation), logical axis names on
every parameter, configs, and clear errors for bad input."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from aapt_jax import load_config
from aapt_jax.models import (Conditioning, abstract_params, build_generator, build_vae,
                             init_params, init_vae_params)
from aapt_jax.parallel import LOGICAL_AXIS_NAMES
from helpers import compiled, config_path, tiny

WAN_1_3B_PARAMS = 1_418_996_800  # the public Wan2.1 T2V-1.3B transformer


def count(tree):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def test_aapt_8b_is_about_8b_without_allocating():
  params = abstract_params(load_config(config_path("aapt_8b.py")))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))
  assert 7.5e9 <= count(params) <= 8.5e9


def test_wan_1_3b_parameter_count():
  plain = abstract_params(load_config(config_path("wan2_1_1_3b.py:plain")))
  assert count(plain) == WAN_1_3B_PARAMS
  # AAPT mode adds only the recycled-frame input columns of the patch embed
  aapt = abstract_params(load_config(config_path("wan2_1_1_3b.py")))
  assert count(aapt) - count(plain) == 16 * 1 * 2 * 2 * 1536
  assert aapt["patch_embedding"]["kernel"].shape == (1, 2, 2, 32, 1536)


@pytest.mark.parametrize("name", ["tiny.py", "atari.py", "aapt_8b.py", "wan2_1_1_3b.py",
                                  "vae:atari_vae.py", "vae:wan2_1_1_3b.py"])
def test_every_parameter_has_logical_axis_names(name):
  if name.startswith("vae:"):  # the video VAE (stage "vae" shards it like the DiT)
    vae = build_vae(load_config(config_path(name[4:])))
    boxed = jax.eval_shape(lambda: init_vae_params(vae, jax.random.key(0)))["params"]
  else:
    model = build_generator(load_config(config_path(name)))
    boxed = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))["params"]
  leaves = jax.tree.leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves
  for path, leaf in leaves:
    where = jax.tree_util.keystr(path)
    assert isinstance(leaf, nn.LogicallyPartitioned), f"{where} has no logical axis names"
    assert len(leaf.names) == leaf.value.ndim, f"{where}: {leaf.names} vs {leaf.value.shape}"
    for n in leaf.names:
      assert n in LOGICAL_AXIS_NAMES, f"{where}: axis name {n!r} is not in the rules table"


def test_load_config_overrides_and_unknown_field():
  c = load_config(config_path("tiny.py"), {"model.dim": 48, "train.steps": 7})
  assert c.model.dim == 48 and c.train.steps == 7
  with pytest.raises(ValueError, match="model.dimm"):
    load_config(config_path("tiny.py"), {"model.dimm": 48})
  with pytest.raises(ValueError, match="nosuch"):
    load_config(config_path("tiny.py"), {"nosuch.field": 1})
  with pytest.raises(ValueError, match="model.dim"):
    load_config(config_path("tiny.py"), {"model.dim": "wide"})
  assert load_config(config_path("wan2_1_1_3b.py:plain")).model.block_causal is False


@pytest.mark.parametrize("field,value", [("window_frames", 0), ("window_frames", -2),
                                         ("num_heads", 5), ("patch_size", (2, 2, 2)),
                                         ("latent_size", (5, 4)), ("remat", "sometimes")])
def test_bad_model_config_names_the_field(field, value):
  config = load_config(config_path("tiny.py"), {f"model.{field}": value})
  with pytest.raises(ValueError, match=f"model.{field}"):
    build_generator(config)


def test_bad_inputs_raise_clear_errors():
  _, model, params = tiny()
  call, step = compiled(model)
  s = model.spec
  h, w = s.latent_size
  good = jnp.zeros((1, 2, h, w, s.latent_channels))
  t = jnp.zeros((1, 2))
  with pytest.raises(ValueError, match=r"\[B, T, h, w, C\]"):
    call(params, good[0], t, Conditioning())
  with pytest.raises(ValueError, match="latent_channels"):
    call(params, jnp.zeros((1, 2, h, w, s.latent_channels + 1)), t, Conditioning())
  with pytest.raises(ValueError, match="patch_size"):
    call(params, jnp.zeros((1, 2, h + 1, w, s.latent_channels)), t, Conditioning())
  with pytest.raises(ValueError, match="timesteps"):
    call(params, good, jnp.zeros((1, 3)), Conditioning())
  with pytest.raises(ValueError, match="cond.actions"):
    call(params, good, t, Conditioning(actions=jnp.zeros((1, 3), jnp.int32)))
  with pytest.raises(ValueError, match="cond.text"):
    call(params, good, t, Conditioning(text=jnp.zeros((1, 4, s.text_dim + 1))))
  cache = model.init_cache(1)
  with pytest.raises(ValueError, match="one latent frame"):
    step(params, good, t, Conditioning(), cache)
  with pytest.raises(ValueError, match="latent_size"):
    step(params, jnp.zeros((1, 1, h + 2, w, s.latent_channels)), t[:, :1], Conditioning(), cache)
  with pytest.raises(ValueError, match="cache"):
    step(params, good[:, :1], t[:, :1], Conditioning(), model.init_cache(3))
  plain = build_generator(load_config(config_path("tiny.py"), {"model.block_causal": False}))
  with pytest.raises(ValueError, match="block_causal"):
    plain.init_cache(1)
