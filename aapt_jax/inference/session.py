"""Streaming sessions: a world you steer one latent frame at a time.

`StreamingModel` is what is loaded once (the generator and decoder params, the
world's metadata, ONE jitted step function); `StreamingSession` is one stream
over it (its KV cache, decoder cache, previous frame, noise key), so several
sessions (browser tabs) share one compile. DESIGN section 5 "Streaming":

    session = StreamingSession.load("runs/atari")       # or an export dir; None = assets/
    frames = session.start()                            # uint8 [k, H, W, 3]: the first frame
    frames = session.step(action_id)                    # uint8 [k, H, W, 3], host numpy
    session.reset()                                     # back to right after start()

Each `step` is one call of the compiled function: the generator's frame (one
forward for a one-step model, an Euler sampler with peek steps for a stage-1
diffusion model) and its decode, with the whole stream state donated, so the
cache is updated in place and shapes never change: no recompilation and
constant memory however long the stream runs.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from aapt_jax.inference import export as export_lib
from aapt_jax.inference.decoders import build_decoder, uses_vae
from aapt_jax.models import (Conditioning, Generator, KVCache, abstract_params, build_generator,
                             with_text_kv)
from aapt_jax.objectives.flow_matching import shift_timesteps

DIFFUSION_SAMPLER_STEPS = 16  # Euler steps per frame for a stage-1 (diffusion) model


@flax.struct.dataclass
class StreamState:
  """Everything a stream carries from one step to the next (fixed shapes)."""
  index: jax.Array         # int32 []: the latent frame the next step makes (0 = prefill)
  latent: jax.Array        # [1, 1, h, w, C]: the last frame (before the prefill: latent 0)
  cache: KVCache
  decode_cache: Any


def sampler_grid(steps: int, shift: float) -> list[float]:
  """t_0 = 0 < t_1 < ... < t_K = 1 on the shifted schedule."""
  if steps < 1:
    raise ValueError(f"sampler steps must be >= 1, got {steps}")
  return [float(g) for g in np.asarray(shift_timesteps(np.linspace(0.0, 1.0, steps + 1), shift))]


def make_session_step(model: Generator, decoder, sampler_steps: int = 1,
                      shift: float = 1.0) -> Callable:
  """The one jitted step of a stream, generator + decode, the state donated:

  step(params, decoder_params, key, state, actions, controls, text, text_mask)
      -> (frames uint8 [k, H, W, 3], state)
  text: the prompt's TextKV (`with_text_kv`, once per prompt) or None.

  index 0 (the prefill) writes state.latent (latent 0, clean, t = 0) as the
  sink and decodes it; index i >= 1 draws eps_i = N(fold_in(key, i)) and makes
  x_i = eps_i - v(eps_i, t=1 | x_{i-1}) (K = 1), or takes K - 1 Euler peek
  steps (cache untouched) down the shifted grid and commits at t_1.
  """
  grid = sampler_grid(sampler_steps, shift)

  def step(params, decoder_params, key, state: StreamState, actions, controls, text,
           text_mask):
    first = state.index == 0
    given = state.latent                                          # [1, 1, h, w, C]
    cond = Conditioning(previous=jnp.where(first, 0.0, given), text_kv=text,
                        text_mask=text_mask, actions=actions, controls=controls)
    ones = jnp.ones(given.shape[:2])                               # [1, 1]
    x = jax.random.normal(jax.random.fold_in(key, state.index), given.shape, given.dtype)
    for k in range(sampler_steps, 1, -1):  # peek steps: the cache is not written
      v, _ = model.apply({"params": params}, x, grid[k] * ones, cond, state.cache,
                         commit=False, method="step")
      x = x + (grid[k - 1] - grid[k]) * v
    t = jnp.where(first, 0.0, grid[1]) * ones
    v, cache = model.apply({"params": params}, jnp.where(first, given, x), t, cond,
                           state.cache, method="step")
    latent = jnp.where(first, given, x - grid[1] * v)
    frames, decode_cache = decoder.decode_step(decoder_params, latent, state.decode_cache)
    pixels = jnp.clip(jnp.round((frames[0] + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
    return pixels, StreamState(index=state.index + 1, latent=latent, cache=cache,
                               decode_cache=decode_cache)

  return jax.jit(step, donate_argnums=3)


def _world(config):
  """The config's simulator (Atari), for action names, fps and start frames; or None."""
  if config.data.world != "atari":
    return None
  from aapt_jax.data.worlds.atari import AtariWorld
  return AtariWorld(config.data.game, size=config.data.frame_size,
                    frame_skip=config.data.frame_skip)


