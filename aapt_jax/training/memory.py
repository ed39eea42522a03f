"""Memory per device of a training run, estimated before anything is allocated.

`state_memory(config, mesh)` walks the abstract stage-1 train state of
`build_train_program` (`jax.eval_shape`, no allocation) with the shardings
the run will use and returns the bytes each device holds: params + optimizer state + EMA (+ the
scalars). For the state it is exact: the bytes of device 0's shards of the
real, initialised state (tests/test_memory.py checks this).

`check_fits(config, mesh)` adds a stated allowance for what a stage-1 step
holds besides the state and raises `ValueError` when the sum cannot fit the
devices at hand, with the memory needed per device, what is available, and
what to use instead (a smaller config, or how many devices it takes).

The allowance (see `estimate`), per device:
  gradients    one more copy of the generator params, sharded like them
               (live between the backward pass and the update);
  residuals    the residual stream at every layer boundary, which the
               backward pass of a rematerialised, scanned stack keeps:
               samples x T x tokens/frame x D x dtype bytes x layers;
  attention    the float32 scores of one query chunk against one window
               offset, what models/attention.py's memory-linear
               block-causal attention holds at a time (forward and its
               recomputing backward): samples x heads/tensor x T x C x P x
               4 bytes, C = the query chunk (<= attention.QUERY_CHUNK);
               plain (bidirectional) attention: all (T P)^2 scores.
               Change it together with the attention code.
MLP hiddens, the scores before the softmax, text cross-attention,
all-gathered weights and XLA's scratch come on top: the estimate is a lower
bound of the compiled step's peak (`benchmarks/aot_8b.py` prints both for
configs/aapt_8b.py), so what fails this check cannot run, and passing it is
necessary, not sufficient.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType

from aapt_jax import parallel
from aapt_jax.config import load_config
from aapt_jax.models.attention import QUERY_CHUNK
from aapt_jax.training.program import build_train_program, with_stage

GiB = 2**30
# Accelerator sizes the messages and benchmarks/aot_8b.py compare against.
H100_BYTES = 80 * GiB       # H100 SXM: 80 GiB of HBM3 (a little less is usable)
TPU_V5P_BYTES = 95 * GiB    # TPU v5p: 95 GiB of HBM2e per chip
# Shipped configs tried, in order, as "the config to use instead" (named as a
# checkout's --config path); the first that fits the devices at hand is suggested.
FALLBACK_CONFIGS = ("configs/atari.py", "configs/tiny.py")


@dataclasses.dataclass(frozen=True)
class StateMemory:
  """Bytes per device of the train state."""
  params: int      # generator params
  optimizer: int   # their optimizer state
  ema: int         # EMA params
  other: int       # step, rng, counters; discriminator/teacher when present

  @property
  def total(self) -> int:
    return self.params + self.optimizer + self.ema + self.other


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
  """State + allowance per device on one mesh (what `check_fits` compares)."""
  mesh_shape: dict            # {"data": .., "fsdp": .., "tensor": ..}
  state: StateMemory
  gradients: int
  residuals: int
  attention: int
  samples_per_device: int
  available: int | None = None
  available_source: str = ""

  @property
  def needed(self) -> int:
    return self.state.total + self.gradients + self.residuals + self.attention

  def describe(self) -> str:
    s = self.state
    return (f"{self.needed / GiB:.1f} GiB per device on mesh {_fmt_mesh(self.mesh_shape)} "
            f"with {self.samples_per_device} sample(s) per device: train state "
            f"{s.total / GiB:.1f} GiB (params {s.params / GiB:.1f}, optimizer "
            f"{s.optimizer / GiB:.1f}, EMA {s.ema / GiB:.1f}) + gradients "
            f"{self.gradients / GiB:.1f} + layer-boundary residuals {self.residuals / GiB:.1f}"
            f" + attention scores {self.attention / GiB:.1f}")


def _fmt_mesh(shape: dict) -> str:
  return "(" + ", ".join(f"{a}={shape[a]}" for a in parallel.MESH_AXES) + ")"


def _mesh_shape(mesh) -> dict:
  return {a: int(mesh.shape[a]) for a in parallel.MESH_AXES}


def abstract_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1) -> AbstractMesh:
  """A mesh of any size without devices (enough for shard shapes)."""
  return AbstractMesh((data, fsdp, tensor), parallel.MESH_AXES,
                      axis_types=(AxisType.Auto,) * 3)


def state_memory_from_abstract(boxed_state, mesh, rules) -> StateMemory:
  """Per-device bytes of a boxed abstract TrainState sharded on `mesh`
  (a `Mesh` or an `AbstractMesh`) by the logical-axis `rules`."""
  shardings = parallel.logical_shardings(boxed_state, mesh, rules)
  abstract = nn.meta.unbox(boxed_state)
  part = lambda name: parallel.per_device_bytes(getattr(abstract, name),
                                                getattr(shardings, name))
  params, opt, ema = part("gen_params"), part("gen_opt"), part("ema_params")
  total = parallel.per_device_bytes(abstract, shardings)
  return StateMemory(params=params, optimizer=opt, ema=ema, other=total - params - opt - ema)


def state_memory(config, mesh) -> StateMemory:
  """Per-device bytes of `config`'s stage-1 train state on `mesh` (`Mesh` or
  `AbstractMesh`): the program's abstract state and shardings, no allocation."""
  program = build_train_program(with_stage(config, "diffusion"), mesh)
  return state_memory_from_abstract(program.boxed, mesh, program.rules)


