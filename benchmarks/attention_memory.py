"""Compiled temporary memory of block-causal attention's gradient versus
tokens per latent frame P: the custom-VJP attention (models/attention.py)
against the plain-autodiff one it replaced (tests/attention_reference.py),
measured in the same run.

  python benchmarks/attention_memory.py [--tokens 16,64,256] [--frames 8] [--window 3]
                                        [--chunk 64] [--generator_sizes 4,8,16]

Two tables: (1) the gradient of sum(attention * w) w.r.t. q, k, v at
[1, T, P, 2, 32]; (2) the stage-1 loss gradient (flow matching, w.r.t. the
parameters) of configs/tiny.py with latent_size = (s, s), i.e. P = s^2 / 4
tokens per frame. Memory is XLA's `memory_analysis().temp_size_in_bytes` of
the compiled program (exact for the program, independent of machine load).
"x" columns: temp bytes relative to the first row. Linear in P means x = P / P0.
"""
from __future__ import annotations

import argparse
import os
import sys
from unittest import mock

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from aapt_jax import load_config  # noqa: E402
from aapt_jax.models import attention, build_generator, init_params  # noqa: E402
from aapt_jax.objectives import flow_matching  # noqa: E402
from attention_reference import reference_block_causal_attention  # noqa: E402
from benchmarks.common import device_line  # noqa: E402


def temp_bytes(fn, *args) -> int:
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def attention_grad_bytes(attend, frames: int, tokens: int, window: int, heads=2, head_dim=32):
  shape = (1, frames, tokens, heads, head_dim)
  q = jax.ShapeDtypeStruct(shape, jnp.float32)

  def loss(q, k, v, w):
    return jnp.sum(attend(q, k, v, counter=0, window=window, theta=10000.0) * w)

  return temp_bytes(jax.grad(loss, argnums=(0, 1, 2)), q, q, q, q)


def generator_grad_bytes(attend, size: int, frames: int):
  config = load_config(os.path.join(ROOT, "configs/tiny.py"), {"model.latent_size": (size, size)})
  model = build_generator(config)
  params = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))["params"]
  s = model.spec
  latents = jax.ShapeDtypeStruct((1, frames, size, size, s.latent_channels), jnp.float32)

  def loss(params, latents):
    noisy, t, previous, noise = flow_matching.teacher_forcing_inputs(latents, jax.random.key(0), 3.0)
    from aapt_jax.models import Conditioning
    v = model.apply({"params": params}, noisy, t, Conditioning(previous=previous))
    return flow_matching.loss(v, flow_matching.velocity_target(latents, noise))

  with mock.patch.object(attention, "block_causal_attention", attend):
    return temp_bytes(jax.grad(loss), params, latents)


def _table(title, key, rows):
  print(f"\n{title}")
  print(f"{key:>8} {'new MiB':>10} {'x':>6} {'reference MiB':>14} {'x':>6} {'ref/new':>8}")
  n0, r0 = rows[0][1], rows[0][2]
  for p, new, ref in rows:
    print(f"{p:>8} {new / 2**20:>10.2f} {new / n0:>6.2f} {ref / 2**20:>14.2f} {ref / r0:>6.2f} "
          f"{ref / new:>8.2f}")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--tokens", default="16,64,256", help="tokens per frame P (table 1)")
  ap.add_argument("--frames", type=int, default=8)
  ap.add_argument("--window", type=int, default=3)
  ap.add_argument("--chunk", type=int, default=attention.QUERY_CHUNK,
                  help="query_chunk of the new attention in table 1")
  ap.add_argument("--generator_sizes", default="8,16", help="latent h = w of configs/tiny.py (table 2)")
  args = ap.parse_args()
  print(device_line())
  new = lambda *a, **k: attention.block_causal_attention(*a, **k, query_chunk=args.chunk)
  rows = []
  for p in (int(x) for x in args.tokens.split(",")):
    rows.append((p, attention_grad_bytes(new, args.frames, p, args.window),
                 attention_grad_bytes(reference_block_causal_attention, args.frames, p, args.window)))
  _table(f"attention gradient, T={args.frames}, N={args.window}, H=2, Dh=32, "
         f"query_chunk={args.chunk}: temp memory vs P", "P", rows)
  rows = []
  for size in (int(x) for x in args.generator_sizes.split(",")):
    rows.append(((size // 2) ** 2,
                 generator_grad_bytes(attention.block_causal_attention, size, args.frames),
                 generator_grad_bytes(reference_block_causal_attention, size, args.frames)))
  _table(f"stage-1 loss gradient of configs/tiny.py, T={args.frames}, default query_chunk="
         f"{attention.QUERY_CHUNK}: temp memory vs P", "P", rows)


if __name__ == "__main__":
  main()