def _cast(tree, dtype):
  return jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)


def load_checkpoint(checkpoint: str | None):
  """(config, params, vae params, start frame, source) from an export directory,
  a run/stage/step directory, or None (the shipped export under assets/)."""
  if checkpoint is None:
    if not export_lib.is_export(export_lib.SHIPPED_EXPORT):
      raise FileNotFoundError(
          f"no checkpoint given and no shipped export at {export_lib.SHIPPED_EXPORT} (none "
          "ships yet): pass a run, step or export directory (train one with launch/train.py, "
          "export it with launch/export.py)")
    checkpoint = export_lib.SHIPPED_EXPORT
  path = os.path.abspath(os.path.expanduser(checkpoint))
  if export_lib.is_export(path):
    config, params, vae_params, start_frame, _ = export_lib.read_export(path)
    return config, params, vae_params, start_frame, path
  from aapt_jax.checkpointing import load_generator_params, resolve_step_dir
  step_dir = resolve_step_dir(path)
  config, params = load_generator_params(step_dir)
  if config.get("stage") == "vae":
    raise ValueError(f"checkpoint {step_dir} is a VAE (stage 'vae'), not a world model: "
                     "train a generator on its latents (its vae.checkpoint) and play that")
  vae_params = load_run_vae(config, step_dir) if uses_vae(config) else None
  return config, params, vae_params, None, step_dir


def load_run_vae(config, where: str):
  """The VAE params a VAE-latent run decodes with: `vae.checkpoint`'s, checked
  to be the VAE the run's config describes."""
  path = config.vae.get("checkpoint", "")
  if not path:
    raise ValueError(f"checkpoint {where} works in VAE latents but its config names no "
                     "vae.checkpoint (the stage-'vae' run whose encoder made its latents)")
  from aapt_jax.data.encode import load_vae
  from aapt_jax.checkpointing import config_diff, config_to_dict
  vae_config, _, vae_params = load_vae(path)
  fields = ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "temperal_downsample")
  pick = lambda c: {"vae": {k: config_to_dict(c)["vae"][k] for k in fields},
                    "model": {"latent_size": config_to_dict(c)["model"]["latent_size"]}}
  diff = config_diff(pick(vae_config), pick(config), sections=("vae", "model"))
  if diff:
    raise ValueError(f"vae.checkpoint={path} is another VAE than the one {where} was "
                     f"trained with: {'; '.join(diff)}")
  return vae_params