def samples_per_device(config, mesh_shape: dict) -> int:
  return max(1, math.ceil(int(config.train.batch_size)
                          / (mesh_shape["data"] * mesh_shape["fsdp"])))


def activation_allowance(spec, config, mesh_shape: dict) -> tuple[int, int]:
  """(residual bytes, attention bytes) per device of a stage-1 step (module docstring)."""
  samples = samples_per_device(config, mesh_shape)
  frames = int(config.train.clip_frames) // spec.patch_size[0]
  p = spec.tokens_per_frame
  itemsize = np.dtype(spec.compute_dtype).itemsize
  residuals = samples * frames * p * spec.dim * itemsize * spec.num_layers
  heads = math.ceil(spec.num_heads / mesh_shape["tensor"])
  if spec.block_causal:
    chunk = -(-p // -(-p // QUERY_CHUNK))  # block_causal_attention's equal chunks of P
    score_elems = frames * chunk * p
  else:
    score_elems = (frames * p) ** 2
  attention = samples * heads * score_elems * 4
  return residuals, attention


def estimate(config, mesh, *, _cache: dict | None = None) -> MemoryEstimate:
  """State + allowance per device for `config`'s stage 1 on `mesh` (`Mesh` or
  `AbstractMesh`); eval_shape only."""
  if _cache is not None and "boxed" in _cache:  # the abstract state is mesh-independent
    spec, boxed, rules = _cache["spec"], _cache["boxed"], _cache["rules"]
  else:
    program = build_train_program(with_stage(config, "diffusion"), mesh)
    spec, boxed, rules = program.model.spec, program.boxed, program.rules
    if _cache is not None:
      _cache.update(spec=spec, boxed=boxed, rules=rules)
  state = state_memory_from_abstract(boxed, mesh, rules)
  shape = _mesh_shape(mesh)
  residuals, attention = activation_allowance(spec, config, shape)
  return MemoryEstimate(mesh_shape=shape, state=state, gradients=state.params,
                        residuals=residuals, attention=attention,
                        samples_per_device=samples_per_device(config, shape))


def device_memory(devices: Sequence[Any] | None = None) -> tuple[int | None, str]:
  """(bytes per device, where the number comes from).

  An accelerator's `memory_stats()["bytes_limit"]`; else (CPU) the host's
  MemAvailable from /proc/meminfo divided by the number of local devices.
  """
  devices = list(devices) if devices is not None else jax.local_devices()
  dev = devices[0]
  try:
    stats = dev.memory_stats()
  except Exception:  # noqa: BLE001 (some backends raise instead of returning None)
    stats = None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), f"{dev.device_kind} bytes_limit"
  local = jax.local_device_count(dev.platform)
  meminfo = {}
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        key, value = line.split(":", 1)
        meminfo[key] = int(value.split()[0]) * 1024
  except (OSError, ValueError):
    return None, "unknown (no memory_stats, no /proc/meminfo)"
  key = "MemAvailable" if "MemAvailable" in meminfo else "MemTotal"
  if key not in meminfo:
    return None, "unknown (/proc/meminfo has no MemTotal)"
  return meminfo[key] // local, (f"host RAM {key} {meminfo[key] / GiB:.1f} GiB / {local} "
                                 f"local {dev.platform} device{'s' if local > 1 else ''}")


def _pow2_upto(limit: int):
  n = 1
  while n <= limit:
    yield n
    n *= 2


