"""Scale proof for the 8B config: compile the stage-1 train step ahead of time
on a fake mesh of CPU devices (nothing is allocated) and read the compiled
program's memory per device, against H100 (80 GiB) and TPU v5p (95 GiB).

  python benchmarks/aot_8b.py [--devices 256] [--settings default,fsdp64,...]
                              [--tpu auto|off|only] [--text-len 512]

Each setting is `jax.jit(step).lower(abstract state, abstract batch).compile()`
of `make_diffusion_step` for configs/aapt_8b.py with some fields overridden
(mesh, remat, batch). `compiled.memory_analysis()` gives, per device: the
arguments (state + batch shard), outputs (new state, aliased to the donated
arguments), temporaries, generated code. Peak = arguments + outputs - aliased
+ temporaries (+ code). Where `libtpu` is importable, the same steps are also
compiled for a TPU v5p topology (`jax.experimental.topologies`), as maxtext's
`train_compile.py` does from CPU hosts, and both are printed.

For the TPU rows, libtpu (the version `jax[tpu]` pins for this jax; ~680 MB
unpacked) in a throwaway environment that shares the installed packages:

  python -m venv --system-site-packages /tmp/tpuvenv
  /tmp/tpuvenv/bin/pip install --no-deps "libtpu==0.0.42.*"    # jax 0.10.2
  /tmp/tpuvenv/bin/python benchmarks/aot_8b.py

libtpu prints warnings about TPU_ACCELERATOR_TYPE / TPU_WORKER_HOSTNAMES on a
host without TPUs; they are harmless here. A TPU compile of this step takes
7-13 min on 2 shared CPU cores (a CPU compile ~1-2 min), so only
TPU_SETTINGS are compiled for TPU by default.

Setting `s3` compiles the stage-3 step instead (`make_adversarial_step`:
student-forcing rollout, discriminator, R1/R2, G and D updates) with the
config's adversarial defaults; it is not in the default list (a long compile).
`s3_16`, `s3_8` and `s3_4` compile it on fsdp x tensor = 16, 8 and 4 devices
(data=1, one sample per device): the per-device memory depends on fsdp x
tensor only, so they find the smallest mesh stage 3 fits.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _parse():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--devices", type=int, default=256,
                  help="fake CPU devices (the settings use 32 to 256 of them)")
  ap.add_argument("--settings", default="",
                  help="comma-separated names from SETTINGS (default: all)")
  ap.add_argument("--tpu", default="auto", choices=("auto", "off", "only"),
                  help="auto: also compile for a TPU v5p topology where libtpu is importable; "
                  "only: TPU only, no CPU compile")
  ap.add_argument("--tpu-settings", default="",
                  help="settings also compiled for TPU (default: TPU_SETTINGS)")
  ap.add_argument("--text-len", type=int, default=512, help="text tokens (umT5: 512)")
  ap.add_argument("--dump", default="", help="directory for the compiled HLO text")
  return ap.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None:
  # Must happen before JAX initialises its backends.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax  # noqa: E402
  jax.config.update("jax_num_cpu_devices", ARGS.devices)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from aapt_jax import load_config, parallel  # noqa: E402
from aapt_jax.training import memory  # noqa: E402
from aapt_jax.training.program import build_train_program, with_stage  # noqa: E402

GiB = 2**30
LIMITS = (("H100", memory.H100_BYTES), ("v5p", memory.TPU_V5P_BYTES))

# name -> (devices, config overrides, note). Global batch = per-device batch x
# (data x fsdp) so that the per-device batch is what the row says.
SETTINGS = {
    "default": (256, {}, "configs/aapt_8b.py as is: batch 64 on 256 devices, "
                "data=8 x fsdp=8 x tensor=4, 1 sample/device"),
    "tp1": (64, {"mesh.tensor": 1}, "tensor=1 (the earlier default) on 64 devices, "
            "data=8 x fsdp=8, 1 sample/device"),
    "fsdp64": (64, {"mesh.tensor": 1, "mesh.fsdp": 64, "mesh.data": 1},
               "tensor=1, all 64 devices on fsdp"),
    "tp2": (128, {"mesh.tensor": 2}, "tensor=2 on 128 devices, 1 sample/device"),
    "tp2_b32": (64, {"mesh.tensor": 2, "train.batch_size": 32},
                "tensor=2 on 64 devices with batch 32, 1 sample/device"),
    "clip16": (64, {"mesh.tensor": 1, "train.clip_frames": 16}, "tensor=1, 16-frame clips"),
    "clip11": (64, {"mesh.tensor": 1, "train.clip_frames": 11}, "tensor=1, 11-frame clips"),
    "dots": (256, {"model.remat": "dots_saveable"},
             "the default mesh, remat keeping matmul outputs (attention scores too)"),
    "b2": (256, {"train.batch_size": 128}, "the default mesh, batch 128: 2 samples/device"),
    "32dev": (32, {}, "the defaults on only 32 devices: data=1, 8 samples/device"),
    # stage 3: params shard over fsdp x tensor only, so 64 devices with batch 16
    # hold per device exactly what the default 256 devices with batch 64 hold
    "s3": (64, {"stage": "adversarial", "train.batch_size": 16},
           "STAGE 3 with configs/aapt_8b.py's adversarial defaults (16-frame rollout, "
           "8-frame segments, recompute, end to end, remat full), data=2 x fsdp=8 x tensor=4, "
           "1 sample/device (per device = the default 256-device mesh's)"),
    # stage 3 on smaller meshes (1 sample/device, data=1): per-device memory
    # depends on fsdp x tensor only, so these find the smallest mesh it fits
    "s3_16": (16, {"stage": "adversarial", "train.batch_size": 4, "mesh.data": 1,
                   "mesh.fsdp": 4}, "STAGE 3 as s3 on fsdp=4 x tensor=4 (16 devices)"),
    "s3_8": (8, {"stage": "adversarial", "train.batch_size": 2, "mesh.data": 1,
                 "mesh.fsdp": 2}, "STAGE 3 as s3 on fsdp=2 x tensor=4 (8 devices)"),
    "s3_4": (4, {"stage": "adversarial", "train.batch_size": 1, "mesh.data": 1,
                 "mesh.fsdp": 1}, "STAGE 3 as s3 on tensor=4 alone (4 devices)"),
}
# stage 3 compiles for ~3-4 min here (205 s measured with D judging one clip per forward,
# 2 CPU cores shared with other compiles): only on request
DEFAULT_SETTINGS = tuple(n for n in SETTINGS if not n.startswith("s3"))
# A compile for a TPU topology takes 7-13 min here (2 shared CPU cores), five
# to ten times a CPU compile: by default only these settings are also compiled for
# TPU (`--tpu-settings` picks others).
TPU_SETTINGS = ("default", "tp1")


def abstract_batch(config, spec, mesh, text_len):
  """ShapeDtypeStructs of a stage-1 batch, sharded like the trainer's."""
  b, t = int(config.train.batch_size), int(config.train.clip_frames)
  h, w = spec.latent_size
  sh = parallel.batch_sharding(mesh)
  batch = {"latents": jax.ShapeDtypeStruct((b, t, h, w, spec.latent_channels), jnp.float32,
                                           sharding=sh)}
  if spec.num_actions:
    batch["actions"] = jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=sh)
  if spec.text_dim:
    batch["text_embedding"] = jax.ShapeDtypeStruct((b, text_len, spec.text_dim), jnp.float32,
                                                   sharding=sh)
    batch["text_mask"] = jax.ShapeDtypeStruct((b, text_len), jnp.bool_, sharding=sh)
  return batch


