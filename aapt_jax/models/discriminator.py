"""The discriminator: the generator's backbone (initialised from the stage-1
generator) plus APT-style logit heads — at several depths, a learnable query
cross-attends to each frame's tokens — giving one logit per latent frame.

The frame goes where the noise went (the first input channels), the recycled
slot holds D's own previous input frame, and every frame carries its
timestep. D judges clean frames at t = 0 (stage 3's default); with
`adversarial.disc_noise_input` the frames are first noised at their timestep
(x_t = (1 - t) x + t eps) and the recycled slot holds the noised previous
frame, so no clean frame reaches D.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from aapt_jax.models.generator import Conditioning, Generator
from aapt_jax.models.layers import Dense, LayerNorm32, logical
from aapt_jax.models.spec import ModelSpec
from aapt_jax.objectives.flow_matching import interpolate
from aapt_jax.parallel import RESIDUAL


class LogitHead(nn.Module):
  """Per-frame logit from one depth's tokens [B, T, P, D] -> [B, T].

  Its activations are constrained like the residual stream (sharded over the
  batch only): left free, the partitioner follows the fsdp-sharded kernels
  and replicates the whole [B, T, P, D] input on every device.
  """
  spec: ModelSpec

  @nn.compact
  def __call__(self, x):
    s = self.spec
    kw = dict(dtype=s.compute_dtype, param_dtype=s.params_dtype)
    x = nn.with_logical_constraint(x, RESIDUAL)
    h = LayerNorm32(eps=s.eps, affine=True, name="norm")(x).astype(s.compute_dtype)
    h = nn.with_logical_constraint(h, RESIDUAL)
    query = self.param("query", logical(nn.initializers.normal(s.dim ** -0.5), ("embed",)),
                       (s.dim,), s.params_dtype)
    keys = nn.with_logical_constraint(Dense(s.dim, ("embed", "embed_out"), name="to_k", **kw)(h),
                                      RESIDUAL)
    values = nn.with_logical_constraint(
        Dense(s.dim, ("embed", "embed_out"), name="to_v", **kw)(h), RESIDUAL)
    scores = jnp.einsum("btpd,d->btp", keys.astype(jnp.float32),
                        query.astype(jnp.float32)) * s.dim ** -0.5
    pooled = jnp.einsum("btp,btpd->btd", jax.nn.softmax(scores, axis=-1),
                        values.astype(jnp.float32))
    pooled = nn.silu(Dense(s.dim, ("embed", "embed_out"), name="mlp", **kw)(pooled))
    return Dense(1, ("embed", "logit"), name="out", **kw)(pooled)[..., 0].astype(jnp.float32)


class Discriminator(nn.Module):
  spec: ModelSpec
  head_layers: tuple[int, ...]   # block indices whose outputs the heads read
  noise_input: bool = False      # adversarial.disc_noise_input

  def setup(self):
    self.backbone = Generator(self.spec)
    self.heads = [LogitHead(self.spec, name=f"head_{i}") for i in self.head_layers]

  def __call__(self, frames, timesteps, cond: Conditioning | None = None, noise_rng=None,
               noise=None):
    """frames [B, T, h, w, C], timesteps [B, T] -> logits [B, T] (one per latent frame).

    D's input is the clip alone: the recycled slot of frame i holds D's own
    input frame i - 1 (zeros at frame 0), built here, so `cond.previous` must
    be None; it is stop_gradient (as the generator's recycled input): D's
    gradient reaches frame i through frame i's own slot. With `noise_input`,
    the frames are first noised at their timesteps, x_t = (1 - t) x + t·noise,
    with `noise` [B, T, h, w, C] when given (stage 3 passes one draw that x
    and x + σε share), else one drawn from `noise_rng`; the recycled slot
    then holds the noised frame i - 1. Without `noise_input` both are ignored.
    """
    cond = cond if cond is not None else Conditioning()
    if cond.previous is not None:
      raise ValueError("the discriminator builds its recycled slot from `frames` (its own "
                       "frame i - 1); pass cond.previous=None")
    if self.noise_input and (noise is not None or noise_rng is not None):
      if noise is None:
        noise = jax.random.normal(noise_rng, frames.shape, frames.dtype)
      frames = interpolate(frames, noise, timesteps)
    previous = jnp.concatenate([jnp.zeros_like(frames[:, :1]), frames[:, :-1]], axis=1)
    cond = cond.replace(previous=jax.lax.stop_gradient(previous))
    depths = tuple(sorted(set(self.head_layers)))
    feats = self.backbone.features(frames, timesteps, cond, layers=depths)  # [n, B, T, P, D]
    return sum(head(feats[depths.index(i)]) for i, head in zip(self.head_layers, self.heads))


def default_head_layers(num_layers: int, count: int = 3) -> tuple[int, ...]:
  """`count` depths spread over the backbone, always including the last block."""
  count = min(count, num_layers)
  return tuple(sorted({round((k + 1) * num_layers / count) - 1 for k in range(count)}))


def build_discriminator(config) -> Discriminator:
  spec = ModelSpec.from_config(config.model)
  adv = config.adversarial
  layers = tuple(adv.disc_head_layers) if len(adv.disc_head_layers) else default_head_layers(
      spec.num_layers)
  bad = [i for i in layers if not 0 <= i < spec.num_layers]
  if bad:
    raise ValueError(f"config field adversarial.disc_head_layers: {bad} outside "
                     f"0..{spec.num_layers - 1}")
  return Discriminator(spec, layers, bool(adv.disc_noise_input))


def params_from_generator(disc_params, gen_params):
  """The discriminator's params with its backbone taken from a generator's
  (what D's init from the stage-1 checkpoint does); heads keep their init."""
  backbone = dict(disc_params["backbone"])
  missing = [k for k in backbone if k not in gen_params]
  if missing:
    raise ValueError(f"generator params lack the discriminator backbone's {missing}")
  return {**disc_params, "backbone": {k: gen_params[k] for k in backbone}}


def init_discriminator_params(disc: Discriminator, rng) -> dict:
  """{"params": ...} (boxed with logical axis names) for `disc`."""
  from aapt_jax.models.generator import example_inputs
  frames, timesteps, cond = example_inputs(disc.spec)
  return disc.init(rng, frames, timesteps, cond)


__all__ = ["Discriminator", "build_discriminator", "default_head_layers",
           "init_discriminator_params", "params_from_generator"]