def _layouts(config, n: int, own_only: bool):
  """(data, fsdp, tensor) meshes of n devices: the config's own fsdp x tensor
  with data the rest, or (own_only=False) any tensor in {1, 2, 4, 8} dividing
  the heads and the MLP width and fsdp dividing model.dim; the batch must
  divide data x fsdp."""
  m = config.model
  batch = int(config.train.batch_size)
  if own_only:
    fsdp, tensor = max(1, int(config.mesh.fsdp)), max(1, int(config.mesh.tensor))
    candidates = [(n // (fsdp * tensor), fsdp, tensor)] if n % (fsdp * tensor) == 0 else []
  else:
    candidates = [(n // (t * f), f, t) for t in (1, 2, 4, 8) for f in _pow2_upto(n // t)]
  for data, fsdp, tensor in candidates:
    if (data >= 1 and m.num_heads % tensor == 0 and m.ffn_dim % tensor == 0
        and m.dim % fsdp == 0 and batch % (data * fsdp) == 0):
      yield data, fsdp, tensor


def devices_needed(config, device_bytes: int, *, max_devices: int = 4096,
                   _cache: dict | None = None) -> tuple[int, MemoryEstimate, bool] | None:
  """The fewest devices (a power of two) of `device_bytes` each below which the
  estimate cannot fit, the estimate there, and whether that is the config's
  own fsdp x tensor layout (tried first; other layouts only when it never
  fits up to `max_devices`). None if nothing fits. A lower bound, like the
  estimate."""
  _cache = {} if _cache is None else _cache
  for own_only in (True, False):
    for n in _pow2_upto(max_devices):
      best = None
      for data, fsdp, tensor in _layouts(config, n, own_only):
        est = estimate(config, abstract_mesh(data, fsdp, tensor), _cache=_cache)
        if est.needed <= device_bytes and (best is None or est.needed < best.needed):
          best = est
      if best is not None:
        return n, best, own_only
  return None


def _mesh_advice(n: int, est: MemoryEstimate, own: bool, what: str) -> str:
  s = est.mesh_shape
  layout = "the config's own mesh layout, " if own else ""
  return (f"at least {n} {what} ({layout}mesh.fsdp={s['fsdp']}, mesh.tensor={s['tensor']}, "
          f"mesh.data=-1; {est.needed / GiB:.1f} GiB per device by this estimate)")


def _fallback_config(config, devices, device_bytes) -> str | None:
  """The first of FALLBACK_CONFIGS (not `config` itself) that fits these devices."""
  for rel in FALLBACK_CONFIGS:
    try:
      other = load_config(os.path.splitext(os.path.basename(rel))[0])  # by name
      if other.model.to_dict() == config.model.to_dict():
        continue
      shape = parallel.mesh_shape(other.mesh, len(devices))
      if other.train.batch_size % (shape[0] * shape[1]):
        continue
      if estimate(other, abstract_mesh(*shape)).needed <= device_bytes:
        return rel
    except (ValueError, FileNotFoundError):
      continue
  return None


def check_fits(config, mesh=None, device_bytes: int | None = None, *,
               devices: Sequence[Any] | None = None, config_name: str | None = None
               ) -> MemoryEstimate:
  """Raises ValueError, before any allocation, when `config`'s train state plus
  the allowance cannot fit each device; returns the estimate otherwise.

  mesh: the run's mesh; None = `parallel.make_mesh(config.mesh, devices)`. A
    mesh the devices cannot form is reported together with its memory need.
  device_bytes: memory per device; None = `device_memory(devices)`.
  devices: the devices at hand; None = the mesh's, or `jax.devices()`.
  config_name: how the message names the config (e.g. "configs/aapt_8b.py").
  """
  if devices is None:
    devices = (list(mesh.devices.flat) if isinstance(mesh, jax.sharding.Mesh)
               else jax.devices())
  devices = list(devices)
  source = "given"
  if device_bytes is None:
    device_bytes, source = device_memory(devices)
  name = config_name or "this config"
  mesh_problem = None
  if mesh is None:
    try:
      mesh = parallel.make_mesh(config.mesh, devices)
    except ValueError as e:
      mesh_problem = str(e)
      mesh = abstract_mesh(*[max(1, int(config.mesh[a])) for a in parallel.MESH_AXES])
  cache: dict = {}
  est = estimate(config, mesh, _cache=cache)
  est = dataclasses.replace(est, available=device_bytes, available_source=source)
  if device_bytes is None:
    if mesh_problem:
      raise ValueError(f"{name}: {mesh_problem}. It needs {est.describe()}.")
    return est  # nothing to compare against
  if est.needed <= device_bytes and not mesh_problem:
    return est

  platform = devices[0].platform
  lines = []
  if mesh_problem:
    lines.append(f"{name} cannot run on the {len(devices)} {platform} device(s) here: "
                 f"{mesh_problem}.")
  lines.append(f"{name} needs {est.describe()}; each {platform} device here has "
               f"{device_bytes / GiB:.1f} GiB ({source}).")
  advice = []
  fallback = _fallback_config(config, devices, device_bytes)
  if fallback:
    advice.append(f"use {fallback} on this machine")
  here = devices_needed(config, device_bytes, _cache=cache)
  if here:
    advice.append("run on " + _mesh_advice(*here, what="devices of this size"))
  if device_bytes < H100_BYTES:
    big = devices_needed(config, H100_BYTES, _cache=cache)
    if big:
      advice.append("on 80 GiB accelerators (H100), " + _mesh_advice(*big, what="devices"))
  if not advice:
    advice.append("reduce model.dim, model.num_layers, train.batch_size or train.clip_frames")
  lines.append("Instead: " + "; or ".join(advice) + ".")
  lines.append("(The estimate is a lower bound of the compiled step's peak; "
               "benchmarks/aot_8b.py measures that peak for configs/aapt_8b.py.)")
  raise ValueError(" ".join(lines))