def compile_step(config, mesh, text_len, dump=""):
  """AOT-compile the stage-1 step on `mesh`; returns (compiled, seconds, state bytes)."""
  program = build_train_program(with_stage(config, "diffusion"), mesh)
  batch = abstract_batch(config, program.model.spec, mesh, text_len)
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = program.step.lower(program.abstract_state, batch).compile()
  secs = time.perf_counter() - t0
  if dump:
    os.makedirs(dump, exist_ok=True)
    with open(os.path.join(dump, f"{mesh.devices.size}_{config.model.remat}.hlo.txt"), "w") as f:
      f.write(compiled.as_text())
  state_bytes = parallel.per_device_bytes(program.abstract, program.shardings)
  return compiled, secs, state_bytes


def compile_stage3(config, mesh):
  """AOT-compile the stage-3 step (`make_adversarial_step`: student-forcing
  rollout, discriminator, R1/R2, G and D updates); returns (compiled,
  seconds, state bytes)."""
  program = build_train_program(with_stage(config, "adversarial"), mesh)
  a, spec = config.adversarial, program.model.spec
  b = int(config.train.batch_size)
  sh = program.batch_sharding
  h, w = spec.latent_size
  frame = (h, w, spec.latent_channels)
  batch = {"latents": jax.ShapeDtypeStruct((b, a.segment_frames) + frame, jnp.float32,
                                           sharding=sh),
           "rollout_first": jax.ShapeDtypeStruct((b,) + frame, jnp.float32, sharding=sh)}
  if spec.num_actions:
    batch["actions"] = jax.ShapeDtypeStruct((b, a.segment_frames), jnp.int32, sharding=sh)
    batch["rollout_actions"] = jax.ShapeDtypeStruct((b, a.rollout_frames), jnp.int32,
                                                    sharding=sh)
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = program.step.lower(program.abstract_state, batch).compile()
  return (compiled, time.perf_counter() - t0,
          parallel.per_device_bytes(program.abstract, program.shardings))


