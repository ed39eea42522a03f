"""data/encode.py and `vae.checkpoint`: pixel records -> VAE-latent records
equal to encoding each clip and episode directly, actions per latent frame,
measured latent statistics, and the run's VAE found through its config."""
import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aapt_jax import checkpointing, load_config
from aapt_jax.data import encode, prepare, records
from aapt_jax.loading import load_run_vae, load_trained_vae
from aapt_jax.models import build_vae
from aapt_jax.models.vae import init_params as init_vae_params
from aapt_jax.training.state import TrainState
from helpers import ROOT, config_path

# 8x8 frames -> 4x4x4 latents, r = 2
VAE_TINY = {"vae.base_dim": 8, "vae.z_dim": 4, "vae.dim_mult": (1, 2),
            "vae.num_res_blocks": 1, "vae.temperal_downsample": (True,),
            "model.latent_size": (4, 4), "model.latent_channels": 4,
            "data.space_to_depth": 0, "data.world": "atari", "data.game": "Pong",
            "data.frame_size": 8, "vae.latents_mean": (0.0,) * 4, "vae.latents_std": (1.0,) * 4}


def _config(**overrides):
  return load_config(config_path("tiny.py"), {**VAE_TINY, **overrides})


def _save_vae(directory, stage="vae", seed=0, **overrides):
  """A stage checkpoint holding a randomly initialised VAE (what stage 'vae' saves)."""
  config = _config(stage=stage, **overrides)
  params = nn.meta.unbox(init_vae_params(build_vae(config), jax.random.key(seed)))["params"]
  state = TrainState(step=jnp.zeros((), jnp.int32), gen_params=params, gen_opt=(),
                     ema_params=params, rng=jax.random.key_data(jax.random.key(0)),
                     skipped=jnp.zeros((), jnp.int32))
  with checkpointing.Checkpointer(str(directory / stage / "checkpoints"),
                                  async_save=False) as ckpt:
    ckpt.save(1, state, config=config)
  return config, params


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("encode")
  prepare.prepare_atari(str(tmp / "pixels"), game="Pong", episodes=2, frames_per_episode=24,
                        clip_frames=10, clip_stride=10, size=8, seed=3, progress=False)
  config, params = _save_vae(tmp / "vae_run")
  summary = encode.encode_records(str(tmp / "pixels"), str(tmp / "latents"),
                                  vae_checkpoint=str(tmp / "vae_run"), batch_size=3,
                                  progress=False)
  return dict(tmp=tmp, config=config, params=params, summary=summary)


def _direct(config, params, video):
  """The VAE's mean latents of one uint8 video [T, H, W, 3], T = 1 + k*r."""
  mean, _ = build_vae(config).apply({"params": params},
                                    jnp.asarray(video, jnp.float32)[None] / 127.5 - 1.0,
                                    method="encode")
  return np.asarray(mean[0])


