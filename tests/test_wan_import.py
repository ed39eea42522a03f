"""Wan2.1 transformer import, checked against diffusers 0.42.1 (fixtures made by
tests/fixtures/make_wan_fixtures.py with the real WanTransformer3DModel)."""
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from aapt_jax import load_config, loading
from aapt_jax.convert.adapt import adapt_to
from aapt_jax.convert.wan import BASE_CONFIG, expected_tensors, load_transformer, \
    transformer_config
from aapt_jax.convert.write import write_generator_checkpoint
from aapt_jax.models import Conditioning, abstract_params, build_generator
from helpers import ROOT, config_path

FIXTURES = os.path.join(ROOT, "tests", "fixtures")
DIFFUSERS_DIR = os.path.join(FIXTURES, "wan_transformer")
ORIGINAL_DIR = os.path.join(FIXTURES, "wan_transformer_original")
NO_CROSS_NORM_DIR = os.path.join(FIXTURES, "wan_transformer_no_cross_norm")
WEIGHTS = "diffusion_pytorch_model.safetensors"
TOL = 1e-4


@pytest.fixture(scope="module")
def io():
  return dict(np.load(os.path.join(FIXTURES, "wan_transformer_io.npz")))


@pytest.fixture(scope="module")
def imported():
  return load_transformer(DIFFUSERS_DIR)


def run(config, params, latents, t, cond):
  """Our generator's velocity; t [B] for all frames (Wan's one timestep)."""
  model = build_generator(config)
  timesteps = jnp.repeat(jnp.asarray(t)[:, None], latents.shape[1], axis=1)
  return np.asarray(jax.jit(model.apply)({"params": params}, latents, timesteps, cond))


def leaves(tree):
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def copy_fixture(tmp_path, src=DIFFUSERS_DIR, name="ckpt"):
  dst = tmp_path / name
  shutil.copytree(src, dst)
  return dst


def edit_config(folder, **changes):
  with open(folder / "config.json") as f:
    cfg = json.load(f)
  cfg.update(changes)
  with open(folder / "config.json", "w") as f:
    json.dump(cfg, f)


# ------------------------------------------------------------------ parity


def test_config_read_from_config_json(imported):
  config, params = imported
  m = config.model
  assert (m.dim, m.num_heads, m.num_layers, m.ffn_dim, m.freq_dim, m.text_dim) == \
      (32, 2, 2, 64, 32, 32)
  assert (m.latent_channels, tuple(m.patch_size), m.eps) == (4, (1, 2, 2), 1e-6)
  assert m.cross_attn_norm and m.qk_norm
  assert not m.block_causal and not m.frame_recycling and m.dtype == "float32"
  # the rest of the config is configs/base.py's
  assert config.train.to_dict() == load_config(BASE_CONFIG).train.to_dict()
  want = abstract_params(config)
  assert jax.tree.structure(want) == jax.tree.structure(params)
  for w, p in zip(jax.tree.leaves(want), jax.tree.leaves(params)):
    assert w.shape == p.shape and p.dtype == np.float32


def test_plain_wan_matches_diffusers(imported, io):
  config, params = imported
  out = run(config, params, io["latents"], io["t"], Conditioning(text=io["text"]))
  assert np.abs(io["expected"]).max() > 0.5  # a non-trivial reference
  np.testing.assert_allclose(out, io["expected"], atol=TOL, rtol=0)


def test_no_cross_attention_norm_matches_diffusers(io):
  config, params = load_transformer(NO_CROSS_NORM_DIR)
  assert not config.model.cross_attn_norm and "norm2" not in params["transformer"]["blocks"]
  out = run(config, params, io["latents"], io["t"], Conditioning(text=io["text"]))
  np.testing.assert_allclose(out, io["expected_no_cross_norm"], atol=TOL, rtol=0)


def test_original_wan_layout_gives_the_same_params(imported):
  config, params = load_transformer(ORIGINAL_DIR)
  assert config.model.to_dict() == imported[0].model.to_dict()
  ours, theirs = leaves(params), leaves(imported[1])
  assert ours.keys() == theirs.keys()
  for k in ours:
    np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)


