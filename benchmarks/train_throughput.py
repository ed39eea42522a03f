"""Stage-1 training throughput on this machine: steps/s, tokens/s and
model-FLOPs utilisation against a matmul peak measured in the same run.

  python benchmarks/train_throughput.py [--configs tiny,atari] [--steps 20]

One device, no fake devices. Each config's stage-1 step (`build_train_program`'s
jitted, donated step, as the trainer runs it) is timed over
`--steps` steps after a warm-up, with one host sync at the end.

FLOPs per step come from `compiled.cost_analysis()["flops"]` of the step.
XLA's cost analysis counts a while loop's body once, so when the config scans
its layers (`model.scan_layers`) the same step is also compiled with the
layers unrolled and that count is used (the two programs do the same
arithmetic). As a cross-check the table shows the analytic estimate
6 x params x tokens + attention (block-causal: each frame's queries against
the sink and up to N + 1 frames, x 3 for forward + backward). MFU =
FLOPs per step x steps/s / peak; the peak is the best of a few large fp32
matmuls (2 n^3 FLOPs each) timed in this process.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import config_names, device_line, random_batch  # noqa: E402
from aapt_jax import load_config, parallel  # noqa: E402
from aapt_jax.training.program import build_train_program  # noqa: E402

CONFIGS = {"tiny": "configs/tiny.py", "atari": "configs/atari.py"}
TEXT_LEN = 8  # text tokens per sample when the config has text


def matmul_peak(sizes=(1024, 2048, 3072), repeats=5):
  """Best fp32 matmul FLOP/s over a few sizes: (flops/s, n)."""
  best = (0.0, 0)
  for n in sizes:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      f(a, b).block_until_ready()
      times.append(time.perf_counter() - t0)
    rate = 2 * n**3 / min(times)
    if rate > best[0]:
      best = (rate, n)
  return best


def flops_of(compiled):
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else {}
  return float((ca or {}).get("flops", float("nan")))


def analytic_flops(config, spec, params):
  """6 x params x tokens + block-causal (and text cross-) attention, fwd + bwd."""
  b, t = int(config.train.batch_size), int(config.train.clip_frames)
  p, d, n = spec.tokens_per_frame, spec.dim, spec.window_frames
  tokens = b * t * p
  # Frame i's queries attend the sink and frames max(1, i - N) .. i.
  key_frames = sum(1 + min(i, n + 1) for i in range(t))
  attn = 4 * p * p * d * key_frames * b * spec.num_layers          # QK^T and PV, forward
  if spec.text_dim:
    attn += 4 * tokens * TEXT_LEN * d * spec.num_layers
  return 6 * params * tokens + 3 * attn


def bench(name, steps):
  config = load_config(os.path.join(ROOT, CONFIGS[name]), {"stage": "diffusion"})
  mesh = parallel.make_mesh(config.mesh, jax.devices()[:1])
  program = build_train_program(config, mesh)
  spec = program.model.spec
  batch = random_batch(config, spec, np.random.default_rng(0), TEXT_LEN)
  batch = jax.device_put(batch, program.batch_sharding)
  params = program.param_count()

  with jax.set_mesh(mesh):
    state = program.init_state()
    t0 = time.perf_counter()
    compiled = program.step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    flops = flops_of(compiled)
    flops_src = "compiled"
    if spec.scan_layers:
      uconfig = load_config(os.path.join(ROOT, CONFIGS[name]),
                            {"stage": "diffusion", "model.scan_layers": False})
      unrolled = build_train_program(uconfig, mesh)
      scanned_flops = flops
      flops = flops_of(unrolled.step.lower(unrolled.abstract_state, batch).compile())
      flops_src = (f"the unrolled step (the scanned step's cost_analysis counts the layer "
                   f"body once: {scanned_flops / 1e9:.4g} GF)")

    state, m = compiled(state, batch)                      # warm-up
    float(m["loss"])
    t0 = time.perf_counter()
    for _ in range(steps):
      state, m = compiled(state, batch)
    loss = float(m["loss"])                                 # the one host sync
    dt = (time.perf_counter() - t0) / steps
  b, t = int(config.train.batch_size), int(config.train.clip_frames)
  tokens = b * t * spec.tokens_per_frame
  return dict(name=name, params=params, dims=f"{spec.dim}x{spec.num_layers}", batch=b, frames=t,
              tok_frame=spec.tokens_per_frame, tokens=tokens, step_s=dt, flops=flops,
              flops_src=flops_src, analytic=analytic_flops(config, spec, params),
              compile_s=compile_s, loss=loss, remat=spec.remat)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--configs", default="tiny,atari")
  ap.add_argument("--steps", type=int, default=20, help="timed steps per config")
  args = ap.parse_args()
  names = config_names(args.configs, CONFIGS)
  print(device_line())
  peak, n = matmul_peak()
  print(f"matmul peak (fp32, best of {n}x{n} and others, same run): {peak / 1e9:.1f} GFLOP/s")
  rows = [bench(name, args.steps) for name in names]
  head = (f"{'config':<6} {'DxL':>7} {'params':>8} {'B':>2} {'T':>3} {'tok/f':>5} | "
          f"{'steps/s':>7} {'tokens/s':>9} | {'GF/step':>8} {'6N+attn':>8} {'ratio':>5} | "
          f"{'GFLOP/s':>8} {'MFU':>6} | compile")
  print(head)
  print("-" * len(head))
  for r in rows:
    rate = r["flops"] / r["step_s"]
    print(f"{r['name']:<6} {r['dims']:>7} {r['params'] / 1e6:>7.2f}M {r['batch']:>2} "
          f"{r['frames']:>3} {r['tok_frame']:>5} | {1 / r['step_s']:>7.2f} "
          f"{r['tokens'] / r['step_s']:>9.0f} | {r['flops'] / 1e9:>8.4g} "
          f"{r['analytic'] / 1e9:>8.4g} {r['flops'] / r['analytic']:>5.2f} | "
          f"{rate / 1e9:>8.1f} {rate / peak:>6.1%} | {r['compile_s']:.1f}s")
  print("tokens = B x T x tokens/frame per step; GF/step = XLA cost_analysis FLOPs of the step; "
        "6N+attn = analytic model FLOPs (ratio = XLA / analytic); MFU = achieved FLOP/s / "
        "matmul peak measured above.")
  for r in rows:
    print(f"  {r['name']}: FLOPs from {r['flops_src']}; remat={r['remat']}; "
          f"final loss {r['loss']:.4f}")


if __name__ == "__main__":
  main()
