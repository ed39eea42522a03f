"""The causal video VAE: equality with diffusers' AutoencoderKLWan on the
committed fixture (tests/fixtures/make_wan_vae_fixtures.py), causality,
streaming decode == whole-clip decode, the import's errors, bad input."""
import json
import math
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from aapt_jax import load_config
from aapt_jax.convert.wan_vae import load_vae
from aapt_jax.models import abstract_params, build_vae
from aapt_jax.models.vae import denormalize_latents, normalize_latents
from helpers import config_path

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
WAN_VAE = os.path.join(FIXTURES, "wan_vae")
WEIGHTS = "diffusion_pytorch_model.safetensors"
WAN_2_1_VAE_PARAMS = 126_892_531  # diffusers' AutoencoderKLWan() (Wan2.1's VAE), counted in torch


def count(tree):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def wan():
  """The fixture VAE (r = 4, s = 8) converted by load_vae, its I/O and jitted calls."""
  config, params = load_vae(WAN_VAE)
  config.model.latent_size = (3, 3)  # the fixture's 24x24 video
  vae = build_vae(config)
  io = dict(np.load(os.path.join(FIXTURES, "wan_vae_io.npz")))
  variables = {"params": params}
  encode = jax.jit(lambda x: vae.apply(variables, x, method="encode"))
  decode = jax.jit(lambda z: vae.apply(variables, z, method="decode"))
  step = jax.jit(lambda z, cache: vae.apply(variables, z, cache, method="decode_step"))
  return dict(config=config, params=params, vae=vae, io=io, encode=encode, decode=decode,
              step=step)


def close(a, b, atol):
  return float(jnp.max(jnp.abs(jnp.asarray(a) - jnp.asarray(b)))) <= atol


# ------------------------------------------------------------ the reference


def test_encode_matches_diffusers(wan):
  io = wan["io"]
  mean, logvar = wan["encode"](io["video"])
  assert mean.shape == io["mean"].shape == (1, 3, 3, 3, 4)
  assert float(jnp.std(io["mean"])) > 0.1  # the reference is not trivially small
  assert close(mean, io["mean"], 1e-4)
  assert close(logvar, io["logvar"], 1e-4)


def test_decode_matches_diffusers(wan):
  io = wan["io"]
  video = wan["decode"](io["mean"])
  assert video.shape == io["decoded"].shape == (1, 9, 24, 24, 3)
  assert float(jnp.std(io["decoded"])) > 0.1
  assert close(video, io["decoded"], 1e-4)


def test_param_count_matches_the_checkpoint_and_wan_2_1():
  with safe_open(os.path.join(WAN_VAE, WEIGHTS), framework="np") as f:
    stored = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
  config, _ = load_vae(WAN_VAE)
  assert count(abstract_params(config, "vae")) == stored
  assert count(abstract_params(load_config(config_path("base.py")), "vae")) == WAN_2_1_VAE_PARAMS


# ------------------------------------------------------- causal and streaming


def test_encode_is_causal_in_frame_groups(wan):
  """Perturbing video frame j changes no latent of an earlier group (group 0 is
  frame 0; group g >= 1 is frames 1 + 4(g-1) .. 4g) and does change its own."""
  video = wan["io"]["video"]
  mean, _ = wan["encode"](video)
  for j, group in ((1, 1), (5, 2), (8, 2)):
    bumped = video.copy()
    bumped[:, j] = -bumped[:, j]
    mean_j, _ = wan["encode"](bumped)
    assert close(mean_j[:, :group], mean[:, :group], 1e-6), f"frame {j} leaked into earlier groups"
    assert not close(mean_j[:, group], mean[:, group], 1e-3), f"frame {j} did not reach group {group}"


