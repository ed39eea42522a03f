"""The GPU check, kept ready: one script sized for ~8 minutes on one H100/H200.

  python benchmarks/gpu_check.py [--tiny] [--only streaming,stage1,stage3,atari]
                                 [--budget_s 480] [--steps 10]

Prints, on the first device:
  streaming  `Generator.step` latency (batch 1, bf16 params and compute, random
             weights, the KV cache at a full window, 512 text tokens with the
             prompt's text keys/values computed once) of configs/wan2_1_1_3b.py
             at 832x480 and configs/aapt_8b.py at 736x416; latent frames/s and
             video frames/s (x the VAE's frames per latent frame; the generator
             alone, no decode). The paper: 8B at 24.8 video fps on one H100.
  stage1     the stage-1 step (`make_diffusion_step`) of the 1.3B at one sample,
  stage3     the stage-3 step (`make_adversarial_step`) of the 1.3B at one sample:
             step time, the compiled program's memory (arguments + outputs -
             aliased + temp), and the device's peak bytes in use so far (a
             running maximum over the whole process, when the device reports it).
  atari      configs/atari.py stage-1 training steps/s at its batch size.

A section that fails (e.g. out of memory) prints its error and the rest go on;
sections not started within --budget_s seconds are skipped. --tiny runs the
same code paths with configs/tiny.py sizes on any device (the test does, on CPU).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from common import device_line, random_batch  # noqa: E402
from aapt_jax import load_config, parallel  # noqa: E402
from aapt_jax.models import Conditioning, build_generator, init_params, with_text_kv  # noqa: E402
from aapt_jax.training.program import build_train_program, with_stage  # noqa: E402

SECTIONS = ("streaming", "stage1", "stage3", "atari")
BF16 = {"model.dtype": "bfloat16", "model.param_dtype": "bfloat16"}
TINY_TRAIN = {"train.batch_size": 1, "train.clip_frames": 4, "adversarial.rollout_frames": 4,
              "adversarial.segment_frames": 2, "adversarial.segment_overlap": 1}


def plan(tiny: bool) -> dict:
  """section -> [(label, config path, overrides)]; the --tiny plan uses the tiny sizes."""
  if tiny:
    small = ("tiny", "configs/tiny.py", {})
    return {"streaming": [("tiny bf16", "configs/tiny.py", BF16)],
            "stage1": [(*small[:2], TINY_TRAIN)], "stage3": [(*small[:2], TINY_TRAIN)],
            "atari": [("tiny", "configs/tiny.py", {"train.clip_frames": 4})]}
  one = {"train.batch_size": 1, "mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1}
  return {"streaming": [("wan2_1_1_3b 832x480", "configs/wan2_1_1_3b.py", BF16),
                        ("aapt_8b 736x416", "configs/aapt_8b.py", BF16)],
          "stage1": [("wan2_1_1_3b 832x480", "configs/wan2_1_1_3b.py", one)],
          "stage3": [("wan2_1_1_3b 832x480", "configs/wan2_1_1_3b.py", one)],
          "atari": [("atari", "configs/atari.py", {})]}


def _median_ms(fn, steps):
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(times)


def _peak_gib():
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return float("nan") if peak is None else peak / 2**30


def _program_gib(compiled):
  m = compiled.memory_analysis()
  if m is None:
    return float("nan")
  return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
          + m.temp_size_in_bytes) / 2**30


def streaming(label, path, overrides, steps, text_len=512):
  config = load_config(os.path.join(ROOT, path), overrides)
  model = build_generator(config)
  s = model.spec
  t0 = time.perf_counter()
  params = jax.jit(lambda r: nn.meta.unbox(init_params(model, r))["params"])(jax.random.key(0))
  h, w = s.latent_size
  rng = np.random.default_rng(0)
  latent = jnp.asarray(rng.standard_normal((1, 1, h, w, s.latent_channels)), jnp.float32)
  cond = Conditioning(
      previous=latent,
      text=jnp.asarray(rng.standard_normal((1, text_len, s.text_dim)), jnp.float32)
      if s.text_dim else None,
      actions=jnp.zeros((1, 1), jnp.int32) if s.num_actions else None,
      controls=jnp.zeros((1, 1, s.control_dim)) if s.control_dim else None)
  cond = jax.jit(lambda p, c: with_text_kv(model, p, c))(params, cond)
  # a full window: the step's cost does not depend on what the cache holds
  cache = model.init_cache(1).replace(counter=jnp.int32(s.window_frames + 2))
  step = jax.jit(lambda p, x, c, k: model.apply({"params": p}, x, jnp.ones((1, 1)), c, k,
                                               method="step"), donate_argnums=3)
  compiled = step.lower(params, latent, cond, cache).compile()
  setup_s = time.perf_counter() - t0
  state = {"cache": cache}

  def one():
    v, state["cache"] = compiled(params, latent, cond, state["cache"])
    return v

  jax.block_until_ready(one())
  ms = _median_ms(one, steps)
  per_latent = 2 ** sum(bool(x) for x in config.vae.temperal_downsample)
  return (f"{label:<22} {s.dim}x{s.num_layers} tok/f {s.tokens_per_frame:>5} N {s.window_frames:>2}"
          f" | {ms:8.2f} ms/latent frame  {1e3 / ms:7.2f} latent f/s  "
          f"{per_latent * 1e3 / ms:7.2f} video fps | setup {setup_s:.0f}s")


def train_step(label, path, overrides, steps, adversarial=False):
  """(row text, steps/s) of the stage-1 (or stage-3) step, state donated."""
  config = load_config(os.path.join(ROOT, path), overrides)
  mesh = parallel.make_mesh(config.mesh, jax.devices()[:1])
  t0 = time.perf_counter()
  program = build_train_program(with_stage(config, "adversarial" if adversarial
                                           else "diffusion"), mesh)
  model = program.model
  with jax.set_mesh(mesh):
    state = program.init_state(0)
  batch = jax.device_put(random_batch(config, model.spec, np.random.default_rng(0), 512,
                                     adversarial), program.batch_sharding)
  with jax.set_mesh(mesh):
    compiled = program.step.lower(state, batch).compile()
    setup_s = time.perf_counter() - t0
    program_gib = _program_gib(compiled)
    holder = {"state": state}

    def one():
      holder["state"], metrics = compiled(holder["state"], batch)
      return metrics

    jax.block_until_ready(one())
    ms = _median_ms(one, steps)
  s = model.spec
  row = (f"{label:<22} {s.dim}x{s.num_layers} batch {int(config.train.batch_size)} | "
         f"{ms / 1e3:8.3f} s/step  {1e3 / ms:7.2f} steps/s | program {program_gib:8.3f} GiB  "
         f"device peak so far {_peak_gib():8.3f} GiB | setup {setup_s:.0f}s")
  return row, 1e3 / ms


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--tiny", action="store_true", help="tiny sizes (any device; the CPU test)")
  ap.add_argument("--only", default=",".join(SECTIONS))
  ap.add_argument("--budget_s", type=float, default=480.0)
  ap.add_argument("--steps", type=int, default=10, help="timed steps per row")
  args = ap.parse_args(argv)
  only = args.only.split(",")
  for name in only:
    if name not in SECTIONS:
      raise SystemExit(f"unknown section {name!r}; choose from {SECTIONS}")
  print(device_line(), flush=True)
  start = time.perf_counter()
  results = {}
  for section, rows in plan(args.tiny).items():
    if section not in only:
      continue
    print(f"\n[{section}]", flush=True)
    for label, path, overrides in rows:
      if time.perf_counter() - start > args.budget_s:
        print(f"{label:<22} skipped: past --budget_s {args.budget_s:.0f}s", flush=True)
        continue
      try:
        if section == "streaming":
          row = streaming(label, path, overrides, args.steps)
        else:
          row, rate = train_step(label, path, overrides, args.steps,
                                 adversarial=section == "stage3")
          results[(section, label)] = rate
      except Exception as e:  # noqa: BLE001  (an OOM must not stop the other rows)
        row = f"{label:<22} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
      results.setdefault(section, []).append(row)
      print(row, flush=True)
  print(f"\ntotal {time.perf_counter() - start:.0f}s", flush=True)
  return results


if __name__ == "__main__":
  main()