def test_latent_records_equal_encoding_each_clip_and_episode(encoded):
  tmp, config, params = encoded["tmp"], encoded["config"], encoded["params"]
  for kind in ("clips", "episodes"):
    pixels = records.RecordSource(records.resolve_paths(str(tmp / "pixels" / f"{kind}-*")))
    latents = records.RecordSource(records.resolve_paths(str(tmp / "latents" / f"{kind}-*")))
    assert len(pixels) == len(latents) > 0
    for i in range(len(pixels)):
      p, q = pixels[i], latents[i]
      keep = 1 + (len(p["video"]) - 1) // 2 * 2  # 10 -> 9 frames, 24 -> 23
      assert "video" not in q and q["temporal_factor"] == 2
      assert q["latents"].shape == (1 + (keep - 1) // 2, 4, 4, 4)
      # clips in batches of 3 (the last one padded), episodes padded to a bucket:
      # both exactly the direct encoding
      np.testing.assert_allclose(q["latents"], _direct(config, params, p["video"][:keep]),
                                 atol=2e-5)
      np.testing.assert_array_equal(q["actions"], encode.latent_actions(p["actions"][:keep], 2))
      assert (q["episode"], q["start"], q["seed"]) == (p["episode"], p["start"], p["seed"])


def test_a_cropped_clip_starts_from_its_first_frame_encoded_as_an_image(encoded):
  """Inference starts from one image encoded alone; a training clip (or a
  stage-3 rollout start) cropped at latent j must start the same way: its
  latent 0 is video frame r·j (the last frame latent j covers) encoded as a
  one-frame video, and its later latents are the record's j + 1, ...."""
  from aapt_jax.data import pipeline
  tmp, config, params = encoded["tmp"], encoded["config"], encoded["params"]
  r, n = 2, 3
  for kind in ("clips", "episodes"):
    pixels = records.RecordSource(records.resolve_paths(str(tmp / "pixels" / f"{kind}-*")))
    latents = records.RecordSource(records.resolve_paths(str(tmp / "latents" / f"{kind}-*")))
    p, q = pixels[0], latents[0]
    starts = set()
    for seed in range(6):
      start = int(np.random.default_rng(seed).integers(0, len(q["latents"]) - n + 1))
      clip = pipeline.crop_clip(q, np.random.default_rng(seed), n)
      image = _direct(config, params, p["video"][r * start:r * start + 1])[0]
      np.testing.assert_allclose(clip["latents"][0], image, atol=2e-5)
      np.testing.assert_array_equal(clip["latents"][1:], q["latents"][start + 1:start + n])
      starts.add(start)
    assert starts - {0}, kind


def test_actions_per_latent_frame_and_measured_statistics(encoded):
  a = np.arange(9, dtype=np.int32) + 10
  np.testing.assert_array_equal(encode.latent_actions(a, 2), [10, 11, 13, 15, 17])
  np.testing.assert_array_equal(encode.latent_actions(a, 1), a)
  tmp, summary = encoded["tmp"], encoded["summary"]
  clips = records.RecordSource(records.resolve_paths(str(tmp / "latents" / "clips-*")))
  every = np.concatenate([clips[i]["latents"].reshape(-1, 4) for i in range(len(clips))])
  np.testing.assert_allclose(summary["latents_mean"], every.mean(0), atol=1e-4)
  np.testing.assert_allclose(summary["latents_std"], every.std(0), atol=1e-4)
  with open(tmp / "latents" / "metadata.json") as f:
    meta = json.load(f)
  assert meta["temporal_factor"] == 2 and meta["counts"]["clips"] == len(clips)
  assert meta["record_kind"] == "latents" and meta["latents_mean"] == summary["latents_mean"]


def test_controls_are_kept_per_latent_frame(encoded, tmp_path):
  """A camera or robot dataset's controls [T, A] go per latent frame like actions."""
  rng = np.random.default_rng(0)
  pixels, out = tmp_path / "pixels", tmp_path / "latents"
  examples = [{"video": rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8), "fps": 8.0,
               "controls": rng.standard_normal((10, 3)).astype(np.float32)} for _ in range(2)]
  records.write_records(str(pixels / "clips-00000-of-00001.array_record"), examples)
  records.write_records(str(pixels / "episodes-00000-of-00001.array_record"), examples)
  (pixels / "metadata.json").write_text(json.dumps({"size": [8, 8]}))
  encode.encode_records(str(pixels), str(out), vae_checkpoint=str(encoded["tmp"] / "vae_run"),
                        batch_size=3, progress=False)
  for kind in ("clips", "episodes"):
    latents = records.RecordSource(records.resolve_paths(str(out / f"{kind}-*")), validate=True)
    for example, q in zip(examples, latents):
      assert q["controls"].dtype == np.float32 and q["controls"].shape == (5, 3)
      np.testing.assert_array_equal(q["controls"], example["controls"][[0, 1, 3, 5, 7]])