def test_streaming_decode_equals_whole_clip_decode(wan):
  vae, step = wan["vae"], wan["step"]
  base = wan["io"]["mean"][0]
  latents = jnp.stack([jnp.concatenate([base, base[:1] * 0.5]),        # [B=2, 4, 3, 3, 4]
                       jnp.concatenate([base[::-1], base[1:2] * -1.0])])
  whole = wan["decode"](latents)  # [2, 1 + 3·4, 24, 24, 3]
  cache = vae.init_decode_cache(2)
  frames = []
  for i in range(latents.shape[1]):
    out, cache = step(latents[:, i:i + 1], cache)
    assert out.shape == (2, 4, 24, 24, 3)
    if i == 0:  # latent 0 decodes to one frame, shown r times
      assert close(out, jnp.broadcast_to(out[:, -1:], out.shape), 0.0)
      out = out[:, -1:]
    frames.append(out)
  assert int(cache.index) == 4
  assert close(jnp.concatenate(frames, axis=1), whole, 1e-5)
  assert step._cache_size() == 1  # one fixed-shape step: latent 0 did not compile its own


def test_decode_step_of_a_fresh_cache_restarts_the_stream(wan):
  latents = wan["io"]["mean"]
  first, _ = wan["step"](latents[:, :1], wan["vae"].init_decode_cache(1))
  assert close(first[:, -1:], wan["decode"](latents)[:, :1], 1e-5)


# ------------------------------------------------------------- bad input


def test_video_length_must_be_one_plus_k_r(wan):
  video = jnp.zeros((1, 8, 24, 24, 3))
  with pytest.raises(ValueError, match=r"T=8.*r=4"):
    wan["vae"].apply({"params": wan["params"]}, video, method="encode")
  with pytest.raises(ValueError, match=r"divisible by the spatial factor s=8"):
    wan["vae"].apply({"params": wan["params"]}, jnp.zeros((1, 5, 20, 24, 3)), method="encode")


def test_decode_step_rejects_wrong_shapes(wan):
  vae, params = wan["vae"], {"params": wan["params"]}
  cache = vae.init_decode_cache(1)
  with pytest.raises(ValueError, match="one latent frame"):
    vae.apply(params, jnp.zeros((1, 2, 3, 3, 4)), cache, method="decode_step")
  with pytest.raises(ValueError, match="vae.z_dim=4"):
    vae.apply(params, jnp.zeros((1, 1, 3, 3, 5)), cache, method="decode_step")
  with pytest.raises(ValueError, match="batch 2"):
    vae.apply(params, jnp.zeros((2, 1, 3, 3, 4)), cache, method="decode_step")


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match="vae.temperal_downsample"):
    build_vae(load_config(config_path("base.py"), {"vae.temperal_downsample": (True,)}))
  with pytest.raises(ValueError, match="vae.attn_scales"):
    build_vae(load_config(config_path("base.py"), {"vae.attn_scales": (0.5,)}))


def test_normalize_latents_by_hand(wan):
  v = wan["config"].vae  # latents_mean (0.1, -0.2, 0.3, -0.4), latents_std (1.5, 2.0, 0.5, 1.0)
  latents = jnp.array([1.0, 1.0, 1.0, 1.0]).reshape(1, 1, 1, 1, 4)
  expected = np.array([0.9 / 1.5, 1.2 / 2.0, 0.7 / 0.5, 1.4 / 1.0]).reshape(1, 1, 1, 1, 4)
  assert close(normalize_latents(latents, v), expected, 1e-6)
  assert close(denormalize_latents(normalize_latents(latents, v), v), latents, 1e-6)
  with pytest.raises(ValueError, match="3 channels"):
    normalize_latents(jnp.zeros((1, 3)), v)


def test_atari_vae_config_shapes():
  config = load_config(config_path("atari_vae.py"))
  assert config.stage == "vae"
  vae = build_vae(config)
  params = abstract_params(config, "vae")
  video = jax.ShapeDtypeStruct((1, 1 + 3 * 2, 64, 64, 3), jnp.float32)
  mean, _ = jax.eval_shape(lambda p, x: vae.apply({"params": p}, x, method="encode"), params, video)
  assert mean.shape == (1, 4, 16, 16, config.model.latent_channels)
  frames, _ = jax.eval_shape(lambda p, z, c: vae.apply({"params": p}, z, c, method="decode_step"),
                             params, jax.ShapeDtypeStruct((1, 1, 16, 16, 8), jnp.float32),
                             vae.init_decode_cache(1))
  assert frames.shape == (1, 2, 64, 64, 3)


