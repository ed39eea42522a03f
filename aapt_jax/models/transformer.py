"""The DiT backbone (Wan2.1-compatible): blocks of modulated self-attention,
text cross-attention and MLP, run under `nn.scan` over layers with a
configurable `jax.checkpoint` policy.

Parameter names follow diffusers' WanTransformer3DModel (attn1/attn2 with
to_q/to_k/to_v/to_out and norm_q/norm_k, norm2 affine, ffn, scale_shift_table)
so that weight import is a rename.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from aapt_jax.models import attention as attn_ops
from aapt_jax.models import rope
from aapt_jax.models.layers import Dense, FeedForward, LayerNorm32, RMSNorm, logical
from aapt_jax.models.spec import ModelSpec
from aapt_jax.parallel import RESIDUAL

REMAT_POLICY = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class SelfAttention(nn.Module):
  """Block-causal (or, in plain-Wan mode, bidirectional) self-attention.

  x: [B, T, P, D]. In cached mode the blocks are counter..counter+T-1 and the
  layer's cache is read; with `commit` (T == 1) the same pass also returns
  this block's keys/values ([B, H, P, Dh] each), which the generator writes
  into the cache (one block per layer, in place).
  """
  spec: ModelSpec
  grid: tuple[int, int]
  cached: bool = False
  commit: bool = False

  @nn.compact
  def __call__(self, x, counter, layer_kv):
    s = self.spec
    b, t, p, _ = x.shape
    kw = dict(dtype=s.compute_dtype, param_dtype=s.params_dtype)
    if self.has_variable("params", "to_qkv"):  # a stream's params (`fuse_qkv`): one matmul
      fused = self.get_variable("params", "to_qkv")
      qkv = jnp.einsum("...i,ijo->...jo", x.astype(s.compute_dtype),
                       fused["kernel"].astype(s.compute_dtype))
      qkv = qkv + fused["bias"].astype(s.compute_dtype)           # [B, T, P, 3, D]
      q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
    else:
      q = Dense(s.dim, ("embed", "heads"), name="to_q", **kw)(x)
      k = Dense(s.dim, ("embed", "heads"), name="to_k", **kw)(x)
      v = Dense(s.dim, ("embed", "heads"), name="to_v", **kw)(x)
    if s.qk_norm:
      q = RMSNorm("heads", eps=s.eps, name="norm_q", **kw)(q)
      k = RMSNorm("heads", eps=s.eps, name="norm_k", **kw)(k)
    shape = (b, t, p, s.num_heads, s.head_dim)
    q, k, v = q.reshape(shape), k.reshape(shape), v.reshape(shape)
    cos, sin = rope.spatial_angles(*self.grid, s.head_dim, s.rope_theta)
    q, k = rope.rotate_spatial(q, cos, sin), rope.rotate_spatial(k, cos, sin)

    new_kv = None
    if not s.block_causal:
      out = attn_ops.full_attention(q, k, v, theta=s.rope_theta)
    elif not self.cached:
      out = attn_ops.block_causal_attention(q, k, v, counter=0, window=s.window_frames,
                                            theta=s.rope_theta, backend=s.attention_backend)
    else:
      out = attn_ops.block_causal_attention(
          q, k, v, counter=counter, window=s.window_frames, theta=s.rope_theta,
          sink=(layer_kv.sink_k, layer_kv.sink_v), ring=(layer_kv.ring_k, layer_kv.ring_v),
          backend=s.attention_backend)
      if self.commit:  # this block's keys/values for the cache, heads-major [B, H, P, Dh]
        new_kv = (jnp.swapaxes(k[:, 0], 1, 2), jnp.swapaxes(v[:, 0], 1, 2))
        # made to depend on the attention's output (+ 0 * one of its values;
        # XLA:CPU drops optimization barriers): the cache write then comes after
        # this layer's reads of the ring, so a donated ring is updated in place
        # instead of copied for its readers first
        zero = jnp.zeros((), k.dtype) * out.reshape(-1)[0]
        new_kv = tuple(a + zero for a in new_kv)
    out = Dense(s.dim, ("heads", "embed"), name="to_out", **kw)(out.reshape(b, t, p, s.dim))
    return out, new_kv


@flax.struct.dataclass
class TextKV:
  """Every layer's cross-attention keys/values of one prompt (after norm_k),
  computed once by `Generator.text_kv` and reused by every call or step."""
  k: Any  # [L, B, H, Dh, Lt] (heads-major, transposed: the layout XLA:CPU's score
          # matmul reads without copying it per step), or a tuple of L [B, H, Dh, Lt]
          # (unscanned model: each layer's own array, read without slicing a stack)
  v: Any  # [L, B, H, Dh, Lt] (heads-major, transposed: the layout the attention's
          # value matmul reads without a transpose per step), or a tuple of L [B, H, Dh, Lt]


class CrossAttention(nn.Module):
  """Tokens [B, T, P, D] attend to text [B, L, D] (already projected).

  `text` is either the projected text or this layer's precomputed (k, v)
  (both [B, H, Dh, L], as TextKV holds them); with x None only the latter is
  computed and returned.
  """
  spec: ModelSpec

  @nn.compact
  def __call__(self, x, text, text_mask):
    s = self.spec
    kw = dict(dtype=s.compute_dtype, param_dtype=s.params_dtype)
    heads = lambda a: a.reshape(a.shape[0], a.shape[1], s.num_heads, s.head_dim)
    precomputed = isinstance(text, tuple)
    if precomputed:
      k, v = text
    else:
      k = Dense(s.dim, ("embed", "heads"), name="to_k", **kw)(text)
      v = Dense(s.dim, ("embed", "heads"), name="to_v", **kw)(text)
      if s.qk_norm:
        k = RMSNorm("heads", eps=s.eps, name="norm_k", **kw)(k)
      k, v = heads(k), heads(v)
    if x is None:
      return jnp.transpose(k, (0, 2, 3, 1)), jnp.transpose(v, (0, 2, 3, 1))
    b, t, p, _ = x.shape
    q = Dense(s.dim, ("embed", "heads"), name="to_q", **kw)(x.reshape(b, t * p, s.dim))
    if s.qk_norm:
      q = RMSNorm("heads", eps=s.eps, name="norm_q", **kw)(q)
    mask = text_mask if s.block_causal else None  # plain Wan has no text mask
    if precomputed:
      out = attn_ops.cross_attention_heads_major(heads(q), k, v, mask)
    else:
      out = attn_ops.cross_attention(heads(q), k, v, mask)
    out = Dense(s.dim, ("heads", "embed"), name="to_out", **kw)(out.reshape(b, t * p, s.dim))
    return out.reshape(b, t, p, s.dim)


class Block(nn.Module):
  """One DiT block; (x, layer_kv, ...) -> (x, (new k/v or None, x or None)), scan-shaped."""
  spec: ModelSpec
  grid: tuple[int, int]
  cached: bool = False
  commit: bool = False
  features: bool = False  # also emit the block's output (the discriminator reads depths)
  text_kv_only: bool = False  # only this layer's text (k, v) (x passes through)

  @nn.compact
  def __call__(self, x, layer_kv, mod, text, text_mask, counter):
    # x [B, T, P, D]; mod [B, T, 6, D] float32 (shared time projection); text the
    # projected text [B, L, D] or this layer's (k, v) [B, L, H, Dh] (from TextKV)
    s = self.spec
    if self.text_kv_only:
      return x, (CrossAttention(s, name="attn2")(None, text, None), None)
    x = nn.with_logical_constraint(x, RESIDUAL)  # rules: where the program is built
    f32 = jnp.float32
    table = self.param(
        "scale_shift_table",
        logical(nn.initializers.normal(s.dim ** -0.5), ("modulation", "embed")),
        (6, s.dim), s.params_dtype)
    m = table.astype(f32)[None, None] + mod                     # [B, T, 6, D]
    shift, scale, gate, c_shift, c_scale, c_gate = (m[:, :, i, None] for i in range(6))

    h = LayerNorm32(eps=s.eps, name="norm1")(x) * (1 + scale) + shift
    a, new_kv = SelfAttention(s, self.grid, self.cached, self.commit, name="attn1")(
        h.astype(s.compute_dtype), counter, layer_kv)
    x = (x.astype(f32) + a.astype(f32) * gate).astype(s.compute_dtype)

    if s.text_dim:
      # Wan: an affine LayerNorm before cross-attention, or none at all
      norm2 = LayerNorm32(eps=s.eps, affine=True, name="norm2") if s.cross_attn_norm else \
          (lambda a: a)
      cross = CrossAttention(s, name="attn2")
      if text is not None:
        x = x + cross(norm2(x).astype(s.compute_dtype), text, text_mask)
      elif self.is_initializing():  # create the params; text None means "unused"
        cross(norm2(x).astype(s.compute_dtype), jnp.zeros((x.shape[0], 1, s.dim), x.dtype), None)

    h = LayerNorm32(eps=s.eps, name="norm3")(x) * (1 + c_scale) + c_shift
    ff = FeedForward(s.dim, s.ffn_dim, dtype=s.compute_dtype, param_dtype=s.params_dtype,
                     name="ffn")(h.astype(s.compute_dtype))
    x = (x.astype(f32) + ff.astype(f32) * c_gate).astype(s.compute_dtype)
    return x, (new_kv, x if self.features else None)


class Transformer(nn.Module):
  """All blocks: `nn.scan` over layers (params stacked on a "layers" axis) or unrolled."""
  spec: ModelSpec

  @nn.compact
  def __call__(self, x, mod, text, text_mask, grid, layers_kv=None, counter=0, commit=False,
               features=False, text_kv_only=False, feature_layers=None):
    """layers_kv: one LayerKV per layer (cached mode) or None. text: the
    projected text [B, L, D], a TextKV, or None.

    Returns (x, new_kv, feats): new_kv is one (k, v) pair per layer with
    `commit` (else None); feats the output of every block [L, B, T, P, D]
    with `features` (else None), or with `feature_layers` (sorted block
    indices) only those blocks' outputs [len(feature_layers), B, T, P, D]
    (what the discriminator's heads read; the other depths are never
    stored). With `text_kv_only` (x, mod, grid unused): the TextKV of `text`
    instead.
    """
    s = self.spec
    cached = layers_kv is not None
    per_layer_text = isinstance(text, TextKV)
    if per_layer_text:
      text = (text.k, text.v)
      if s.scan_layers and isinstance(text[0], (tuple, list)):  # the scan reads a stack
        text = tuple(jnp.stack(a) for a in text)
    block = Block
    if s.remat != "none" and not cached and not text_kv_only:
      block = nn.remat(Block, policy=REMAT_POLICY[s.remat], prevent_cse=not s.scan_layers)
    if feature_layers is not None and s.scan_layers and not self.is_initializing():
      return self._scan_to_depths(x, mod, text, text_mask, grid, tuple(feature_layers))
    if feature_layers is not None:
      features = True
    if s.scan_layers:
      scanned = nn.scan(
          block, variable_axes={"params": 0}, split_rngs={"params": True},
          in_axes=(0, nn.broadcast, 0 if per_layer_text else nn.broadcast, nn.broadcast,
                   nn.broadcast),
          length=s.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
      stacked = jax.tree.map(lambda *a: jnp.stack(a), *layers_kv) if cached else None
      x, (new_kv, feats) = scanned(s, grid, cached, commit, features, text_kv_only,
                                   name="blocks")(x, stacked, mod, text, text_mask, counter)
      if text_kv_only:
        return TextKV(*new_kv)
      if commit:
        new_kv = [(new_kv[0][i], new_kv[1][i]) for i in range(s.num_layers)]
      return x, new_kv, feats
    new_layers, feats = [], []
    for i in range(s.num_layers):
      text_i = (text[0][i], text[1][i]) if per_layer_text else text
      x, (new_kv, feat) = block(s, grid, cached, commit, features, text_kv_only,
                                name=f"blocks_{i}")(
          x, layers_kv[i] if cached else None, mod, text_i, text_mask, counter)
      new_layers.append(new_kv)
      feats.append(feat)
    if text_kv_only:
      return TextKV(*(tuple(a) for a in zip(*new_layers)))
    if feature_layers is not None:
      feats = [feats[i] for i in feature_layers]
    return x, (new_layers if commit else None), (jnp.stack(feats) if features else None)

  def _scan_to_depths(self, x, mod, text, text_mask, grid, depths):
    """The scanned blocks (uncached) as one `lax.scan` per stretch of layers
    ending at each of `depths`, over slices of the stacked "blocks" params:
    returns (x after the last block, None, the outputs at `depths`
    [len(depths), B, T, P, D]). Same blocks, same remat policy as the single
    scan; only the requested depths' outputs are kept."""
    s = self.spec
    if list(depths) != sorted(set(depths)) or not all(0 <= d < s.num_layers for d in depths):
      raise ValueError(f"feature_layers must be sorted, distinct block indices in "
                       f"0..{s.num_layers - 1}, got {depths}")
    stacked = nn.meta.unbox(self.variables["params"]["blocks"])  # leaves [L, ...]
    block = Block(s, grid, parent=None)  # unbound: applied to each slice of the params

    def body(x, layer):
      params, text_i = layer
      x, _ = block.apply({"params": params}, x, None, mod, text_i, text_mask, 0)
      return x, None

    if s.remat != "none":
      body = jax.checkpoint(body, policy=REMAT_POLICY[s.remat], prevent_cse=False)
    feats, lo = [], 0
    for hi in (*depths, s.num_layers - 1):
      if hi < lo:  # the last depth is the last block
        continue
      part = jax.tree.map(lambda a: a[lo:hi + 1], stacked)
      text_part = jax.tree.map(lambda a: a[lo:hi + 1], text) if isinstance(text, tuple) else None
      if text_part is None:
        x, _ = jax.lax.scan(lambda c, p: body(c, (p, text)), x, part)
      else:
        x, _ = jax.lax.scan(body, x, (part, text_part))
      if hi in depths:
        feats.append(x)
      lo = hi + 1
    return x, None, jnp.stack(feats)