@dataclasses.dataclass
class StreamingModel:
  """A loaded world model: params, decoder, world metadata and the compiled step.

  Attributes: `num_actions` (the actions a player may send: the world's action
  set when the config names a world, else model.num_actions; 0 = continuous
  controls only), `control_dim`, `action_names` (or None), `frame_size` (H, W),
  `frames_per_latent` (k), `fps` (the world's frame rate, or None),
  `sampler_steps`, `source` (where it was loaded from).
  """
  config: Any
  params: Any
  decoder_params: Any = None
  start_frame: np.ndarray | None = None
  sampler_steps: int = 0
  source: str = "random init"

  def __post_init__(self):
    c = self.config
    self.model = build_generator(c)
    self.decoder = build_decoder(c)
    export_lib.check_params(self.params, abstract_params(c), f"the params of {self.source}")
    self.params = _cast(self.params, self.model.spec.params_dtype)
    if uses_vae(c):
      if self.decoder_params is None:
        raise ValueError(f"{self.source}: this config decodes with the video VAE "
                         "(data.space_to_depth=0) but no VAE params were given")
      export_lib.check_params(self.decoder_params, abstract_params(c, "vae"),
                              f"the VAE params of {self.source}")
      self.decoder_params = _cast(self.decoder_params, jnp.float32)
    if self.sampler_steps == 0:  # auto: a stage-1 model is a diffusion model
      self.sampler_steps = DIFFUSION_SAMPLER_STEPS if c.stage == "diffusion" else 1
    self.world = _world(c)
    s = self.model.spec
    self.action_names = list(self.world.action_names) if self.world else None
    if self.world and s.num_actions and self.world.num_actions > s.num_actions:
      raise ValueError(f"{self.world.game} has {self.world.num_actions} actions but "
                       f"model.num_actions={s.num_actions}")
    self.num_actions = (self.world.num_actions if self.world and s.num_actions
                        else s.num_actions)
    self.noop = self.world.noop if self.world else 0
    self.control_dim = s.control_dim
    self.frame_size = tuple(self.decoder.frame_size)
    self.frames_per_latent = self.decoder.frames_per_latent
    self.fps = self.world.fps if self.world else None
    self.step_fn = make_session_step(self.model, self.decoder, self.sampler_steps,
                                     float(c.diffusion.timestep_shift))

  @classmethod
  def load(cls, checkpoint: str | None = None, *, sampler_steps: int = 0) -> "StreamingModel":
    config, params, vae_params, start_frame, source = load_checkpoint(checkpoint)
    return cls(config, params, vae_params, start_frame, sampler_steps, source)

  def check_config(self, config) -> None:
    """ValueError naming the fields where `config` (say a --config given with a
    --checkpoint) describes another model or world than the loaded one."""
    from aapt_jax.checkpointing import config_diff, config_to_dict
    fields = ("world", "game", "frame_size", "space_to_depth")
    pick = lambda c: {"model": config_to_dict(c)["model"],
                      "data": {k: config_to_dict(c)["data"].get(k) for k in fields}}
    diff = config_diff(pick(self.config), pick(config), sections=("model", "data"))
    if diff:
      raise ValueError(f"{self.source} was trained with a different config: "
                       f"{'; '.join(diff[:4])}{' ...' if len(diff) > 4 else ''} (drop "
                       "--config to use the checkpoint's own)")

  def default_start_frame(self, seed: int | None = None) -> np.ndarray:
    """The export's start frame (seed None, when it has one), else the world's
    first frame after a reset with `seed` (0 when None)."""
    if seed is None and self.start_frame is not None:
      return self.start_frame
    if self.world is None:
      raise ValueError("no start frame: this model has no world (config data.world) and "
                       "its checkpoint stores none; pass first_frame, a uint8 [H, W, 3] image")
    return self.world.reset(0 if seed is None else seed)


