"""Models: the block-causal DiT generator and its pieces."""
from __future__ import annotations

import flax.linen as nn
import jax

from aapt_jax.models.generator import (Conditioning, Generator, build_generator, init_params,
                                      layer_by_layer, scanned_params,
                                      stream_compiler_options, with_text_kv)
from aapt_jax.models.kv_cache import KVCache
from aapt_jax.models.spec import ModelSpec
from aapt_jax.models.transformer import TextKV
from aapt_jax.models.vae import VAE, build_vae
from aapt_jax.models.vae import init_params as init_vae_params

_KINDS = ("generator", "discriminator", "vae")


def abstract_params(config, kind: str = "generator"):
  """The bare parameter tree as jax.ShapeDtypeStructs, via jax.eval_shape (no allocation)."""
  if kind not in _KINDS:
    raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
  if kind == "vae":
    vae = build_vae(config)
    return nn.meta.unbox(jax.eval_shape(lambda: init_vae_params(vae, jax.random.key(0))))["params"]
  if kind == "discriminator":
    from aapt_jax.models.discriminator import build_discriminator, init_discriminator_params
    disc = build_discriminator(config)
    boxed = jax.eval_shape(lambda: init_discriminator_params(disc, jax.random.key(0)))
    return nn.meta.unbox(boxed)["params"]
  model = build_generator(config)
  boxed = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
  return nn.meta.unbox(boxed)["params"]


__all__ = ["Conditioning", "Generator", "KVCache", "ModelSpec", "TextKV", "VAE", "abstract_params",
           "build_generator", "build_vae", "init_params", "layer_by_layer", "scanned_params",
           "stream_compiler_options", "with_text_kv"]
