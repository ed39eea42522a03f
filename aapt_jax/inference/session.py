"""Streaming sessions: a world you steer one latent frame at a time.

`StreamingModel` is what is loaded once (the generator and decoder params, the
world's metadata, ONE jitted step function); `StreamingSession` is one stream
over it (its KV cache, decoder cache, previous frame, noise key), so several
sessions (browser tabs) share one compile. The contract:

    session = StreamingSession.load("runs/atari")       # a run, stage, step or export dir;
                                                        # None / "atari" = the shipped Pong
                                                        # world, "doom" the camera world
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
from typing import Any
from collections.abc import Callable, Iterator, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from aapt_jax import loading
from aapt_jax.data.worlds import world_from_config
from aapt_jax.export import check_params
from aapt_jax.inference.decoders import build_decoder, uses_vae
from aapt_jax.models import (Conditioning, Generator, KVCache, TextKV, abstract_params,
                             build_generator, layer_by_layer, scanned_params,
                             stream_compiler_options, with_text_kv)
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


def sample_frame(model: Generator, params, key, index, latent, cache: KVCache, *,
                 sampler_steps: int = 1, shift: float = 1.0, actions=None, controls=None,
                 text=None, text_mask=None):
  """The stream's sampler: latent frame `index` of a stream, a pure function.

  latent [B, 1, h, w, C] is the stream's last frame (at index 0: latent 0,
  the given first frame). index 0 (the prefill) writes `latent` clean at
  t = 0 as the sink and returns it; index i >= 1 draws
  eps_i = N(fold_in(key, i)) and returns x_i = eps_i - v(eps_i, t=1 | x_{i-1})
  (sampler_steps K = 1, 1NFE), or takes K - 1 Euler peek steps down
  `sampler_grid(K, shift)` with the cache untouched and commits at t_1.
  actions [B, 1] int32 / controls [B, 1, A] / text (an embedding [B, L, D],
  or the prompt's `TextKV` from `with_text_kv`, computed once per prompt) +
  text_mask [B, L] condition the frame (None = the model takes none).
  Returns (latent [B, 1, h, w, C], the cache with this frame's block written).
  """
  grid = sampler_grid(sampler_steps, shift)
  first = index == 0
  text_kv = text if isinstance(text, TextKV) else None
  cond = Conditioning(previous=jnp.where(first, 0.0, latent),
                      text=None if text_kv is not None else text, text_kv=text_kv,
                      text_mask=text_mask, actions=actions, controls=controls)
  ones = jnp.ones(latent.shape[:2])                                # [B, 1]
  x = jax.random.normal(jax.random.fold_in(key, index), latent.shape, latent.dtype)
  for k in range(sampler_steps, 1, -1):  # peek steps: the cache is not written
    v, _ = model.apply({"params": params}, x, grid[k] * ones, cond, cache, commit=False,
                       method="step")
    x = x + (grid[k - 1] - grid[k]) * v
  t = jnp.where(first, 0.0, grid[1]) * ones
  v, cache = model.apply({"params": params}, jnp.where(first, latent, x), t, cond, cache,
                         method="step")
  return jnp.where(first, latent, x - grid[1] * v), cache


def make_frame_fn(model: Generator, sampler_steps: int = 1, shift: float = 1.0) -> Callable:
  """`sample_frame` jitted, the cache donated (in place), compiled once:

  frame_fn(params, key, index, latent, cache, actions, controls, text, text_mask)
      -> (latent, cache)
  """
  sampler_grid(sampler_steps, shift)  # a bad step count fails here, not at the first call

  def frame_fn(params, key, index, latent, cache, actions, controls, text, text_mask):
    return sample_frame(model, params, key, index, latent, cache, sampler_steps=sampler_steps,
                        shift=shift, actions=actions, controls=controls, text=text,
                        text_mask=text_mask)

  return jax.jit(frame_fn, donate_argnums=4, compiler_options=stream_compiler_options())


def generate_latents(model: Generator, params, first_latent: np.ndarray,
                     actions: Sequence[int] | None, num_frames: int, seed: int = 0, *,
                     sampler_steps: int = 1, shift: float = 1.0) -> Iterator[np.ndarray]:
  """Yields num_frames latent frames [h, w, C] (host numpy) of one stream made
  by `sample_frame` (the sampler a StreamingSession runs), the first being
  first_latent.

  params: the bare parameter tree. actions[i] is the action whose effect frame
  i shows (actions[0] goes with the given first frame); None = no actions.
  A model with text or control inputs gets none (the frames are unconditioned).
  """
  s = model.spec
  if num_frames < 1:
    raise ValueError(f"num_frames must be >= 1, got {num_frames}")
  if tuple(first_latent.shape) != (*s.latent_size, s.latent_channels):
    raise ValueError(f"first_latent must be {(*s.latent_size, s.latent_channels)}, "
                     f"got {tuple(first_latent.shape)}")
  if s.num_actions:
    if actions is None or len(actions) < num_frames:
      raise ValueError(f"the model takes actions: give at least {num_frames}, got "
                       f"{0 if actions is None else len(actions)}")
    bad = [a for a in actions[:num_frames] if not 0 <= int(a) < s.num_actions]
    if bad:
      raise ValueError(f"invalid action ids {bad[:5]}: valid ids are 0..{s.num_actions - 1}")
  model, params = layer_by_layer(model, params)  # once per stream: per-layer params
  frame_fn = make_frame_fn(model, sampler_steps, shift)
  key = jax.random.key(seed)
  x = jnp.asarray(first_latent, jnp.float32)[None, None]         # [1, 1, h, w, C]
  cache = model.init_cache(1)
  for i in range(num_frames):
    act = jnp.full((1, 1), int(actions[i]), jnp.int32) if s.num_actions else None
    x, cache = frame_fn(params, key, jnp.int32(i), x, cache, act, None, None, None)
    yield np.asarray(x[0, 0])


def make_session_step(model: Generator, decoder, sampler_steps: int = 1,
                      shift: float = 1.0) -> Callable:
  """The one jitted step of a stream, `sample_frame` + decode, the state donated:

  step(params, decoder_params, key, state, actions, controls, text, text_mask)
      -> (frames uint8 [k, H, W, 3], state)
  text: the prompt's TextKV (`with_text_kv`, once per prompt) or None.
  """
  sampler_grid(sampler_steps, shift)  # a bad step count fails here, not at the first step

  def step(params, decoder_params, key, state: StreamState, actions, controls, text,
           text_mask):
    latent, cache = sample_frame(model, params, key, state.index, state.latent, state.cache,
                                 sampler_steps=sampler_steps, shift=shift, actions=actions,
                                 controls=controls, text=text, text_mask=text_mask)
    frames, decode_cache = decoder.decode_step(decoder_params, latent, state.decode_cache)
    pixels = jnp.clip(jnp.round((frames[0] + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
    return pixels, StreamState(index=state.index + 1, latent=latent, cache=cache,
                               decode_cache=decode_cache)

  return jax.jit(step, donate_argnums=3, compiler_options=stream_compiler_options())


def _cast(tree, dtype):
  return jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)


@dataclasses.dataclass
class StreamingModel:
  """A loaded world model: params, decoder, world metadata and the compiled step.

  `params` (the generator's bare tree as checkpoints and exports hold it) is
  split per layer once here (`layer_by_layer`): the step runs
  `step_generator` (the same model unscanned) on `step_params`, reading and
  writing each layer's weights and cache in place. Only the split copy is
  kept: reading `params` stacks it back (a copy, for exports and
  full-sequence calls of `generator`).

  Attributes: `generator` (the Generator module), `step_generator` and
  `step_params` (what the step runs), `decoder`, `world` (the
  config's world, or None), `num_actions` (the actions a player may send: the world's action
  set when the config names a world, else model.num_actions; 0 = continuous
  controls only), `control_dim`, `action_names` (or None), `frame_size` (H, W),
  `frames_per_latent` (k), `fps` (the world's frame rate, or None),
  `sampler_steps`, `source` (where it was loaded from). `encode_text(caption)`
  embeds a string with the config's text encoder (data.text_encoder).
  """
  config: Any
  params: dataclasses.InitVar[Any]  # stored split per layer (step_params); see `params` below
  decoder_params: Any = None
  start_frame: np.ndarray | None = None
  sampler_steps: int = 0
  source: str = "random init"

  def __post_init__(self, params):
    c = self.config
    self.generator = build_generator(c)
    self.decoder = build_decoder(c)
    check_params(params, abstract_params(c), f"the params of {self.source}")
    self.step_generator, self.step_params = layer_by_layer(
        self.generator, _cast(params, self.generator.spec.params_dtype))  # once per load
    if uses_vae(c):
      if self.decoder_params is None:
        raise ValueError(f"{self.source}: this config decodes with the video VAE "
                         "(data.space_to_depth=0) but no VAE params were given")
      check_params(self.decoder_params, abstract_params(c, "vae"),
                              f"the VAE params of {self.source}")
      self.decoder_params = _cast(self.decoder_params, jnp.float32)
    if self.sampler_steps == 0:  # auto: a stage-1 model is a diffusion model, unless
      # its config (an export's, launch/export.py --sampler_steps) says otherwise
      self.sampler_steps = ((int(c.diffusion.get("sampler_steps", 0)) or DIFFUSION_SAMPLER_STEPS)
                            if c.stage == "diffusion" else 1)
    self.world = world_from_config(c)
    s = self.generator.spec
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
    self.step_fn = make_session_step(self.step_generator, self.decoder, self.sampler_steps,
                                     float(c.diffusion.timestep_shift))
    self._text_encoder = None  # loaded by the first encode_text

  @classmethod
  def load(cls, checkpoint: str | None = None, *, sampler_steps: int = 0,
           text_encoder: str | None = None) -> StreamingModel:
    """The model in `checkpoint` (see StreamingSession.load); `text_encoder`
    (a umT5 folder) replaces the config's data.text_encoder."""
    config, params, vae_params, start_frame, source = loading.load_world_model(checkpoint)
    if text_encoder is not None:
      config.data.text_encoder = text_encoder
    return cls(config, params, vae_params, start_frame, sampler_steps, source)

  def encode_text(self, caption: str) -> tuple[np.ndarray, np.ndarray]:
    """(embedding float32 [L, text_dim], mask bool [L]) of `caption`, L =
    data.text_len, by the umT5 encoder in data.text_encoder (loaded on the
    first call, then reused). ValueError when the config names no encoder or
    its width is not model.text_dim."""
    if self._text_encoder is None:
      folder = self.config.data.get("text_encoder", "")
      if not folder:
        raise ValueError(
            f"{self.source} names no text encoder, so text must be an embedding "
            f"[L, {self.generator.spec.text_dim}]; to pass strings, set data.text_encoder to "
            "the umT5 folder the model's text embeddings came from (e.g. "
            "Wan2.1-T2V-1.3B-Diffusers/text_encoder: --config.data.text_encoder=DIR when "
            "training or exporting) or load with text_encoder=DIR")
      from aapt_jax.convert.umt5 import TextEncoder  # reads files: only when strings are used
      encoder = TextEncoder.load(folder)
      if encoder.d_model != self.generator.spec.text_dim:
        raise ValueError(f"data.text_encoder {folder} makes {encoder.d_model}-d embeddings "
                         f"but the model takes model.text_dim={self.generator.spec.text_dim}")
      self._text_encoder = encoder
    emb, mask = self._text_encoder.encode([caption], int(self.config.data.get("text_len",
                                                                            512)))
    return emb[0], mask[0]

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


# the generator's bare params stacked as checkpoints hold them (a copy of step_params);
# set after the class: in its body, dataclass would take it for the InitVar's default
StreamingModel.params = property(lambda self: scanned_params(self.generator, self.step_params))


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
           seed: int = 0, text_encoder: str | None = None) -> StreamingSession:
    """A session over the generator in `checkpoint`: a run, stage or step
    directory (its EMA params), an export directory, the name of an export
    shipped with the package ("atari", "doom"; an unknown name raises
    ValueError listing them), or None (the shipped "atari"). `text_encoder`: the umT5
    folder for text strings (default: the config's data.text_encoder)."""
    return cls(StreamingModel.load(checkpoint, sampler_steps=sampler_steps,
                                   text_encoder=text_encoder), seed)

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
    spec = self.model.generator.spec
    if text is None:
      return None, None
    if not spec.text_dim:
      raise ValueError("text given but this model takes no text (model.text_dim=0)")
    if isinstance(text, str):
      emb, mask = self.model.encode_text(text)                    # [L, text_dim], [L]
    else:
      emb = np.asarray(text, np.float32)
      if emb.ndim != 2 or emb.shape[1] != spec.text_dim or not emb.shape[0]:
        raise ValueError(f"text embedding must be [L, {spec.text_dim}], got {emb.shape}")
      mask = np.ones(emb.shape[0], bool)
    cond = with_text_kv(self.model.step_generator, self.model.step_params,
                        Conditioning(text=jnp.asarray(emb)[None]))
    return cond.text_kv, jnp.asarray(mask)[None]  # text keys/values once per prompt

  def _control_inputs(self, controls):
    """(actions int32 [1, 1] or None, controls float32 [1, 1, A] or None): fixed
    structure per model (-1 / zeros when not given), so one compile serves all."""
    spec = self.model.generator.spec
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
    frames, self._state = m.step_fn(m.step_params, m.decoder_params, self._key, self._state,
                                    actions, vector, *text)
    return np.asarray(frames)

  # -------------------------------------------------------------------- API
  def start(self, first_frame: np.ndarray | None = None, text=None,
            seed: int | None = None) -> np.ndarray:
    """Starts (or restarts) the stream from `first_frame` (uint8 [H, W, 3];
    None = the export's start frame or the world's first frame), with `text`
    (an embedding [L, text_dim], all L tokens attended, or a string, embedded
    by `StreamingModel.encode_text`: data.text_len tokens, the padding
    masked). `seed` sets the
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
                              cache=m.generator.init_cache(1),
                              decode_cache=m.decoder.init_decode_cache(1))
    noop = m.noop if m.generator.spec.num_actions else None
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