def mem_row(compiled):
  m = compiled.memory_analysis()
  if m is None:
    return None
  arg, out = m.argument_size_in_bytes, m.output_size_in_bytes
  alias, temp = m.alias_size_in_bytes, m.temp_size_in_bytes
  code = m.generated_code_size_in_bytes
  peak = arg + out - alias + temp + code
  return dict(arg=arg, out=out, alias=alias, temp=temp, code=code, peak=peak)


def cpu_mesh(config, n):
  return parallel.make_mesh(config.mesh, jax.devices()[:n])


# TPU v5p slices by chip count, as maxtext's accelerator_to_spec_map names
# them (v5p-N has N/2 chips): topology, chip config, chips per host.
V5P_TOPOLOGIES = {
    8: ("v5p-16", "v5:2x2x2"),
    32: ("v5p-64", "v5:2x4x4"),
    64: ("v5p-128", "v5:4x4x4"),
    128: ("v5p-256", "v5:4x4x8"),
    256: ("v5p-512", "v5:4x8x8"),
}


def tpu_devices(num_chips):
  """The devices of a TPU v5p slice of `num_chips` chips, without the hardware:
  `jax.experimental.topologies.get_topology_desc` (needs libtpu), as maxtext's
  train_compile.py does from CPU hosts."""
  from jax.experimental import topologies  # noqa: PLC0415
  _, name = V5P_TOPOLOGIES[num_chips]
  topo = topologies.get_topology_desc(platform="tpu", topology_name=name,
                                      chip_config_name="megacore",
                                      chips_per_host_bounds=(2, 2, 1), num_slices=1)
  return topo.devices


def tpu_mesh(config, num_chips):
  """The config's mesh over a v5p slice; a mesh axis may span part of a torus axis
  (e.g. fsdp=8 on 4x4x4), as maxtext allows with allow_split_physical_axes."""
  from jax.experimental import mesh_utils  # noqa: PLC0415
  devices = tpu_devices(num_chips)
  shape = parallel.mesh_shape(config.mesh, len(devices))
  grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  return jax.sharding.Mesh(grid, parallel.MESH_AXES,
                           axis_types=(jax.sharding.AxisType.Auto,) * 3)


def _libtpu_pin() -> str:
  """The libtpu requirement of jax's `tpu` extra, e.g. 'libtpu==0.0.42.*'."""
  try:
    import importlib.metadata as md  # noqa: PLC0415
    for req in md.requires("jax") or ():
      if req.startswith("libtpu") and "tpu" in req.split(";", 1)[-1]:
        return req.split(";", 1)[0].strip()
  except Exception:  # noqa: BLE001
    pass
  return "libtpu"


def tpu_status():
  """None if TPU topologies can be compiled for here, else why not."""
  try:
    import libtpu  # noqa: F401, PLC0415
  except ImportError as e:
    return (f"libtpu is not importable in this environment ({e}); install "
            f"{_libtpu_pin()} (see this file's docstring) to compile for TPU v5p too")
  try:
    devs = tpu_devices(8)
    assert len(devs) == 8, devs
  except Exception as e:  # noqa: BLE001
    return f"libtpu is importable but get_topology_desc failed: {type(e).__name__}: {e}"
  return None


def fmt_gib(x):
  return f"{x / GiB:7.2f}"


