"""Training throughput on this machine: the stage-1 and stage-3 steps' time,
FLOPs and model-FLOPs utilisation against a matmul peak measured in the same
run, and stage 3's time and FLOPs as multiples of stage 1's.

  python benchmarks/train_throughput.py [--configs tiny,atari] [--stages 1,3]
      [--steps 10] [--adv_steps 2] [--repeats 2] [--set model.num_layers=2 ...]

One device, no fake devices. Each (config, stage) step is
`build_train_program`'s jitted, donated step, as the trainer runs it:
stage 1 the diffusion step on clips of train.clip_frames, stage 3 the
adversarial step (student-forcing rollout, D on reals, fakes and their
perturbed copies, D update, G recompute and update) on random batches.
All steps are compiled first; then `--repeats` rounds each time `--steps`
stage-1 steps and `--adv_steps` stage-3 steps (one host sync per timing), so
both stages see the same background load; the table reports each stage's best
round, and the stage-3 row its time and FLOPs as multiples of stage 1's
("t/t1", "F/F1"): when the ratios match, stage 3 runs at stage 1's FLOP rate.

FLOPs per step come from `compiled.cost_analysis()["flops"]`. XLA's cost
analysis counts a while loop's body once, so when the config scans its layers
(`model.scan_layers`) the same step is also compiled with the layers unrolled
and that count is used (the two programs do the same arithmetic); stage 3's
rollout is a `lax.scan` over frames, so (rollout_frames - 2) more one-frame
`Generator.step` forwards (compiled alone, unrolled) are added. As a
cross-check the stage-1 row shows the analytic estimate 6 x params x tokens
+ attention (block-causal: each frame's queries against the sink and up to
N + 1 frames, x 3 for forward + backward). MFU = FLOPs per step / step time /
peak; the peak is the best of a few large fp32 matmuls (2 n^3 FLOPs each)
timed in this process.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
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
from aapt_jax.models import Conditioning, Generator  # noqa: E402
from aapt_jax.training.program import build_train_program  # noqa: E402

CONFIGS = {"tiny": "configs/tiny.py", "atari": "configs/atari.py"}
STAGES = {"1": "diffusion", "3": "adversarial"}
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


def rollout_body_flops(program, batch):
  """FLOPs of one rollout frame: the unrolled generator's one-frame `step`."""
  model = Generator(dataclasses.replace(program.model.spec, scan_layers=False))  # unrolled
  first = batch["rollout_first"]
  b = first.shape[0]
  params = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((b, 2) + first.shape[1:]),
                         jnp.zeros((b, 2)))["params"])
  actions = batch.get("rollout_actions")
  cond = Conditioning(previous=jnp.zeros((b, 1) + first.shape[1:]),
                      actions=None if actions is None else jnp.zeros((b, 1), jnp.int32))

  def one(p, x, cache):
    return model.apply({"params": p}, x, jnp.ones((b, 1)), cond, cache, method="step")

  cache = jax.eval_shape(lambda: model.init_cache(b))
  x = jax.ShapeDtypeStruct((b, 1) + first.shape[1:], first.dtype)
  return flops_of(jax.jit(one).lower(params, x, cache).compile())


def prepare(name, stage, overrides):
  """Compiles one (config, stage) step; returns what `time_steps` and the table need."""
  config = load_config(os.path.join(ROOT, CONFIGS[name]), {**overrides, "stage": stage})
  mesh = parallel.make_mesh(config.mesh, jax.devices()[:1])
  program = build_train_program(config, mesh)
  spec = program.model.spec
  adversarial = stage == "adversarial"
  batch = random_batch(config, spec, np.random.default_rng(0), TEXT_LEN, adversarial)
  batch = jax.device_put(batch, program.batch_sharding)
  with jax.set_mesh(mesh):
    state = program.init_state()
    t0 = time.perf_counter()
    compiled = program.step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    flops = flops_of(compiled)
    flops_src = "compiled"
    if spec.scan_layers:
      uconfig = load_config(os.path.join(ROOT, CONFIGS[name]),
                            {**overrides, "stage": stage, "model.scan_layers": False})
      unrolled = build_train_program(uconfig, mesh)
      scanned_flops = flops
      flops = flops_of(unrolled.step.lower(unrolled.abstract_state, batch).compile())
      flops_src = (f"the unrolled step (the scanned step's cost_analysis counts the layer "
                   f"body once: {scanned_flops / 1e9:.4g} GF)")
    if adversarial and config.adversarial.forcing == "student":
      extra = int(config.adversarial.rollout_frames) - 2
      body = rollout_body_flops(program, batch)
      flops += extra * body
      flops_src += f" + {extra} rollout frames x {body / 1e9:.4g} GF"
      if config.adversarial.gradient == "scan":
        flops_src += " (the rollout's backward scan is counted once: an undercount)"
  b = int(config.train.batch_size)
  frames = int(config.adversarial.rollout_frames if adversarial else config.train.clip_frames)
  row = dict(name=name, stage=stage, params=program.param_count(),
             dims=f"{spec.dim}x{spec.num_layers}", batch=b, frames=frames,
             tok_frame=spec.tokens_per_frame, tokens=program.tokens_per_step(), flops=flops,
             flops_src=flops_src, compile_s=compile_s, remat=spec.remat, times=[],
             analytic=None if adversarial else analytic_flops(config, spec, program.param_count()))
  return row, dict(compiled=compiled, state=state, batch=batch, mesh=mesh)


