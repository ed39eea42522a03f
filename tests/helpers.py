"""Shared test helpers: the tiny model, its params and compiled functions."""
import functools
import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp

from aapt_jax import load_config
from aapt_jax.models import Conditioning, build_generator, init_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_benchmark(name, folder="benchmarks"):
  """The module <folder>/<name>.py (benchmarks and launch scripts are scripts,
  not a package)."""
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(ROOT, folder, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def config_path(name):
  return os.path.join(ROOT, "configs", name)


@functools.cache
def tiny(overrides=()):
  """(config, model, unboxed params) for configs/tiny.py with dotted overrides (pairs)."""
  config = load_config(config_path("tiny.py"), dict(overrides))
  model = build_generator(config)
  params = nn.meta.unbox(init_params(model, jax.random.key(0)))
  return config, model, params


@functools.cache
def compiled(model):
  """(call, step) jitted once per model."""
  call = jax.jit(lambda v, x, t, c, cache=None: model.apply(v, x, t, c, cache=cache))
  step = jax.jit(lambda v, x, t, c, cache, commit=True: model.apply(
      v, x, t, c, cache, commit=commit, method="step"), static_argnames="commit")
  return call, step


def random_inputs(spec, batch, frames, seed=0, with_text=True):
  """Latents, per-frame timesteps (t_0 = 0), and a Conditioning with text, a
  text mask, actions and controls all in play; previous = shifted latents."""
  ks = jax.random.split(jax.random.key(seed), 6)
  h, w = spec.latent_size
  latents = jax.random.normal(ks[0], (batch, frames, h, w, spec.latent_channels))
  timesteps = jax.random.uniform(ks[1], (batch, frames)).at[:, 0].set(0.0)
  previous = jnp.concatenate([jnp.zeros_like(latents[:, :1]), latents[:, :-1]], axis=1)
  text = text_mask = None
  if with_text and spec.text_dim:
    text = jax.random.normal(ks[2], (batch, 5, spec.text_dim))
    text_mask = jnp.arange(5)[None, :] < jnp.array([3, 5] * batch)[:batch, None]
  cond = Conditioning(
      previous=previous, text=text, text_mask=text_mask,
      actions=jax.random.randint(ks[3], (batch, frames), 0, max(spec.num_actions, 1))
      if spec.num_actions else None,
      controls=jax.random.normal(ks[4], (batch, frames, spec.control_dim))
      if spec.control_dim else None)
  return latents, timesteps, cond


def frame(cond, i):
  """The Conditioning of frame i alone (T = 1)."""
  pick = lambda a: None if a is None else a[:, i:i + 1]
  return cond.replace(previous=pick(cond.previous), actions=pick(cond.actions),
                      controls=pick(cond.controls))


def step_all(step, params, cache, latents, timesteps, cond):
  """Runs `step` over every frame; returns (velocities [B, T, ...], cache)."""
  outs = []
  for i in range(latents.shape[1]):
    out, cache = step(params, latents[:, i:i + 1], timesteps[:, i:i + 1], frame(cond, i), cache)
    outs.append(out)
  return jnp.concatenate(outs, axis=1), cache