def main():
  args = ARGS
  names = args.settings.split(",") if args.settings else list(DEFAULT_SETTINGS)
  for n in names:
    if n not in SETTINGS:
      sys.exit(f"unknown setting {n!r}; choose from {sorted(SETTINGS)}")
  base_path = os.path.join(ROOT, "configs/aapt_8b.py")
  dev = jax.devices()[0]
  print(f"device: {len(jax.devices())} fake {dev.platform} devices ({dev.device_kind}), "
        f"jax {jax.__version__}; configs/aapt_8b.py, stage 1 (diffusion; AdamW + EMA) unless "
        f"the setting says stage 3, text {args.text_len} tokens, fp32 params, bf16 compute")

  why_not = "--tpu=off" if args.tpu == "off" else tpu_status()
  tpu_names = args.tpu_settings.split(",") if args.tpu_settings else TPU_SETTINGS
  if why_not is None:
    import libtpu  # noqa: PLC0415
    print(f"TPU v5p: compiling {', '.join(tpu_names)} also for v5p topologies with libtpu "
          f"{getattr(libtpu, '__version__', '?')} (jax.experimental.topologies)")
  if args.tpu == "only" and why_not is not None:
    sys.exit(f"--tpu=only, but: {why_not}")
  rows = []
  for name in names:
    ndev, overrides, note = SETTINGS[name]
    if ndev > len(jax.devices()):
      print(f"skip {name}: needs {ndev} devices, run with --devices {ndev}")
      continue
    config = load_config(base_path, overrides)
    targets = [] if args.tpu == "only" else [("cpu", lambda c=config, n=ndev: cpu_mesh(c, n))]
    if why_not is None and (name in tpu_names):
      targets.append((V5P_TOPOLOGIES[ndev][0],
                      lambda c=config, n=ndev: tpu_mesh(c, n)))
    for target, make in targets:
      mesh = make()
      shape = dict(mesh.shape)
      try:
        compiled, secs, state_bytes = (
            compile_stage3(config, mesh) if config.stage == "adversarial" else
            compile_step(config, mesh, args.text_len, args.dump))
      except Exception as e:  # noqa: BLE001 (report and go on with the next setting)
        print(f"{name} [{target}]: compile failed: {type(e).__name__}: {str(e)[:300]}")
        continue
      r = mem_row(compiled)
      est = memory.estimate(config, mesh)
      rows.append(dict(name=name, target=target, ndev=ndev, shape=shape, remat=config.model.remat,
                       per_dev=est.samples_per_device, secs=secs, state=state_bytes, note=note,
                       mem=r, est=est.needed))
      print(f"  compiled {name} [{target}] in {secs:.1f}s", flush=True)

  head = (f"{'setting':<11} {'target':<8} {'dev':>4} {'data':>4} {'fsdp':>4} {'tp':>3} "
          f"{'remat':<14} {'b/dev':>5} | {'state':>7} {'arg':>7} {'out':>7} {'alias':>7} "
          f"{'temp':>7} {'code':>7} {'peak':>7} | {'/H100':>6} {'/v5p':>6} {'fits':<8} | "
          f"{'est.':>6} | compile")
  print()
  print("per-device memory, GiB (from compiled.memory_analysis())")
  print(head)
  print("-" * len(head))
  for r in rows:
    m = r["mem"]
    s = r["shape"]
    if m is None:
      print(f"{r['name']:<11} {r['target']:<8} memory_analysis() unavailable")
      continue
    fits = " ".join(k for k, lim in LIMITS if m["peak"] <= lim) or "no"
    print(f"{r['name']:<11} {r['target']:<8} {r['ndev']:>4} {s['data']:>4} {s['fsdp']:>4} "
          f"{s['tensor']:>3} {r['remat']:<14} {r['per_dev']:>5} | {fmt_gib(r['state'])} "
          f"{fmt_gib(m['arg'])} {fmt_gib(m['out'])} {fmt_gib(m['alias'])} {fmt_gib(m['temp'])} "
          f"{fmt_gib(m['code'])} {fmt_gib(m['peak'])} | {m['peak'] / memory.H100_BYTES:>6.2f} "
          f"{m['peak'] / memory.TPU_V5P_BYTES:>6.2f} {fits:<8} | {r['est'] / GiB:>6.1f} | "
          f"{r['secs']:.0f}s")
  print("state = params + AdamW + EMA per device from the shardings; arg = state + batch shard;"
        " out = the new state, aliased to the donated one; peak = arg + out - alias + temp + code;"
        " /H100 = peak / 80 GiB, /v5p = peak / 95 GiB; est. = training/memory.py's estimate"
        " (what check_fits compares; below the peak by design). CPU buffer assignment is not"
        " an accelerator's: the v5p-* rows (compiled by libtpu for that topology) are the"
        " closer prediction.")
  seen = set()
  for r in rows:
    if r["name"] not in seen:
      seen.add(r["name"])
      print(f"  {r['name']}: {r['note']}")
  if why_not is not None:
    print(f"TPU v5p compile: not done: {why_not}")
  print("Settings s3* (stage 3: G and D with RMSProp, EMA, the rollout and D's judging) are "
        "compiled only when named (--settings s3 --devices 64): see the compile column.")
  for r in rows:
    if r["name"] != "default" or not r["mem"]:
      continue
    verdict = lambda lim: "fits" if r["mem"]["peak"] <= lim else "does NOT fit"
    print(f"configs/aapt_8b.py defaults on {r['ndev']} devices [{r['target']}]: peak "
          f"{r['mem']['peak'] / GiB:.1f} GiB per device: {verdict(memory.H100_BYTES)} an 80 GiB "
          f"H100, {verdict(memory.TPU_V5P_BYTES)} a 95 GiB TPU v5p.")


if __name__ == "__main__":
  main()