def test_sharded_and_bfloat16_checkpoints(tmp_path, imported):
  folder = copy_fixture(tmp_path)
  tensors = load_file(folder / WEIGHTS)
  os.remove(folder / WEIGHTS)
  names = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": names[::2],
            "model-00002-of-00002.safetensors": names[1::2]}
  import ml_dtypes
  for shard, keys in shards.items():
    save_file({k: tensors[k].astype(ml_dtypes.bfloat16) for k in keys}, folder / shard)
  with open(folder / (WEIGHTS + ".index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": {k: s for s, ks in shards.items() for k in ks}}, f)
  _, params = load_transformer(folder)
  ours, ref = leaves(params), leaves(imported[1])
  for k in ours:
    assert ours[k].dtype == np.float32
    rounded = ref[k].astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(ours[k], rounded, err_msg=k)


def test_public_1_3b_layout_maps_tensor_for_tensor():
  """Every tensor of diffusers' T2V-1.3B (names and shapes, made on the meta
  device) is exactly what the loader expects from its config.json."""
  with open(os.path.join(FIXTURES, "wan2_1_t2v_1_3b_tensors.json")) as f:
    manifest = json.load(f)
  shapes = {k: tuple(v) for k, v in manifest["tensors"].items()}
  config, layout = transformer_config(manifest["config"], shapes)
  assert layout == "WanTransformer3DModel"
  assert expected_tensors(config) == shapes
  assert sum(int(np.prod(s)) for s in shapes.values()) == 1_418_996_800
  ours = load_config(config_path("wan2_1_1_3b.py:plain")).model
  for field in ("dim", "num_heads", "num_layers", "ffn_dim", "freq_dim", "text_dim",
                "latent_channels", "patch_size", "latent_size", "block_causal",
                "frame_recycling", "cross_attn_norm", "qk_norm", "eps"):
    assert config.model[field] == ours[field], field


# ------------------------------------------------------- AAPT on Wan weights


def aapt_config(plain):
  overrides = {"model.block_causal": True, "model.frame_recycling": True,
               "model.num_actions": 5, "model.control_dim": 3, "model.latent_size": (8, 8),
               "model.window_frames": 2}
  return load_config(BASE_CONFIG, {**{f"model.{k}": v for k, v in plain.model.items()
                                      if k not in ("latent_size",)}, **overrides})


def test_aapt_mode_on_one_frame_is_wan(imported, io):
  plain_config, plain = imported
  config = aapt_config(plain_config)
  params, report = adapt_to(plain, config, plain_config)
  assert report.padded == ["patch_embedding/kernel (1, 2, 2, 4, 32)->(1, 2, 2, 8, 32)"]
  assert report.zeros == ["action_embedding", "control_out/bias", "control_out/kernel"]
  assert report.random == ["control_in/bias", "control_in/kernel"]
  assert report.ignored == []
  assert np.abs(params["control_in"]["kernel"]).max() > 0
  latents = io["latents"][:, :1]
  key = jax.random.split(jax.random.key(3), 3)
  cond = Conditioning(text=io["text"], previous=jax.random.normal(key[0], latents.shape),
                      actions=jax.random.randint(key[1], (2, 1), 0, 5),
                      controls=jax.random.normal(key[2], (2, 1, 3)))
  out = run(config, params, latents, io["t"], cond)
  np.testing.assert_allclose(out, io["expected_first"], atol=TOL, rtol=0)

  # ... and the additions can learn: a gradient reaches each zero-initialised
  # tensor (the control MLP's output kernel only because its input layer is random)
  model = build_generator(config)
  t = jnp.asarray(io["t"])[:, None]
  loss = lambda p: jnp.sum(model.apply({"params": p}, latents, t, cond) ** 2)
  grads = jax.grad(loss)(jax.tree.map(jnp.asarray, params))
  assert np.abs(grads["patch_embedding"]["kernel"][..., 4:, :]).max() > 0
  assert np.abs(grads["action_embedding"]).max() > 0
  assert np.abs(grads["control_out"]["kernel"]).max() > 0


def test_adapt_to_rejects_a_model_of_another_shape_or_function(imported):
  plain_config, plain = imported
  wider = load_config(BASE_CONFIG, {**{f"model.{k}": v for k, v in plain_config.model.items()},
                                    "model.ffn_dim": 128})
  with pytest.raises(ValueError, match=r"ffn/fc1/kernel: checkpoint \(2, 32, 64\), "
                                       r"target config \(2, 32, 128\)"):
    adapt_to(plain, wider)
  other_eps = load_config(BASE_CONFIG, {**{f"model.{k}": v for k, v in plain_config.model.items()},
                                        "model.eps": 1e-5})
  with pytest.raises(ValueError, match="model.eps"):
    adapt_to(plain, other_eps, plain_config)


