"""umT5's text encoder in Flax: the captions' embeddings Wan2.1 conditions on.

    module = build_text_encoder(config)          # config: TextEncoderConfig
    hidden = module.apply({"params": params}, input_ids, attention_mask)
    # input_ids int32 [B, L], attention_mask [B, L] (1/True = a token) -> float32 [B, L, d_model]

`hidden` is transformers' `UMT5EncoderModel(...).last_hidden_state`: the
encoder stack after its final RMSNorm. umT5 is T5 v1.1 with a relative
position bias in EVERY layer (T5 has one, in layer 0, shared by all):
  - RMSNorm without mean subtraction before each sub-layer and at the end;
  - attention logits q·k (no 1/sqrt(d_kv) scaling) + the layer's relative
    position bias [H, L, L] + a large negative number at padded keys
    (padded queries are computed like any other: their rows attend to the
    real tokens, as in transformers);
  - the feed-forward is gated: wo(gelu_tanh(wi_0 x) * wi_1 x);
  - no biases anywhere; dropout is off (inference).
`aapt_jax.convert.umt5.load_text_encoder` reads the weights of a
transformers folder into the params this module declares.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from aapt_jax.models.layers import Dense, RMSNorm, logical


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
  """The sizes of a umT5 encoder (transformers' UMT5Config names)."""
  vocab_size: int
  d_model: int                 # the width of the stream and of the output
  d_kv: int                    # head dim
  d_ff: int                    # gated feed-forward width
  num_layers: int
  num_heads: int
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> jax.Array:
  """int32 [L, L]: the bidirectional bucket of key j - query i (T5's encoder
  bucketing): half the buckets per sign; inside each half, distances below
  half of it exactly, longer ones log-spaced up to max_distance (beyond: the last)."""
  position = jnp.arange(length)
  relative = position[None, :] - position[:, None]                # [L, L]: key - query
  half = num_buckets // 2
  buckets = jnp.where(relative > 0, half, 0)
  distance = jnp.abs(relative)
  max_exact = half // 2
  log_ratio = (jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
               / math.log(max_distance / max_exact))
  large = jnp.minimum(max_exact + (log_ratio * (half - max_exact)).astype(jnp.int32), half - 1)
  return (buckets + jnp.where(distance < max_exact, distance, large)).astype(jnp.int32)


class SelfAttention(nn.Module):
  """T5 attention with this layer's own relative position bias."""
  config: TextEncoderConfig

  @nn.compact
  def __call__(self, x, key_bias):
    # x [B, L, d_model]; key_bias [B, 1, 1, L]: 0 at tokens, very negative at padding
    c = self.config
    b, length, _ = x.shape
    inner = c.num_heads * c.d_kv
    heads = lambda y: y.reshape(b, length, c.num_heads, c.d_kv)     # [B, L, H, d_kv]
    q = heads(Dense(inner, ("embed", "heads"), use_bias=False, name="q")(x))
    k = heads(Dense(inner, ("embed", "heads"), use_bias=False, name="k")(x))
    v = heads(Dense(inner, ("embed", "heads"), use_bias=False, name="v")(x))
    table = self.param("relative_attention_bias",
                       logical(nn.initializers.normal(1.0), ("vocab", "heads")),
                       (c.relative_attention_num_buckets, c.num_heads), jnp.float32)
    buckets = relative_position_buckets(length, c.relative_attention_num_buckets,
                                        c.relative_attention_max_distance)  # [L, L]
    position_bias = jnp.transpose(table[buckets], (2, 0, 1))[None]  # [1, H, L, L]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k)                     # [B, H, L, L], unscaled
    weights = jax.nn.softmax(logits + (position_bias + key_bias), axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, length, inner)
    return Dense(c.d_model, ("heads", "embed"), use_bias=False, name="o")(out)


class GatedFeedForward(nn.Module):
  """wo(gelu_tanh(wi_0 x) * wi_1 x) (T5 v1.1's gated-gelu, transformers' gelu_new)."""
  config: TextEncoderConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    gate = jax.nn.gelu(Dense(c.d_ff, ("embed", "mlp"), use_bias=False, name="wi_0")(x),
                       approximate=True)
    linear = Dense(c.d_ff, ("embed", "mlp"), use_bias=False, name="wi_1")(x)
    return Dense(c.d_model, ("mlp", "embed"), use_bias=False, name="wo")(gate * linear)


class EncoderLayer(nn.Module):
  config: TextEncoderConfig

  @nn.compact
  def __call__(self, x, key_bias):
    eps = self.config.layer_norm_epsilon
    x = x + SelfAttention(self.config, name="attention")(
        RMSNorm("embed", eps, name="attention_norm")(x), key_bias)
    return x + GatedFeedForward(self.config, name="ffn")(RMSNorm("embed", eps, name="ffn_norm")(x))


class UMT5Encoder(nn.Module):
  """input_ids int32 [B, L], attention_mask [B, L] -> float32 [B, L, d_model]
  (the last hidden state after the final norm; see the module docstring)."""
  config: TextEncoderConfig

  @nn.compact
  def __call__(self, input_ids, attention_mask):
    c = self.config
    embedding = self.param("embedding", logical(nn.initializers.normal(1.0), ("vocab", "embed")),
                           (c.vocab_size, c.d_model), jnp.float32)
    x = embedding[input_ids]                                          # [B, L, d_model]
    valid = jnp.asarray(attention_mask).astype(bool)                  # [B, L]
    key_bias = jnp.where(valid, 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]  # [B, 1, 1, L]
    for i in range(c.num_layers):
      x = EncoderLayer(c, name=f"layers_{i}")(x, key_bias)
    return RMSNorm("embed", c.layer_norm_epsilon, name="final_norm")(x)


def build_text_encoder(config: TextEncoderConfig) -> UMT5Encoder:
  """The Flax umT5 encoder of `config` (from `aapt_jax.convert.umt5.load_text_encoder`)."""
  return UMT5Encoder(config)
