"""configs/wan2_1_1_3b.py at 832x480: per-device training memory (AOT compile on
a fake CPU mesh, nothing allocated) and per-latent-frame latency predicted from
the compiled streaming step's FLOPs, next to configs/aapt_8b.py.

  python benchmarks/wan_1_3b.py [--devices 8] [--settings dp8,fsdp8,...]
                                [--stage3-settings fsdp8]

Memory: `jax.jit(step).lower(abstract state, abstract batch).compile()` of the
stage-1 step (`make_diffusion_step`) and the stage-3 step
(`make_adversarial_step`: student-forcing rollout, discriminator, R1/R2) on
`--devices` fake CPU devices; `compiled.memory_analysis()` per device (see
benchmarks/aot_8b.py for the columns; CPU buffer assignment is not an
accelerator's, so read these as estimates). Stage 3 uses the config's
adversarial defaults (16-frame rollouts, 8-frame segments, "recompute"
gradients, end to end).

Latency: `Generator.step` (one latent frame, batch 1, text 512 tokens, KV
cache of the full window, bf16) compiled for one device;
`compiled.cost_analysis()["flops"]` / (peak x MFU) on an H100 (989 TFLOP/s
bf16 dense) and a TPU v5p (459 TFLOP/s) at 40 % MFU. The ratio column is to
configs/aapt_8b.py measured in the same run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


# A stage-3 compile takes ~12 min here (2 shared CPU cores; stage 1: ~1.5 min).
STAGE3_SETTINGS = ("fsdp8",)


def _parse():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--devices", type=int, default=8, help="fake CPU devices")
  ap.add_argument("--settings", default="", help="comma-separated names from SETTINGS "
                  "(default: all)")
  ap.add_argument("--stage3-settings", default=",".join(STAGE3_SETTINGS),
                  help="settings whose stage-3 step is compiled too ('' = none)")
  ap.add_argument("--text-len", type=int, default=512, help="text tokens (umT5: 512)")
  ap.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation")
  return ap.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None:
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax  # noqa: E402
  jax.config.update("jax_num_cpu_devices", ARGS.devices)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from aot_8b import compile_stage3, compile_step, cpu_mesh, fmt_gib, mem_row  # noqa: E402
from common import device_line  # noqa: E402
from aapt_jax import load_config  # noqa: E402
from aapt_jax.models import Conditioning, abstract_params, build_generator  # noqa: E402
from aapt_jax.training import memory  # noqa: E402

WAN = os.path.join(ROOT, "configs", "wan2_1_1_3b.py")
AAPT_8B = os.path.join(ROOT, "configs", "aapt_8b.py")
PEAK_FLOPS = (("H100", 989e12), ("v5p", 459e12))  # bf16 dense, per chip

# name -> (config overrides, note); batch = one sample per device
SETTINGS = {
    "dp8": ({"train.batch_size": 8}, "data=8: params, AdamW, EMA replicated; 8 latent frames"),
    "fsdp8": ({"train.batch_size": 8, "mesh.data": 1, "mesh.fsdp": 8},
              "fsdp=8: the state sharded 8 ways; 8 latent frames"),
    "fsdp8_21": ({"train.batch_size": 8, "mesh.data": 1, "mesh.fsdp": 8,
                  "train.clip_frames": 21},
                 "fsdp=8, 21 latent frames (Wan's 81-frame clips)"),
}

def step_flops(path, text_len):
  """FLOPs of one streaming `Generator.step` (batch 1, full cache) of the config
  at `path`, from XLA's cost analysis, and the compile seconds.

  XLA counts a scanned layer once, so the step is compiled unrolled with 1 and
  2 layers: flops(L) = flops(1) + (L - 1) (flops(2) - flops(1)), exact for
  identical layers.
  """
  layers = int(load_config(path).model.num_layers)
  (f1, s1), (f2, s2) = (_unrolled_step_flops(
      load_config(path, {"model.num_layers": n, "model.scan_layers": False}), text_len)
      for n in (1, 2))
  return f1 + (layers - 1) * (f2 - f1), s1 + s2


def _unrolled_step_flops(config, text_len):
  model = build_generator(config)
  spec = model.spec
  params = abstract_params(config)
  h, w = spec.latent_size
  latent = jax.ShapeDtypeStruct((1, 1, h, w, spec.latent_channels), jnp.float32)
  t = jax.ShapeDtypeStruct((1, 1), jnp.float32)
  cond = Conditioning(
      previous=latent,
      text=jax.ShapeDtypeStruct((1, text_len, spec.text_dim), jnp.float32)
      if spec.text_dim else None,
      actions=jax.ShapeDtypeStruct((1, 1), jnp.int32) if spec.num_actions else None)
  cache = jax.eval_shape(lambda: model.init_cache(1))
  fn = jax.jit(lambda p, x, tt, c, k: model.apply({"params": p}, x, tt, c, k, method="step"))
  t0 = time.perf_counter()
  compiled = fn.lower(params, latent, t, cond, cache).compile()
  secs = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"]), secs


def memory_table(args):
  names = args.settings.split(",") if args.settings else list(SETTINGS)
  for n in names:
    if n not in SETTINGS:
      sys.exit(f"unknown setting {n!r}; choose from {sorted(SETTINGS)}")
  rows = []
  for name in names:
    overrides, note = SETTINGS[name]
    config = load_config(WAN, overrides)
    mesh = cpu_mesh(config, args.devices)
    stages = [("stage 1", lambda c=config, m=mesh: compile_step(c, m, args.text_len))]
    if name in args.stage3_settings.split(","):
      stages.append(("stage 3", lambda c=config, m=mesh: compile_stage3(c, m)))
    for stage, run in stages:
      try:
        compiled, secs, state_bytes = run()
      except Exception as e:  # noqa: BLE001 (report, go on)
        print(f"{name} {stage}: compile failed: {type(e).__name__}: {str(e)[:300]}")
        continue
      print(f"  compiled {name} {stage} in {secs:.0f}s", flush=True)
      rows.append(dict(name=name, stage=stage, shape=dict(mesh.shape), secs=secs,
                       state=state_bytes, mem=mem_row(compiled), note=note))
  head = (f"{'setting':<9} {'stage':<8} {'data':>4} {'fsdp':>4} | {'state':>7} {'arg':>7} "
          f"{'temp':>7} {'peak':>7} | {'/H100':>6} {'/v5p':>6} | compile")
  print(f"\nper-device memory, GiB, configs/wan2_1_1_3b.py at 832x480 (60x104 latents, "
        f"1560 tokens/frame), {args.devices} devices, text {args.text_len} tokens "
        "(compiled.memory_analysis())")
  print(head)
  print("-" * len(head))
  for r in rows:
    m, s = r["mem"], r["shape"]
    if m is None:
      print(f"{r['name']:<9} {r['stage']:<8} memory_analysis() unavailable")
      continue
    print(f"{r['name']:<9} {r['stage']:<8} {s['data']:>4} {s['fsdp']:>4} | "
          f"{fmt_gib(r['state'])} {fmt_gib(m['arg'])} {fmt_gib(m['temp'])} {fmt_gib(m['peak'])} | "
          f"{m['peak'] / memory.H100_BYTES:>6.2f} {m['peak'] / memory.TPU_V5P_BYTES:>6.2f} | "
          f"{r['secs']:.0f}s")
  for name in dict.fromkeys(r["name"] for r in rows):
    print(f"  {name}: {SETTINGS[name][1]}")


def latency_table(args):
  rows = []
  for label, path in (("wan2_1_1_3b", WAN), ("aapt_8b", AAPT_8B)):
    config = load_config(path)
    flops, secs = step_flops(path, args.text_len)
    print(f"  compiled the {label} step in {secs:.0f}s", flush=True)
    rows.append((label, config, flops))
  base = rows[-1][2]
  print(f"\npredicted per-latent-frame latency of Generator.step (1NFE, batch 1, window full, "
        f"text {args.text_len} tokens) at {args.mfu:.0%} MFU")
  head = (f"{'config':<12} {'tokens/frame':>12} {'window':>6} {'GFLOP/frame':>12} | "
          + " | ".join(f"{n} ms (frames/s)" for n, _ in PEAK_FLOPS) + " | vs aapt_8b")
  print(head)
  print("-" * len(head))
  for label, config, flops in rows:
    h, w = config.model.latent_size
    tokens = (h // 2) * (w // 2)
    cells = []
    for _, peak in PEAK_FLOPS:
      secs = flops / (peak * args.mfu)
      cells.append(f"{secs * 1e3:8.2f} ({1 / secs:5.1f})")
    print(f"{label:<12} {tokens:>12} {config.model.window_frames:>6} {flops / 1e9:>12.1f} | "
          + " | ".join(f"{c:>17}" for c in cells) + f" | {flops / base:>9.2f}")
  print("One latent frame = 4 video frames (Wan VAE): video fps = 4 x frames/s. The VAE "
        "decode is not included.")


def main():
  args = ARGS
  print(device_line())
  latency_table(args)
  memory_table(args)


if __name__ == "__main__":
  main()
