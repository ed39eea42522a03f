"""The fixed-shape KV cache of block-causal generation.

Per layer: the sink block's self-attention keys/values (block 0, the first
frame) and a ring of the N previous blocks (block j >= 1 lives in slot
(j - 1) mod N), plus one int32 frame counter (the index of the next block)
held as an array. Shapes never depend on how many frames were generated, so
`Generator.step` compiles once and runs at constant time and memory forever.

Layout: one array per layer (not one stacked [L, ...] array), heads-major
([B, H, ...]). A streaming step then reads every layer's keys in place and
updates one ring slot per layer in place (with the cache donated); slicing a
stacked array per layer would copy the whole ring every frame. (A scanned
model stacks the layers' caches for its scan: streams step the unscanned
model of `generator.layer_by_layer`.)

Keys are stored after the q/k norm and the spatial rotary rotation, and
rotated by their block's absolute index j (`rope.absolute_rotation`, exact
for any int32 index; the sink, j = 0, is unrotated): a step rotates its
query by its own index i, so <R(i) q, R(j) k> sees the distance i - j and
the ring is read as stored, never re-rotated per frame (see
`attention.block_causal_attention`).
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from aapt_jax.models.rope import absolute_rotation, rotate_with


@flax.struct.dataclass
class LayerKV:
  sink_k: jax.Array   # [B, H, P, Dh]
  sink_v: jax.Array   # [B, H, P, Dh]
  ring_k: jax.Array   # [B, H, N, P, Dh]
  ring_v: jax.Array   # [B, H, N, P, Dh]


@flax.struct.dataclass
class KVCache:
  layers: tuple       # one LayerKV per layer
  counter: jax.Array  # int32 []: index of the next block (0 = the sink comes next)

  @property
  def window(self) -> int:
    return self.layers[0].ring_k.shape[2]

  @property
  def batch_size(self) -> int:
    return self.layers[0].ring_k.shape[0]

  def stacked(self) -> LayerKV:
    """All layers stacked on a leading axis (a copy), for a scanned model."""
    return jax.tree.map(lambda *a: jnp.stack(a), *self.layers)


def init_cache(num_layers, batch_size, window, tokens_per_frame, num_heads, head_dim,
               dtype=jnp.float32) -> KVCache:
  sink = (batch_size, num_heads, tokens_per_frame, head_dim)
  ring = (batch_size, num_heads, window, tokens_per_frame, head_dim)
  # distinct buffers, so that a jitted step may donate the cache
  layers = tuple(LayerKV(jnp.zeros(sink, dtype), jnp.zeros(sink, dtype),
                         jnp.zeros(ring, dtype), jnp.zeros(ring, dtype))
                 for _ in range(num_layers))
  return KVCache(layers=layers, counter=jnp.zeros((), jnp.int32))


def ring_block_indices(counter, window):
  """Block index held by each ring slot [N] (<= 0 where the slot is empty)."""
  last = counter - 1
  return last - jnp.mod(last - 1 - jnp.arange(window), window)


def write_block(cache: KVCache, new_kv, theta: float) -> KVCache:
  """Writes block `cache.counter`'s keys/values and advances the counter.

  new_kv: one (k, v) pair per layer, each [B, H, P, Dh], the keys without a
  temporal rotation; they are stored at R(counter) (theta: the model's
  `rope_theta`). Block 0 becomes the
  sink; block j >= 1 overwrites ring slot (j - 1) mod N, the oldest block,
  which has just left the window. One block per layer is written, so a
  donated cache is updated in place.
  """
  counter = cache.counter
  is_sink = counter == 0
  slot = jnp.mod(counter - 1, cache.window)
  here = absolute_rotation(counter, cache.layers[0].ring_k.shape[-1], theta)  # R(counter)

  def put(ring, new):
    old = jax.lax.dynamic_index_in_dim(ring, slot, axis=2, keepdims=False)
    new = jnp.where(is_sink, old, new.astype(ring.dtype))
    return jax.lax.dynamic_update_index_in_dim(ring, new, slot, axis=2)

  layers = tuple(
      LayerKV(sink_k=jnp.where(is_sink, k.astype(layer.sink_k.dtype), layer.sink_k),
              sink_v=jnp.where(is_sink, v.astype(layer.sink_v.dtype), layer.sink_v),
              ring_k=put(layer.ring_k, rotate_with(k, *here)), ring_v=put(layer.ring_v, v))
      for layer, (k, v) in zip(cache.layers, new_kv))
  return KVCache(layers=layers, counter=counter + 1)
