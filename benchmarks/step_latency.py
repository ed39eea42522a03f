"""Per-latent-frame latency of `Generator.step` (1NFE, KV cache) deep into a
stream, against recomputing the whole window without a cache, in one run.

  python benchmarks/step_latency.py [--configs tiny,atari,bar,bar32,peer,peer_kv] [--frames 1440]
      [--baseline DIR]

`bar` is the peer-comparison shape (dim 256, 8 layers, 4 heads, ffn 1024, 64
tokens per latent frame, fp32, window 8); `bar32` the same with a window of 32.
`peer` is the peer's full setting (Self-Forcing's causal Wan at these dims):
the same with window 20 and 512 text tokens of width 64, every step projecting
the text's keys/values in every layer; `peer_kv` the same with the prompt's
TextKV computed once (`with_text_kv`) as a stream does. Each step runs the
real stream: frame 1440 is reached by 1440 committed steps, on the params
split per layer once (`layer_by_layer`) and jitted with a stream's compile
options (`stream_compiler_options`), as a stream does.

With peer and peer_kv, an interleaved comparison at the last frame (the
steps alternate, so both see the same machine load) also times the step of
an earlier checkout at the peer setting when `--baseline` names one, e.g.
`git archive de44aff aapt_jax configs | tar -x -C /tmp/base` (the step before
its speed-up): text per step, and, where that checkout has `with_text_kv`
and `layer_by_layer`, its text keys/values once on per-layer params too. Its
modules are imported under their own objects in this process.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import config_names, device_line  # noqa: E402
from aapt_jax import load_config  # noqa: E402
from aapt_jax import models as models_now  # noqa: E402
from aapt_jax.models import (Conditioning, build_generator, init_params, layer_by_layer,  # noqa: E402
                             stream_compiler_options, with_text_kv)

PEER = {"model.window_frames": 20, "model.text_dim": 64}
# name: (config, overrides, text tokens, text keys/values once per prompt)
CONFIGS = {
    "tiny": ("configs/tiny.py", {}, 8, False),
    "atari": ("configs/atari.py", {}, 8, False),
    "bar": ("configs/base.py", {"model.window_frames": 8}, 8, False),
    "bar32": ("configs/base.py", {"model.window_frames": 32}, 8, False),
    "peer": ("configs/base.py", PEER, 512, False),
    "peer_kv": ("configs/base.py", PEER, 512, True),
}


def rss_mib():
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS"):
        return int(line.split()[1]) / 1024
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_config(name, frames, repeats):
  path, overrides, text_tokens, text_once = CONFIGS[name]
  config = load_config(os.path.join(ROOT, path), overrides)
  model = build_generator(config)
  s = model.spec
  params = nn.meta.unbox(init_params(model, jax.random.key(0)))
  h, w = s.latent_size
  rng = np.random.default_rng(0)

  def cond_for(t):
    return Conditioning(
        previous=jnp.asarray(rng.standard_normal((1, t, h, w, s.latent_channels)), jnp.float32),
        text=jnp.asarray(rng.standard_normal((1, text_tokens, s.text_dim)), jnp.float32)
        if s.text_dim else None,
        actions=jnp.zeros((1, t), jnp.int32) if s.num_actions else None,
        controls=jnp.zeros((1, t, s.control_dim)) if s.control_dim else None)

  stepper, step_params = layer_by_layer(model, params)  # once per stream
  step = jax.jit(lambda p, x, t, c, cache: stepper.apply(p, x, t, c, cache, method="step"),
                 donate_argnums=4, compiler_options=stream_compiler_options())
  noise = jnp.asarray(rng.standard_normal((1, 1, h, w, s.latent_channels)), jnp.float32)
  one = jnp.ones((1, 1))
  cond1 = cond_for(1)
  if text_once:  # once per prompt, outside the timed steps (as a stream does at start)
    cond1 = with_text_kv(stepper, step_params["params"], cond1)
  cache = model.init_cache(1)
  compiled = step.lower(step_params, noise, one, cond1, cache).compile()
  mem = compiled.memory_analysis()
  temp_mib = getattr(mem, "temp_size_in_bytes", 0) / 2**20 if mem else float("nan")
  cache_mib = sum(a.nbytes for a in jax.tree.leaves(cache)) / 2**20

  n = s.window_frames
  marks = sorted({1, n, 4 * n, frames})
  lat = {}
  rss = {}
  frame = 0
  while frame < frames + repeats:
    t0 = time.perf_counter()
    v, cache = step(step_params, noise, one, cond1, cache)
    v.block_until_ready()
    dt = (time.perf_counter() - t0) * 1e3
    frame += 1
    for m in marks:
      if m <= frame < m + repeats:
        lat.setdefault(m, []).append(dt)
        if frame == m:
          rss[m] = rss_mib()
  assert int(cache.counter) == frame

  # Baseline: recompute the whole window (sink + N previous + current) without a cache.
  t = n + 2
  call = jax.jit(lambda p, x, ts, c: model.apply(p, x, ts, c))
  xs = jnp.asarray(rng.standard_normal((1, t, h, w, s.latent_channels)), jnp.float32)
  ts = jnp.ones((1, t))
  condt = cond_for(t)
  call(params, xs, ts, condt).block_until_ready()
  base = []
  for _ in range(max(3, repeats // 2)):
    t0 = time.perf_counter()
    call(params, xs, ts, condt).block_until_ready()
    base.append((time.perf_counter() - t0) * 1e3)
  return dict(name=name, tokens=s.tokens_per_frame, window=n, dims=f"{s.dim}x{s.num_layers}",
              lat={m: float(np.median(v)) for m, v in lat.items()},
              recompute=float(np.median(base)), cache_mib=cache_mib, temp_mib=temp_mib,
              rss=rss, marks=marks, compiles=step._cache_size())


def import_baseline(src):
  """(load_config, aapt_jax.models) of the checkout `src`, imported under their
  own module objects (this tree's modules are put back afterwards)."""
  import importlib
  mine = lambda name: name == "aapt_jax" or name.startswith("aapt_jax.")
  ours = {k: sys.modules.pop(k) for k in list(sys.modules) if mine(k)}
  sys.path.insert(0, os.path.abspath(src))
  try:
    pkg, models = importlib.import_module("aapt_jax"), importlib.import_module("aapt_jax.models")
    if not os.path.abspath(pkg.__file__).startswith(os.path.abspath(src)):
      raise ValueError(f"--baseline {src}: aapt_jax was imported from {pkg.__file__}")
  finally:
    sys.path.remove(os.path.abspath(src))
    for k in [k for k in sys.modules if mine(k)]:
      del sys.modules[k]
    sys.modules.update(ours)
  return pkg.load_config, models


def peer_step(load, models, text_once, split, frame, root=ROOT):
  """The peer setting's jitted step, its inputs and a cache at `frame` (the
  cost of a step does not depend on what the cache holds)."""
  path, overrides, text_tokens, _ = CONFIGS["peer"]
  model = models.build_generator(load(os.path.join(root, path), overrides))
  s = model.spec
  params = nn.meta.unbox(models.init_params(model, jax.random.key(0)))
  rng = np.random.default_rng(0)
  h, w = s.latent_size
  x = jnp.asarray(rng.standard_normal((1, 1, h, w, s.latent_channels)), jnp.float32)
  cond = models.Conditioning(previous=x, text=jnp.asarray(
      rng.standard_normal((1, text_tokens, s.text_dim)), jnp.float32))
  if split:  # once per stream
    model, params = models.layer_by_layer(model, params)
  if text_once:  # once per prompt
    cond = models.with_text_kv(model, params["params"], cond)
  # a stream's compile options where the checkout has them (an older baseline: its defaults)
  options = getattr(models, "stream_compiler_options", dict)()
  step = jax.jit(lambda p, x, c, k: model.apply(p, x, jnp.ones((1, 1)), c, k, method="step"),
                 donate_argnums=3, compiler_options=options)
  cache = model.init_cache(1).replace(counter=jnp.int32(frame))
  return step, params, x, cond, cache


def interleaved(frame, steps, baseline=None):
  """The peer step variants at `frame` (a full window), their steps
  interleaved so that all see the same machine load: {label: (median ms, min ms)}."""
  runs = {"text per step": peer_step(load_config, models_now, False, True, frame),
          "text K/V once": peer_step(load_config, models_now, True, True, frame)}
  if baseline:
    load, models = import_baseline(baseline)
    before = {"baseline (text per step)": peer_step(load, models, False, False, frame)}
    if hasattr(models, "with_text_kv") and hasattr(models, "layer_by_layer"):
      before["baseline (text K/V once)"] = peer_step(load, models, True, True, frame)
    runs = {**before, **runs}
  runs = {k: [*r, []] for k, r in runs.items()}
  for _ in range(steps + 3):  # 3 warm-up steps
    for r in runs.values():
      t0 = time.perf_counter()
      v, r[4] = r[0](r[1], r[2], r[3], r[4])
      v.block_until_ready()
      r[5].append((time.perf_counter() - t0) * 1e3)
  return {k: (float(np.median(r[5][3:])), min(r[5][3:])) for k, r in runs.items()}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--configs", default="tiny,atari,bar,bar32,peer,peer_kv")
  ap.add_argument("--frames", type=int, default=1440)
  ap.add_argument("--repeats", type=int, default=20, help="steps timed at each mark")
  ap.add_argument("--interleaved", type=int, default=60,
                  help="steps of each variant in the interleaved comparison")
  ap.add_argument("--baseline", default="",
                  help="a checkout of an earlier commit (with aapt_jax/ and configs/) whose "
                       "peer step joins the interleaved comparison")
  args = ap.parse_args()
  names = config_names(args.configs, CONFIGS)
  print(device_line())
  rows = [bench_config(n, args.frames, args.repeats) for n in names]
  head = (f"{'config':<7} {'DxL':>7} {'tok/f':>5} {'N':>3} | "
          + " ".join(f"{'f' + str(m):>8}" for m in ("1", "N", "4N", str(args.frames)))
          + f" | {'flat':>5} | {'recompute':>9} {'ratio':>6} | {'cache':>7} {'temp':>7} "
          f"{'RSS@4N':>7} {'RSS@end':>7} | jit")
  print(head)
  print("-" * len(head))
  for r in rows:
    ms = [r["lat"][m] for m in r["marks"]]
    while len(ms) < 4:
      ms.insert(0, ms[0])
    flat = r["lat"][args.frames] / r["lat"][4 * r["window"]]
    print(f"{r['name']:<7} {r['dims']:>7} {r['tokens']:>5} {r['window']:>3} | "
          + " ".join(f"{m:>6.2f}ms" for m in ms)
          + f" | {flat:>5.2f} | {r['recompute']:>7.2f}ms {r['recompute'] / r['lat'][args.frames]:>5.1f}x"
          f" | {r['cache_mib']:>5.1f}Mi {r['temp_mib']:>5.1f}Mi {r['rss'][4 * r['window']]:>5.0f}Mi"
          f" {r['rss'][args.frames]:>5.0f}Mi | {r['compiles']}")
  by_name = {r["name"]: r for r in rows}
  if "peer" in by_name and "peer_kv" in by_name:
    a, b = by_name["peer"]["lat"], by_name["peer_kv"]["lat"]
    print("peer / peer_kv (text keys/values once per prompt): "
          + ", ".join(f"f{m}: {a[m] / b[m]:.2f}x" for m in sorted(a) if m in b))
    ab = interleaved(args.frames, args.interleaved, args.baseline)
    print(f"interleaved at frame {args.frames} ({args.interleaved} steps each, same load): "
          + ", ".join(f"{k} median {med:.2f} ms (min {lo:.2f})" for k, (med, lo) in ab.items()))
    ref = "baseline (text per step)" if args.baseline else "text per step"
    print(f"speed-up over {ref} (median): "
          + ", ".join(f"{k} {ab[ref][0] / med:.2f}x" for k, (med, _) in ab.items() if k != ref))
    if "baseline (text K/V once)" in ab:
      print(f"text K/V once, this tree over the baseline's (median): "
            f"{ab['baseline (text K/V once)'][0] / ab['text K/V once'][0]:.2f}x")
  print("latency: median ms per latent frame (one step = one forward, 1NFE) at that frame;"
        " flat = last / 4N; recompute = one forward over sink + N + current without a cache;"
        " ratio = recompute / cached at the last frame; cache = KV cache size; temp = XLA"
        " scratch of the step; jit = step compilations.")


if __name__ == "__main__":
  main()