def test_a_run_finds_its_vae_through_vae_checkpoint(encoded, tmp_path):
  tmp, params = encoded["tmp"], encoded["params"]
  run_config = _config(stage="diffusion", **{"vae.checkpoint": str(tmp / "vae_run")})
  loaded = load_run_vae(run_config, "run")
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="names no vae.checkpoint"):
    load_run_vae(_config(stage="diffusion"), "run")
  other = _config(stage="diffusion", **{"vae.checkpoint": str(tmp / "vae_run"),
                                         "vae.base_dim": 16})
  with pytest.raises(ValueError, match=r"another VAE .*vae.base_dim: checkpoint=8, config=16"):
    load_run_vae(other, "run")


def test_bad_inputs_are_named(encoded, tmp_path):
  tmp = encoded["tmp"]
  _save_vae(tmp_path / "dit_run", stage="diffusion")
  with pytest.raises(ValueError, match="is not a VAE checkpoint"):
    encode.encode_records(str(tmp / "pixels"), str(tmp_path / "x"),
                          vae_checkpoint=str(tmp_path / "dit_run"))
  with pytest.raises(FileNotFoundError, match="not a prepared dataset"):
    encode.encode_records(str(tmp_path), str(tmp_path / "y"), vae_checkpoint=str(tmp / "vae_run"))
  with pytest.raises(ValueError, match="already holds records"):
    encode.encode_records(str(tmp / "pixels"), str(tmp / "latents"),
                          vae_checkpoint=str(tmp / "vae_run"))
  # the CLI checks the checkpoint before recording anything
  out = subprocess.run([sys.executable, f"{ROOT}/launch/prepare_data.py", "--episodes=1",
                        "--size=8", f"--out={tmp_path / 'cli'}",
                        f"--vae_checkpoint={tmp_path / 'dit_run'}"],
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 2 and "is not a VAE checkpoint" in out.stderr
  assert len(out.stderr.strip().splitlines()) == 1
  assert not (tmp_path / "cli" / "pixels").exists()


def test_a_vae_run_exports_and_the_export_stands_in_for_it(encoded, tmp_path):
  """launch/export.py of a stage-"vae" run writes a float32 VAE export that
  load_trained_vae, vae.checkpoint and encode_records read as the run itself; the
  generator readers name it instead of failing deep inside."""
  from aapt_jax import export as export_lib
  from aapt_jax.inference.session import StreamingModel
  tmp, params = encoded["tmp"], encoded["params"]
  out = subprocess.run([sys.executable, f"{ROOT}/launch/export.py",
                        f"--checkpoint={tmp / 'vae_run'}", f"--out={tmp_path / 'vae_export'}"],
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  assert "export: VAE" in out.stdout and "float32" in out.stdout
  config, _, loaded = load_trained_vae(str(tmp_path / "vae_export"))
  assert config.stage == "vae"
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # float32: not rounded
  run_config = _config(stage="diffusion", **{"vae.checkpoint": str(tmp_path / "vae_export")})
  assert jax.tree.structure(load_run_vae(run_config, "run")) == jax.tree.structure(params)
  encode.encode_records(str(tmp / "pixels"), str(tmp_path / "latents"),
                        vae_checkpoint=str(tmp_path / "vae_export"), progress=False)
  for kind in ("clips", "episodes"):
    a = records.RecordSource(records.resolve_paths(str(tmp / "latents" / f"{kind}-*")))
    b = records.RecordSource(records.resolve_paths(str(tmp_path / "latents" / f"{kind}-*")))
    np.testing.assert_allclose(a[0]["latents"], b[0]["latents"], atol=2e-5)  # other batching
  with pytest.raises(ValueError, match="is a VAE export"):
    export_lib.read_export(str(tmp_path / "vae_export"))
  with pytest.raises(ValueError, match=r"is a VAE \(stage 'vae'\), not a world model"):
    StreamingModel.load(str(tmp / "vae_run"))