class StreamingSession:
  """One stream of a `StreamingModel` (see the module docstring)."""

  def __init__(self, model: StreamingModel, seed: int = 0):
    self.model = model
    self.seed = int(seed)
    self._state: StreamState | None = None
    self._start_state: StreamState | None = None
    self._first_frames: np.ndarray | None = None
    self._text = (None, None)

  @classmethod
  def load(cls, checkpoint: str | None = None, *, sampler_steps: int = 0,
           seed: int = 0) -> "StreamingSession":
    """A session over the generator in `checkpoint`: a run, stage or step
    directory (its EMA params), an export directory, or None (the shipped export)."""
    return cls(StreamingModel.load(checkpoint, sampler_steps=sampler_steps), seed)

  num_actions = property(lambda self: self.model.num_actions)
  control_dim = property(lambda self: self.model.control_dim)
  action_names = property(lambda self: self.model.action_names)
  frame_size = property(lambda self: self.model.frame_size)
  fps = property(lambda self: self.model.fps)

  @property
  def started(self) -> bool:
    return self._state is not None

  @property
  def frame_index(self) -> int:
    """Latent frames made so far (1 right after start)."""
    return 0 if self._state is None else int(self._state.index)

  # ----------------------------------------------------------------- inputs
  def _text_inputs(self, text):
    spec = self.model.model.spec
    if text is None:
      return None, None
    if isinstance(text, str):
      raise ValueError("text strings need a text encoder, which this release does not have "
                       f"yet: pass an embedding [L, {spec.text_dim}]")
    if not spec.text_dim:
      raise ValueError("text given but this model takes no text (model.text_dim=0)")
    emb = np.asarray(text, np.float32)
    if emb.ndim != 2 or emb.shape[1] != spec.text_dim or not emb.shape[0]:
      raise ValueError(f"text embedding must be [L, {spec.text_dim}], got {emb.shape}")
    cond = with_text_kv(self.model.model, self.model.params,
                        Conditioning(text=jnp.asarray(emb)[None]))
    return cond.text_kv, jnp.ones((1, emb.shape[0]), bool)  # text keys/values once per prompt

  def _control_inputs(self, controls):
    """(actions int32 [1, 1] or None, controls float32 [1, 1, A] or None): fixed
    structure per model (-1 / zeros when not given), so one compile serves all."""
    spec = self.model.model.spec
    if isinstance(controls, tuple):  # (action id or None, control vector or None): both kinds
      if len(controls) != 2:
        raise ValueError(f"controls as a tuple must be (action, vector), got {controls!r}")
      given = [c for c in controls if c is not None]
    else:
      given = [] if controls is None else [controls]
    action, vector = -1, None
    for c in given:
      if isinstance(c, (int, np.integer)) and not isinstance(c, bool):
        if not self.num_actions:
          raise ValueError("this model takes control vectors, not action ids "
                           f"(model.control_dim={self.control_dim})")
        if not 0 <= int(c) < self.num_actions:
          names = f" ({', '.join(self.action_names)})" if self.action_names else ""
          raise ValueError(f"invalid action {int(c)}: valid ids are "
                           f"0..{self.num_actions - 1}{names}")
        action = int(c)
      else:
        vector = np.asarray(c, np.float32)
        if not self.control_dim:
          raise ValueError(f"invalid action {c!r}: this model takes an action id "
                           f"0..{self.num_actions - 1}")
        if vector.shape != (self.control_dim,) or not np.all(np.isfinite(vector)):
          raise ValueError(f"control vector must be {self.control_dim} finite floats, got "
                           f"shape {vector.shape}")
    actions = jnp.full((1, 1), action, jnp.int32) if spec.num_actions else None
    if spec.control_dim:
      vector = np.zeros(self.control_dim, np.float32) if vector is None else vector
      vector = jnp.asarray(vector)[None, None]
    return actions, vector

  def _run(self, controls, text) -> np.ndarray:
    actions, vector = controls
    m = self.model
    frames, self._state = m.step_fn(m.params, m.decoder_params, self._key, self._state,
                                    actions, vector, *text)
    return np.asarray(frames)

  # -------------------------------------------------------------------- API
  def start(self, first_frame: np.ndarray | None = None, text=None,
            seed: int | None = None) -> np.ndarray:
    """Starts (or restarts) the stream from `first_frame` (uint8 [H, W, 3];
    None = the export's start frame or the world's first frame), with `text`
    (an embedding [L, text_dim]; strings need a text encoder). `seed` sets the
    noise (default: the session's seed). Returns the decoded first frame(s)
    uint8 [k, H, W, 3]."""
    m = self.model
    if first_frame is None:
      first_frame = m.default_start_frame()
    first_frame = np.asarray(first_frame)
    if first_frame.dtype != np.uint8 or first_frame.shape != (*m.frame_size, 3):
      raise ValueError(f"first_frame must be uint8 [{m.frame_size[0]}, {m.frame_size[1]}, 3], "
                       f"got {first_frame.dtype} {first_frame.shape}")
    self._text = self._text_inputs(text)
    if seed is not None:
      self.seed = int(seed)
    self._key = jax.random.key(self.seed)
    latent = jnp.asarray(m.decoder.encode_first(m.decoder_params, first_frame), jnp.float32)
    self._state = StreamState(index=jnp.zeros((), jnp.int32), latent=latent,
                              cache=m.model.init_cache(1),
                              decode_cache=m.decoder.init_decode_cache(1))
    noop = m.noop if m.model.spec.num_actions else None
    self._first_frames = self._run(self._control_inputs(noop), self._text)
    self._start_state = jax.tree.map(jnp.copy, self._state)  # step donates the live one
    return self._first_frames

  def step(self, controls=None) -> np.ndarray:
    """The next latent frame's video frames, uint8 [k, H, W, 3] (host numpy),
    showing the effect of `controls`: an action id (int), a control vector, or
    (for a model taking both) the tuple (action id, vector); None = no action.
    An invalid action raises ValueError."""
    if self._state is None:
      raise ValueError("call start() before step()")
    return self._run(self._control_inputs(controls), self._text)

  def reset(self) -> np.ndarray:
    """Back to the state right after `start` (same first frame, text and noise:
    the same actions replay the same frames). Returns the first frame(s)."""
    if self._start_state is None:
      raise ValueError("call start() before reset()")
    self._state = jax.tree.map(jnp.copy, self._start_state)
    return self._first_frames