# ------------------------------------------------------------- checkpoints


def test_converted_checkpoint_round_trip(tmp_path, imported):
  config, params = imported
  out = write_generator_checkpoint(str(tmp_path / "wan"), config, params)
  for which in ("ema_params", "gen_params"):
    loaded_config, loaded = loading.load_generator_params(out, which)
    assert loaded_config.model.to_dict() == json.loads(json.dumps(config.model.to_dict()))
    a, b = leaves(loaded), leaves(params)
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  with pytest.raises(FileExistsError, match="not empty"):
    write_generator_checkpoint(out, config, params)


def test_convert_weights_command_line(tmp_path):
  script = os.path.join(ROOT, "launch", "convert_weights.py")
  out = tmp_path / "aapt"
  ok = subprocess.run([sys.executable, script, "--from=diffusers", f"--src={DIFFUSERS_DIR}",
                       f"--out={out}", f"--config={os.path.join(ROOT, 'configs', 'tiny.py')}",
                       "--config.model.text_dim=32", "--config.model.num_layers=2"],
                      capture_output=True, text=True, cwd=ROOT)
  assert ok.returncode == 0, ok.stderr
  assert "params loaded: 42 tensors" in ok.stdout
  assert "newly initialised: 5 tensors" in ok.stdout and "keys ignored: 0" in ok.stdout
  config, params = loading.load_generator_params(str(out))
  assert config.model.num_actions == 5
  assert params["patch_embedding"]["kernel"].shape == (1, 2, 2, 8, 32)
  bad = subprocess.run([sys.executable, script, f"--src={tmp_path / 'nope'}", f"--out={out}2"],
                       capture_output=True, text=True, cwd=ROOT)
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines() == [
      f"convert_weights: error: checkpoint folder not found: {tmp_path / 'nope'}"]


# ------------------------------------------------------------------ errors


def test_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="checkpoint folder not found"):
    load_transformer(str(tmp_path / "nope"))
  folder = copy_fixture(tmp_path)
  os.remove(folder / WEIGHTS)
  with pytest.raises(FileNotFoundError, match="neither diffusion_pytorch_model.safetensors"):
    load_transformer(str(folder))
  os.remove(folder / "config.json")
  with pytest.raises(FileNotFoundError, match="no config.json"):
    load_transformer(str(folder))


def test_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path):
  folder = copy_fixture(tmp_path)
  edit_config(folder, ffn_dim=128)
  with pytest.raises(ValueError, match=r"tensor blocks.0.ffn.net.0.proj.bias: shape \(64,\) in "
                                       r"the checkpoint, but .*config.json implies \(128,\)"):
    load_transformer(str(folder))


def test_missing_and_unknown_tensors_are_listed(tmp_path):
  folder = copy_fixture(tmp_path)
  tensors = load_file(folder / WEIGHTS)
  del tensors["blocks.1.attn2.norm_k.weight"]
  tensors["blocks.0.attn1.extra.weight"] = np.zeros(3, np.float32)
  save_file(tensors, folder / WEIGHTS)
  with pytest.raises(ValueError) as e:
    load_transformer(str(folder))
  assert "missing (1): blocks.1.attn2.norm_k.weight" in str(e.value)
  assert "unknown (1): blocks.0.attn1.extra.weight" in str(e.value)


@pytest.mark.parametrize("changes,match", [
    ({"_class_name": "AutoencoderKLWan"}, "describes a Wan VAE"),
    ({"_class_name": "FluxTransformer2DModel"}, "is not a Wan2.1 transformer"),
    ({"image_dim": 1280}, "image-to-video"),
    ({"out_channels": 8}, "only text-to-video"),
    ({"num_layers": None}, "field 'num_layers' is missing"),
])
def test_other_families_and_bad_configs(tmp_path, changes, match):
  folder = copy_fixture(tmp_path)
  edit_config(folder, **changes)
  with pytest.raises(ValueError, match=match):
    load_transformer(str(folder))


def test_original_layout_errors_use_its_own_checks(tmp_path):
  folder = copy_fixture(tmp_path, ORIGINAL_DIR)
  edit_config(folder, model_type="i2v")
  with pytest.raises(ValueError, match="only text-to-video"):
    load_transformer(str(folder))
