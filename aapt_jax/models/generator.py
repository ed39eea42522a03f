"""The generator: the DiT backbone plus a velocity head, with a full-sequence
`__call__` (training), a one-frame `step` against a KV cache (1NFE
streaming), and `init_cache`.

Frames and blocks: block i is made from latent frame i; block 0 is the sink
(the first frame, clean, t = 0). Block i >= 1 takes concat(noisy x_i at t_i,
recycled x_{i-1}) on channels. Velocity parameterisation:
x_t = (1 - t) x_0 + t eps, v = eps - x_0; the one-step frame is eps - v(eps, 1).
The head predicts v directly (Wan), x0 (`model.prediction = "x0"`), or the
change x0 - x_{i-1} from the recycled frame ("frame_delta"); x0 is turned
into v here so every caller sees a velocity.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from aapt_jax.models import kv_cache as kvc
from aapt_jax.models.layers import (Dense, LayerNorm32, PatchEmbed, TextProjection,
                                    TimestepEmbedding, logical, unpatchify)
from aapt_jax.models.spec import ModelSpec
from aapt_jax.models.transformer import TextKV, Transformer


@flax.struct.dataclass
class Conditioning:
  """Per-call conditions; every field optional (None = zeros or unused).

  Shapes for the full call; T = 1 for `step`.
  """
  previous: Any = None   # [B, T, h, w, C] recycled frames: previous[:, i] = x_{i-1}, zeros at i = 0
  text: Any = None       # [B, L, text_dim]
  text_mask: Any = None  # [B, L] bool, True = attend (ignored in plain-Wan mode)
  actions: Any = None    # int32 [B, T]: the action whose effect frame i shows (-1 = none)
  controls: Any = None   # float32 [B, T, control_dim]
  text_kv: Any = None    # TextKV of `text` from Generator.text_kv (then `text` is not read):
                         # a prompt's per-layer text keys/values, computed once


def _shape_error(what, expected, got):
  return ValueError(f"{what}: expected shape {expected}, got {tuple(got)}")


def velocity_from_x0(x_t, t, x0, min_t):
  """v = (x_t - x0) / max(t, min_t): x_t [B, T, h, w, C], t [B, T].

  Exact for t >= min_t (x_t - t v = x0), so the one-step frame eps - v(eps, 1)
  is the predicted x0 itself.
  """
  t = jnp.maximum(t.astype(jnp.float32), min_t)[:, :, None, None, None]
  return (x_t.astype(jnp.float32) - x0) / t


class Generator(nn.Module):
  """The AAPT generator (a Wan2.1-compatible DiT).

  A stream is latent frames x_0, x_1, ...; block i is the tokens of frame i,
  block 0 the sink (x_0 itself, clean, t = 0). Block i >= 1 takes noisy x_i at
  timestep t_i concatenated on channels with the recycled x_{i-1}
  (`cond.previous`; zeros for i = 0 — the caller's job, as is t_0 = 0).
  Velocity parameterisation: x_t = (1 - t) x_0 + t eps, v = eps - x_0; the
  one-step (1NFE) frame is eps - v(eps, t=1).

  The window rule (one rule for `__call__` and `step`): block i attends to the
  sink once, at temporal distance min(i, N + 1), and to blocks max(1, i-N)..i
  at distance i - j (N = `model.window_frames`), so frame 10,000 costs what
  frame 10 costs. T calls of `step` equal one `__call__` on the T frames.

  - `__call__(latents [B, T, h, w, C], timesteps [B, T], cond, cache=None)
    -> velocity [B, T, h, w, C]`: the full sequence; with `cache` (a detached
    prefix) latents[:, 0] is block `cache.counter` and the cache is only read.
  - `step(latent [B, 1, h, w, C], timestep [B, 1], cond, cache, commit=True)
    -> (velocity, cache)`: one frame against the cache; with `commit` the same
    pass writes this block's keys/values (multi-step samplers peek with
    commit=False until their last step).
  - `init_cache(batch_size) -> KVCache`: fixed shapes (sink + a ring of N
    blocks per layer, an int32 counter array), so `step` compiles once.
  - `text_kv(text) -> TextKV`: every layer's text keys/values, once per prompt.
  """
  spec: ModelSpec

  def setup(self):
    s = self.spec
    kw = dict(dtype=s.compute_dtype, param_dtype=s.params_dtype)
    self.patch_embedding = PatchEmbed(s.dim, s.patch_size, **kw)
    self.time_embedder = TimestepEmbedding(s.dim, s.freq_dim, **kw)
    self.time_proj = Dense(6 * s.dim, ("embed", "mlp"), **kw)
    if s.text_dim:
      self.text_embedder = TextProjection(s.dim, **kw)
    if s.num_actions:
      self.action_embedding = self.param(
          "action_embedding", logical(nn.initializers.normal(0.02), ("vocab", "embed")),
          (s.num_actions, s.dim), s.params_dtype)
    if s.control_dim:
      self.control_in = Dense(s.dim, ("control", "embed"), **kw)
      self.control_out = Dense(s.dim, ("embed", "embed_out"), **kw)
    self.transformer = Transformer(s)
    self.norm_out = LayerNorm32(eps=s.eps)
    # "frame_delta" starts as a copy of the recycled frame: a zero head (the
    # predicted change is 0 until training grows it where frames change)
    head_init = {"kernel_init": nn.initializers.zeros} if s.prediction == "frame_delta" else {}
    self.proj_out = Dense(s.patch_size[0] * s.patch_size[1] * s.patch_size[2] * s.latent_channels,
                          ("embed", "patch_out"), **kw, **head_init)
    self.scale_shift_table = self.param(
        "scale_shift_table", logical(nn.initializers.normal(s.dim ** -0.5), ("modulation", "embed")),
        (2, s.dim), s.params_dtype)

  # ------------------------------------------------------------ validation
  def _check(self, latents, timesteps, cond: Conditioning, name="latents"):
    s = self.spec
    if latents.ndim != 5:
      raise ValueError(f"{name} must be [B, T, h, w, C], got shape {tuple(latents.shape)}")
    b, t, h, w, c = latents.shape
    if c != s.latent_channels:
      raise ValueError(f"{name} have C={c} channels but model.latent_channels={s.latent_channels}")
    pt, ph, pw = s.patch_size
    if h % ph or w % pw or t % pt:
      raise ValueError(f"{name} (T, h, w)=({t}, {h}, {w}) must be divisible by "
                       f"model.patch_size={s.patch_size}")
    if tuple(timesteps.shape) != (b, t):
      raise _shape_error("timesteps (one per latent frame)", (b, t), timesteps.shape)
    if cond.previous is not None and tuple(cond.previous.shape) != tuple(latents.shape):
      raise _shape_error("cond.previous", tuple(latents.shape), cond.previous.shape)
    if cond.actions is not None:
      if not s.num_actions:
        raise ValueError("cond.actions given but model.num_actions=0 (the model takes no actions)")
      if tuple(cond.actions.shape) != (b, t):
        raise _shape_error("cond.actions", (b, t), cond.actions.shape)
    if cond.controls is not None:
      if not s.control_dim:
        raise ValueError("cond.controls given but model.control_dim=0 (the model takes no controls)")
      if tuple(cond.controls.shape) != (b, t, s.control_dim):
        raise _shape_error("cond.controls", (b, t, s.control_dim), cond.controls.shape)
    if cond.text is not None:
      if not s.text_dim:
        raise ValueError("cond.text given but model.text_dim=0 (the model takes no text)")
      if cond.text.ndim != 3 or cond.text.shape[0] != b or cond.text.shape[2] != s.text_dim:
        raise _shape_error("cond.text", (b, "L", s.text_dim), cond.text.shape)
      if cond.text_mask is not None and tuple(cond.text_mask.shape) != tuple(cond.text.shape[:2]):
        raise _shape_error("cond.text_mask", tuple(cond.text.shape[:2]), cond.text_mask.shape)
    if cond.text_kv is not None:
      if not isinstance(cond.text_kv, TextKV):
        raise ValueError(f"cond.text_kv must be a TextKV (from Generator.text_kv), got "
                         f"{type(cond.text_kv).__name__}")
      kv = cond.text_kv.k
      shape = ((len(kv), *kv[0].shape) if isinstance(kv, (tuple, list))
               else tuple(kv.shape))  # per layer, or stacked
      if len(shape) != 5 or shape[:4] != (s.num_layers, b, s.num_heads, s.head_dim):
        raise _shape_error("cond.text_kv.k [layers, B, H, Dh, L]",
                           (s.num_layers, b, s.num_heads, s.head_dim, "L"), shape)
      if cond.text_mask is not None and tuple(cond.text_mask.shape) != (b, shape[4]):
        raise _shape_error("cond.text_mask", (b, shape[4]), cond.text_mask.shape)

  def _check_cache(self, cache: kvc.KVCache, batch):
    s = self.spec
    if not s.block_causal:
      raise ValueError("a KV cache needs model.block_causal=True (plain-Wan mode is bidirectional)")
    if len(cache.layers) != s.num_layers:
      raise ValueError(f"cache has {len(cache.layers)} layers but model.num_layers="
                       f"{s.num_layers}: make it with this model's init_cache")
    expected = (batch, s.num_heads, s.window_frames, s.tokens_per_frame, s.head_dim)
    if tuple(cache.layers[0].ring_k.shape) != expected:
      raise _shape_error("cache ring [B, H, N, P, Dh] (from init_cache)", expected,
                         cache.layers[0].ring_k.shape)

  # ---------------------------------------------------------------- pieces
  def _embed(self, latents, timesteps, cond: Conditioning):
    """-> tokens [B, T', P, D], temb [B, T', D] f32, mod [B, T', 6, D] f32, text."""
    s = self.spec
    pt = s.patch_size[0]
    x = latents
    if s.frame_recycling:
      previous = cond.previous if cond.previous is not None else jnp.zeros_like(latents)
      x = jnp.concatenate([latents, previous.astype(latents.dtype)], axis=-1)
    tokens = self.patch_embedding(x)

    temb = self.time_embedder(timesteps[:, ::pt]).astype(jnp.float32)  # [B, T', D]
    if s.num_actions and cond.actions is not None:
      actions = cond.actions[:, ::pt].astype(jnp.int32)
      emb = jnp.take(self.action_embedding, jnp.clip(actions, 0, s.num_actions - 1), axis=0)
      temb = temb + jnp.where(actions[..., None] >= 0, emb.astype(jnp.float32), 0.0)
    if s.control_dim and cond.controls is not None:
      c = self.control_out(nn.silu(self.control_in(cond.controls[:, ::pt])))
      temb = temb + c.astype(jnp.float32)
    elif s.control_dim and self.is_initializing():
      self.control_out(nn.silu(self.control_in(jnp.zeros(temb.shape[:2] + (s.control_dim,)))))
    mod = self.time_proj(nn.silu(temb)).astype(jnp.float32)
    mod = mod.reshape(*mod.shape[:2], 6, s.dim)

    text = None
    if s.text_dim and cond.text_kv is not None:
      text = cond.text_kv
    elif s.text_dim and cond.text is not None:
      text = self.text_embedder(cond.text)
    elif s.text_dim and self.is_initializing():
      self.text_embedder(jnp.zeros((latents.shape[0], 1, s.text_dim)))
    return tokens, temb, mod, text

  def _head(self, x, temb, latent_hw):
    s = self.spec
    m = self.scale_shift_table.astype(jnp.float32)[None, None] + temb[:, :, None]  # [B, T', 2, D]
    shift, scale = m[:, :, 0, None], m[:, :, 1, None]
    h = self.norm_out(x) * (1 + scale) + shift
    out = self.proj_out(h.astype(s.compute_dtype))  # [B, T', P, pt*ph*pw*C]
    grid = (latent_hw[0] // s.patch_size[1], latent_hw[1] // s.patch_size[2])
    return unpatchify(out, s.patch_size, grid, s.latent_channels).astype(jnp.float32)

  def _run(self, latents, timesteps, cond, cache, commit):
    s = self.spec
    h, w = latents.shape[2:4]
    grid = (h // s.patch_size[1], w // s.patch_size[2])
    tokens, temb, mod, text = self._embed(latents, timesteps, cond)
    layers_kv = None if cache is None else cache.layers
    counter = 0 if cache is None else cache.counter
    x, new_layers, _ = self.transformer(tokens, mod, text, cond.text_mask, grid, layers_kv,
                                        counter, commit)
    out = self._head(x, temb, (h, w))  # [B, T, h, w, C] f32
    if s.prediction == "frame_delta":  # x0 = the recycled frame + the predicted change
      previous = cond.previous if cond.previous is not None else jnp.zeros_like(out)
      out = out + previous.astype(jnp.float32)
    if s.prediction in ("x0", "frame_delta"):
      out = velocity_from_x0(latents, timesteps, out, s.x0_min_t)
    return out, new_layers

  def features(self, latents, timesteps, cond: Conditioning | None = None, layers=None):
    """The backbone's block outputs [L, B, T', P, D] (no velocity head): what
    the discriminator reads; with `layers` (sorted block indices) only those
    blocks' outputs [len(layers), B, T', P, D], the other depths never stored."""
    cond = cond if cond is not None else Conditioning()
    self._check(latents, timesteps, cond)
    s = self.spec
    h, w = latents.shape[2:4]
    grid = (h // s.patch_size[1], w // s.patch_size[2])
    tokens, _, mod, text = self._embed(latents, timesteps, cond)
    _, _, feats = self.transformer(tokens, mod, text, cond.text_mask, grid, features=True,
                                   feature_layers=None if layers is None else tuple(layers))
    return feats

  # ------------------------------------------------------------------ API
  def __call__(self, latents, timesteps, cond: Conditioning | None = None,
               cache: kvc.KVCache | None = None):
    """Full sequence: latents [B, T, h, w, C], timesteps [B, T] -> velocity [B, T, h, w, C].

    With `cache` (a detached prefix), latents[:, 0] is block `cache.counter`;
    the cache is read, not returned.
    """
    cond = cond if cond is not None else Conditioning()
    self._check(latents, timesteps, cond)
    if cache is not None:
      self._check_cache(cache, latents.shape[0])
      if latents.shape[2:4] != tuple(s for s in self.spec.latent_size):
        raise _shape_error("latents (h, w) with a cache (model.latent_size)",
                           tuple(self.spec.latent_size), latents.shape[2:4])
    velocity, _ = self._run(latents, timesteps, cond, cache, commit=False)
    return velocity

  def text_kv(self, text) -> TextKV:
    """Every layer's cross-attention keys/values of text [B, L, text_dim], once
    per prompt: `cond.replace(text_kv=...)` then skips the text projection and
    the per-layer to_k/to_v in every call and step (same values). A scanned
    model stacks them on a layers axis, an unscanned one (`layer_by_layer`)
    keeps one array per layer; either model reads either."""
    s = self.spec
    if not s.text_dim:
      raise ValueError("text_kv needs text but model.text_dim=0 (the model takes no text)")
    if text.ndim != 3 or text.shape[2] != s.text_dim:
      raise _shape_error("text", ("B", "L", s.text_dim), text.shape)
    return self.transformer(None, None, self.text_embedder(text), None, None,
                            text_kv_only=True)

  def step(self, latent, timestep, cond: Conditioning | None, cache: kvc.KVCache,
           commit: bool = True):
    """One latent frame [B, 1, h, w, C] at timestep [B, 1] against the cache.

    Returns (velocity [B, 1, h, w, C], cache). With `commit` the same forward
    writes this block's keys/values and advances the counter (1NFE).
    """
    cond = cond if cond is not None else Conditioning()
    self._check(latent, timestep, cond, name="latent")
    s = self.spec
    if latent.shape[1] != 1:
      raise ValueError(f"step takes one latent frame [B, 1, h, w, C], got T={latent.shape[1]}")
    if tuple(latent.shape[2:4]) != tuple(s.latent_size):
      raise _shape_error("latent (h, w) (model.latent_size)", tuple(s.latent_size),
                         latent.shape[2:4])
    self._check_cache(cache, latent.shape[0])
    velocity, new_kv = self._run(latent, timestep, cond, cache, commit)
    if not commit:
      return velocity, cache
    return velocity, kvc.write_block(cache, new_kv, self.spec.rope_theta)

  def init_cache(self, batch_size: int) -> kvc.KVCache:
    """An empty cache of fixed shapes (no parameters needed)."""
    s = self.spec
    if not s.block_causal:
      raise ValueError("a KV cache needs model.block_causal=True (plain-Wan mode is bidirectional)")
    return kvc.init_cache(s.num_layers, batch_size, s.window_frames, s.tokens_per_frame,
                          s.num_heads, s.head_dim, s.compute_dtype)


def with_text_kv(model: Generator, params, cond: Conditioning) -> Conditioning:
  """`cond` with its text's TextKV computed once (unchanged without text or
  when it has one): for loops of calls or steps over one prompt."""
  if cond.text is None or cond.text_kv is not None:
    return cond
  return cond.replace(text_kv=model.apply({"params": params}, cond.text, method="text_kv"))


_QKV = ("to_q", "to_k", "to_v")


def _fuse_qkv(block):
  """A layer's params with attn1's to_q/to_k/to_v as one "to_qkv" (kernel
  [D, 3, D], bias [3, D]): the streaming step then projects q, k and v with
  one [D, 3D] matmul instead of three."""
  attn = dict(block["attn1"])
  parts = [attn.pop(name) for name in _QKV]
  attn["to_qkv"] = {"kernel": jnp.stack([p["kernel"] for p in parts], axis=1),
                    "bias": jnp.stack([p["bias"] for p in parts])}
  return {**block, "attn1": attn}


def _split_qkv(block):
  """The inverse of `_fuse_qkv` (unchanged when attn1 has no to_qkv)."""
  if "to_qkv" not in block["attn1"]:
    return block
  attn = dict(block["attn1"])
  fused = attn.pop("to_qkv")
  for i, name in enumerate(_QKV):
    attn[name] = {"kernel": fused["kernel"][:, i], "bias": fused["bias"][i]}
  return {**block, "attn1": attn}


def _blocks(model: Generator, transformer):
  """Each layer's params, in order: per-layer entries or a scanned stack."""
  if "blocks" in transformer:
    return [jax.tree.map(lambda a, i=i: a[i], transformer["blocks"])
            for i in range(model.spec.num_layers)]
  return [transformer[f"blocks_{i}"] for i in range(model.spec.num_layers)]


def layer_by_layer(model: Generator, params):
  """(model, params) for loops of `step` calls, once per stream: the model
  unscanned (`scan_layers` off) with its params split per layer ("blocks_0",
  ...) and each layer's q/k/v projections fused into one matmul ("to_qkv").
  Same values; a step then reads and writes each layer's cache arrays in
  place, where a scan stacks every layer's ring into one array per step (a
  copy of the whole cache), and slicing the stacked params inside the step
  would copy every weight per step. params: the bare tree or {"params": ...};
  `scanned_params` is the inverse."""
  wrapped = "params" in params and "transformer" not in params
  tree = dict(params["params"] if wrapped else params)
  transformer = {k: v for k, v in tree["transformer"].items()
                 if k != "blocks" and not k.startswith("blocks_")}
  for i, block in enumerate(_blocks(model, tree["transformer"])):
    transformer[f"blocks_{i}"] = _fuse_qkv(_split_qkv(block))
  tree["transformer"] = transformer
  unscanned = Generator(dataclasses.replace(model.spec, scan_layers=False))
  return unscanned, ({"params": tree} if wrapped else tree)


def scanned_params(model: Generator, params):
  """The inverse of `layer_by_layer`'s params, in `model`'s own layout (a
  copy; what exports and checkpoints hold): to_q/to_k/to_v split again, and
  for a scanned `model` the layers stacked back on a "layers" axis under
  "blocks". Params already in that layout come back as they are.
  params: the bare tree or {"params": ...}."""
  wrapped = "params" in params and "transformer" not in params
  tree = dict(params["params"] if wrapped else params)
  transformer = dict(tree["transformer"])
  stacked = "blocks" in transformer
  if stacked or (not model.spec.scan_layers and "to_qkv" not in transformer["blocks_0"]["attn1"]):
    return params  # a stack is never fused
  layers = [_split_qkv(b) for b in _blocks(model, transformer)]
  transformer = {k: v for k, v in transformer.items()
                 if k != "blocks" and not k.startswith("blocks_")}
  if model.spec.scan_layers:
    transformer["blocks"] = jax.tree.map(lambda *a: jnp.stack(a), *layers)
  else:
    transformer.update({f"blocks_{i}": b for i, b in enumerate(layers)})
  tree["transformer"] = transformer
  return {"params": tree} if wrapped else tree


@functools.cache
def stream_compiler_options() -> dict:
  """XLA options for jitting a stream's step (`jax.jit(..., compiler_options=)`).

  On CPU: XLA's library fusions (YNN) off, so the step's matmuls run as
  XLA:CPU's own dot thunks and its reductions inside XLA's loop fusions. At
  a stream's shapes (one frame: tens of tokens, hundreds of ops per step)
  that is 5-10 % faster per step, interleaved in one process, at the peer's
  dims and at atari's (benchmarks/step_latency.py). Nothing elsewhere, and
  nothing on a jaxlib that no longer knows the (experimental) option.
  """
  if jax.default_backend() != "cpu":
    return {}
  options = {"xla_cpu_experimental_ynn_fusion_type": ""}
  try:
    jax.jit(lambda x: x + 1, compiler_options=options).lower(jnp.zeros(())).compile()
  except Exception:  # noqa: BLE001 - an unknown option is XLA's runtime error
    return {}
  return options


def build_generator(config) -> Generator:
  """A Generator from a full config (or its `model` section)."""
  model_config = config.model if "model" in config else config
  return Generator(ModelSpec.from_config(model_config))


def example_inputs(spec: ModelSpec, batch_size: int = 1, frames: int = 2):
  """Zero inputs of the right shapes (for init, eval_shape and AOT compiles)."""
  t = frames * spec.patch_size[0]
  h, w = spec.latent_size
  latents = jnp.zeros((batch_size, t, h, w, spec.latent_channels), jnp.float32)
  cond = Conditioning(
      text=jnp.zeros((batch_size, 1, spec.text_dim)) if spec.text_dim else None,
      actions=jnp.zeros((batch_size, t), jnp.int32) if spec.num_actions else None,
      controls=jnp.zeros((batch_size, t, spec.control_dim)) if spec.control_dim else None)
  return latents, jnp.zeros((batch_size, t), jnp.float32), cond


def init_params(model: Generator, rng) -> dict:
  """{"params": ...} (boxed with logical axis names) for `model`."""
  latents, timesteps, cond = example_inputs(model.spec)
  return model.init(rng, latents, timesteps, cond)