# ------------------------------------------------------------ the import


@pytest.fixture
def wan_copy(tmp_path):
  """A writable copy of the fixture folder."""
  dst = tmp_path / "vae"
  shutil.copytree(WAN_VAE, dst)
  return dst


def tensors(folder):
  with safe_open(str(folder / WEIGHTS), framework="np") as f:
    return {k: f.get_tensor(k) for k in f.keys()}


def test_load_vae_reads_sharded_checkpoints(wan, wan_copy):
  stored = tensors(wan_copy)
  names = sorted(stored)
  shards = {"model-00001-of-00002.safetensors": names[::2],
            "model-00002-of-00002.safetensors": names[1::2]}
  (wan_copy / WEIGHTS).unlink()
  for file, keys in shards.items():
    save_file({k: stored[k] for k in keys}, str(wan_copy / file))
  weight_map = {k: file for file, keys in shards.items() for k in keys}
  (wan_copy / (WEIGHTS + ".index.json")).write_text(json.dumps({"weight_map": weight_map}))
  _, params = load_vae(str(wan_copy))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), params, wan["params"])


def test_load_vae_converts_conv_layout(wan):
  torch_kernel = tensors(pathlib.Path(WAN_VAE))["decoder.up_blocks.1.resnets.0.conv1.weight"]
  ours = wan["params"]["decoder"]["up_blocks_1"]["resnets_0"]["conv1"]["kernel"]
  o, i, t, h, w = torch_kernel.shape
  assert ours.shape == (t, h, w, i, o)
  assert ours[2, 0, 1, 3, 5] == torch_kernel[5, 3, 2, 0, 1]


def test_load_vae_missing_files(tmp_path, wan_copy):
  with pytest.raises(FileNotFoundError, match="not found"):
    load_vae(str(tmp_path / "nowhere"))
  (wan_copy / WEIGHTS).unlink()
  with pytest.raises(FileNotFoundError, match=WEIGHTS):
    load_vae(str(wan_copy))
  (wan_copy / "config.json").unlink()
  with pytest.raises(FileNotFoundError, match="config.json"):
    load_vae(str(wan_copy))


def test_load_vae_shape_mismatch_names_tensor_and_shapes(wan_copy):
  stored = tensors(wan_copy)
  stored["decoder.conv_in.weight"] = np.zeros((8, 4, 3, 3, 1), np.float32)
  save_file(stored, str(wan_copy / WEIGHTS))
  with pytest.raises(ValueError, match=r"decoder\.conv_in\.weight: shape \(8, 4, 3, 3, 1\).*"
                                       r"\(8, 4, 3, 3, 3\)"):
    load_vae(str(wan_copy))


def test_load_vae_lists_missing_and_unknown_tensors(wan_copy):
  stored = tensors(wan_copy)
  del stored["encoder.mid_block.attentions.0.proj.bias"]
  stored["encoder.extra.weight"] = np.zeros((2,), np.float32)
  save_file(stored, str(wan_copy / WEIGHTS))
  with pytest.raises(ValueError, match=r"(?s)missing \(1\): encoder\.mid_block\.attentions\.0"
                                       r"\.proj\.bias.*unknown \(1\): encoder\.extra\.weight"):
    load_vae(str(wan_copy))


@pytest.mark.parametrize("change, message", [
    ({"_class_name": "WanTransformer3DModel"}, "not a Wan2.1 VAE.*load_transformer"),
    ({"_class_name": "AutoencoderKL"}, "not a Wan2.1 VAE"),
    ({"is_residual": True}, "Wan2.2"),
    ({"scale_factor_spatial": 16}, "scale_factor_spatial=16"),
])
def test_load_vae_rejects_other_families(wan_copy, change, message):
  cfg = json.loads((wan_copy / "config.json").read_text())
  cfg.update(change)
  (wan_copy / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match=message):
    load_vae(str(wan_copy))