def time_steps(run, steps):
  """Seconds per step over `steps` steps (after a warm-up step), one host sync."""
  compiled, batch = run["compiled"], run["batch"]
  with jax.set_mesh(run["mesh"]):
    state, m = compiled(run["state"], batch)                # warm-up
    float(m["loss"])
    t0 = time.perf_counter()
    for _ in range(steps):
      state, m = compiled(state, batch)
    loss = float(m["loss"])                                  # the one host sync
    dt = (time.perf_counter() - t0) / steps
  run["state"] = state
  return dt, loss


def parse_overrides(items):
  """["model.num_layers=2", ...] -> {"model.num_layers": 2} (values as Python literals)."""
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep:
      sys.exit(f"--set takes key=value, got {item!r}")
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--configs", default="tiny,atari")
  ap.add_argument("--stages", default="1,3", help="comma-separated: 1 (diffusion), 3 (adversarial)")
  ap.add_argument("--steps", type=int, default=10, help="timed stage-1 steps per round")
  ap.add_argument("--adv_steps", type=int, default=2, help="timed stage-3 steps per round")
  ap.add_argument("--repeats", type=int, default=2, help="timing rounds (the best is reported)")
  ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                  help="config overrides for every row, e.g. model.num_layers=2")
  args = ap.parse_args()
  names = config_names(args.configs, CONFIGS)
  stages = [STAGES[s] for s in config_names(args.stages, STAGES)]
  overrides = parse_overrides(args.set)
  print(device_line())
  if overrides:
    print(f"overrides: {overrides}")
  peak, n = matmul_peak()
  print(f"matmul peak (fp32, best of {n}x{n} and others, same run): {peak / 1e9:.1f} GFLOP/s")
  prepared = [prepare(name, stage, overrides) for name in names for stage in stages]
  for _ in range(args.repeats):
    for row, run in prepared:
      dt, row["loss"] = time_steps(run, args.adv_steps if row["stage"] == "adversarial"
                                   else args.steps)
      row["times"].append(dt)
  rows = [row for row, _ in prepared]
  for r in rows:
    r["step_s"] = min(r["times"])
  first = {r["name"]: r for r in rows if r["stage"] == "diffusion"}
  head = (f"{'config':<6} {'stage':>5} {'DxL':>7} {'params':>8} {'B':>2} {'T':>3} "
          f"{'tok/f':>5} | {'steps/s':>7} {'tokens/s':>9} | {'GF/step':>8} {'6N+attn':>8} "
          f"{'ratio':>5} | {'GFLOP/s':>8} {'MFU':>6} | {'t/t1':>5} {'F/F1':>5} | compile")
  print(head)
  print("-" * len(head))
  for r in rows:
    rate = r["flops"] / r["step_s"]
    analytic = (f"{r['analytic'] / 1e9:>8.4g} {r['flops'] / r['analytic']:>5.2f}"
                if r["analytic"] else f"{'-':>8} {'-':>5}")
    base = first.get(r["name"]) if r["stage"] != "diffusion" else None
    vs = (f"{r['step_s'] / base['step_s']:>5.2f} {r['flops'] / base['flops']:>5.2f}"
          if base else f"{'':>5} {'':>5}")
    print(f"{r['name']:<6} {'1' if r['stage'] == 'diffusion' else '3':>5} {r['dims']:>7} "
          f"{r['params'] / 1e6:>7.2f}M {r['batch']:>2} {r['frames']:>3} {r['tok_frame']:>5} | "
          f"{1 / r['step_s']:>7.3f} {r['tokens'] / r['step_s']:>9.0f} | "
          f"{r['flops'] / 1e9:>8.4g} {analytic} | {rate / 1e9:>8.1f} {rate / peak:>6.1%} | "
          f"{vs} | {r['compile_s']:.1f}s")
  print("T = clip frames (stage 1) or rollout frames (stage 3); tokens = B x T x tokens/frame; "
        "GF/step = XLA cost_analysis FLOPs of the step; 6N+attn = analytic stage-1 FLOPs "
        "(ratio = XLA / analytic); MFU = achieved FLOP/s / matmul peak measured above; t/t1, "
        "F/F1 = stage 3's step time and FLOPs over stage 1's (same config, same run).")
  for r in rows:
    times = ", ".join(f"{t:.3g}" for t in r["times"])
    print(f"  {r['name']} {r['stage']}: FLOPs from {r['flops_src']}; remat={r['remat']}; "
          f"s/step per round [{times}]; final loss {r['loss']:.4f}")


if __name__ == "__main__":
  main()
