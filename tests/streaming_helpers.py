"""Shared by the session, server and browser tests: tiny pixel-space worlds
(random weights) as StreamingModels and as inference exports."""
import functools

import flax.linen as nn
import jax

from aapt_jax import load_config
from aapt_jax.export import write_export
from aapt_jax.inference.session import StreamingModel
from aapt_jax.models import build_generator, build_vae, init_params, init_vae_params
from helpers import config_path

# A tiny Atari (Pong) world: 16x16 frames -> 4x4x48 latents, a one-step model.
TINY_ATARI = (("stage", "consistency"), ("model.latent_channels", 48), ("model.text_dim", 0),
              ("model.control_dim", 0), ("model.num_actions", 18), ("data.world", "atari"),
              ("data.game", "Pong"), ("data.frame_size", 16), ("data.space_to_depth", 4))
# A tiny Doom-like camera world: 16x16 frames, control_dim 3 (yaw, forward,
# strafe), no actions.
TINY_DOOM = (("stage", "consistency"), ("model.latent_channels", 48), ("model.text_dim", 0),
             ("model.control_dim", 3), ("model.num_actions", 0), ("data.world", "doom"),
             ("data.game", "freedoom2"), ("data.frame_size", 16), ("data.frame_skip", 2),
             ("data.space_to_depth", 4))


@functools.cache
def tiny_world(overrides=TINY_ATARI, seed=0):
  """(config, bare params) of a randomly initialised tiny model."""
  config = load_config(config_path("tiny.py"), dict(overrides))
  params = nn.meta.unbox(init_params(build_generator(config), jax.random.key(seed)))["params"]
  return config, params


@functools.cache
def tiny_vae_params(overrides, seed=1):
  """The bare params of a randomly initialised VAE of the config (a VAE-latent world)."""
  config, _ = tiny_world(overrides)
  return nn.meta.unbox(init_vae_params(build_vae(config), jax.random.key(seed)))["params"]


@functools.cache
def tiny_streaming_model(overrides=TINY_ATARI, sampler_steps=0):
  config, params = tiny_world(overrides)
  vae_params = tiny_vae_params(overrides) if not config.data.space_to_depth else None
  return StreamingModel(config, params, vae_params, sampler_steps=sampler_steps)


def write_tiny_export(out_dir, overrides=TINY_ATARI):
  """Writes the tiny world as an export (with the emulator's first frame); returns its path."""
  config, params = tiny_world(overrides)
  model = tiny_streaming_model(overrides)
  write_export(str(out_dir), config, params, start_frame=model.default_start_frame(0),
               vae_params=model.decoder_params, source="tests")
  return str(out_dir)
