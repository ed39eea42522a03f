"""The fixed-shape KV cache of block-causal generation.

Per layer: the sink block's self-attention keys/values (block 0, the first
frame) and a ring of the N previous blocks (block j >= 1 lives in slot
(j - 1) mod N), plus one int32 frame counter (the index of the next block)
held as an array. Shapes never depend on how many frames were generated, so
`Generator.step` compiles once and runs at constant time and memory forever.

Keys are stored after the q/k norm and the *spatial* rotary rotation but
before any temporal rotation: the temporal rotation is a distance, applied
when the keys are read (see `attention.block_causal_attention`).
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class KVCache:
  sink_k: jax.Array   # [L, B, P, H, Dh]
  sink_v: jax.Array   # [L, B, P, H, Dh]
  ring_k: jax.Array   # [L, B, N, P, H, Dh]
  ring_v: jax.Array   # [L, B, N, P, H, Dh]
  counter: jax.Array  # int32 []: index of the next block (0 = the sink comes next)

  @property
  def window(self) -> int:
    return self.ring_k.shape[2]

  @property
  def batch_size(self) -> int:
    return self.ring_k.shape[1]

  def layer(self, i: int) -> "LayerKV":
    return LayerKV(self.sink_k[i], self.sink_v[i], self.ring_k[i], self.ring_v[i])


@flax.struct.dataclass
class LayerKV:
  sink_k: jax.Array   # [B, P, H, Dh]
  sink_v: jax.Array   # [B, P, H, Dh]
  ring_k: jax.Array   # [B, N, P, H, Dh]
  ring_v: jax.Array   # [B, N, P, H, Dh]


def init_cache(num_layers, batch_size, window, tokens_per_frame, num_heads, head_dim,
               dtype=jnp.float32) -> KVCache:
  sink = jnp.zeros((num_layers, batch_size, tokens_per_frame, num_heads, head_dim), dtype)
  ring = jnp.zeros((num_layers, batch_size, window, tokens_per_frame, num_heads, head_dim),
                   dtype)
  return KVCache(sink_k=sink, sink_v=sink, ring_k=ring, ring_v=ring,
                 counter=jnp.zeros((), jnp.int32))


def ring_block_indices(counter, window):
  """Block index held by each ring slot [N] (<= 0 where the slot is empty)."""
  last = counter - 1
  return last - jnp.mod(last - 1 - jnp.arange(window), window)


def write_block(layer: LayerKV, k, v, counter) -> LayerKV:
  """Writes block `counter`'s keys/values k, v [B, P, H, Dh] into the cache.

  Block 0 becomes the sink; block j >= 1 overwrites ring slot (j - 1) mod N,
  the oldest block, which has just left the window.
  """
  is_sink = counter == 0
  window = layer.ring_k.shape[1]
  slot = jnp.mod(counter - 1, window)

  def put(ring, new):
    old = jax.lax.dynamic_index_in_dim(ring, slot, axis=1, keepdims=False)
    new = jnp.where(is_sink, old, new.astype(ring.dtype))
    return jax.lax.dynamic_update_index_in_dim(ring, new, slot, axis=1)

  return LayerKV(
      sink_k=jnp.where(is_sink, k.astype(layer.sink_k.dtype), layer.sink_k),
      sink_v=jnp.where(is_sink, v.astype(layer.sink_v.dtype), layer.sink_v),
      ring_k=put(layer.ring_k, k),
      ring_v=put(layer.ring_v, v))
