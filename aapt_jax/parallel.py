"""Parallelism: the mesh, logical-axis rules from the config, shardings, processes.

Glossary of logical axis names (every parameter carries them; an unnamed
parameter would be silently replicated, so a test walks the tree):

  parameters
    embed       the model width D (sharded over "fsdp")
    embed_out   a second D axis of a D x D matrix (replicated, so that no
                mesh axis appears twice in one spec)
    heads       the flattened attention width (num_heads x head_dim) of
                q/k/v/out projections and q/k norms ("tensor")
    mlp         the MLP hidden width and the 6·D modulation projection ("tensor")
    freq        the sinusoidal timestep features
    text_embed  the text encoder's width (input of the text projection)
    vocab       discrete actions
    control     continuous control features
    modulation  the rows (shift/scale/gate) of a modulation table
    patch_t, patch_h, patch_w, channels
                the patch-embedding kernel [pt, ph, pw, C_in, D]
    patch_out   the output head's pt·ph·pw·C
    layers      the stacked layer axis of the scanned blocks
    logit       the discriminator head's single output
    vae_t, vae_h, vae_w, vae_in, vae_out
                a VAE conv kernel [kt, kh, kw, C_in, C_out]; C_out (and its
                bias) is sharded over "fsdp"
    vae_norm    a VAE RMS norm's per-channel scale
    rgb         the VAE decoder head's 3 output channels
  activations
    batch       samples ("data" and "fsdp")
    frames      latent frames
    tokens      tokens inside a frame
    act_embed   the residual stream's width (replicated: FSDP shards the batch)

The rules that map them to the mesh axes ("data", "fsdp", "tensor") are
`config.mesh.logical_axis_rules` (configs/base.py), read by `axis_rules`.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

# Every logical axis name (the glossary above); config.mesh.logical_axis_rules
# maps each to mesh axes.
LOGICAL_AXIS_NAMES = frozenset((
    "embed", "embed_out", "heads", "mlp", "freq", "text_embed", "vocab", "control",
    "modulation", "patch_t", "patch_h", "patch_w", "channels", "patch_out", "layers",
    "logit", "vae_t", "vae_h", "vae_w", "vae_in", "vae_out", "vae_norm", "rgb",
    "batch", "frames", "tokens", "act_embed"))

MESH_AXES = ("data", "fsdp", "tensor")
# The residual stream [B, T, P, D] is sharded over the batch only.
RESIDUAL = ("batch", "frames", "tokens", "act_embed")


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) with one -1 filled in; ValueError if it does not divide."""
  sizes = [int(mesh_config[a]) for a in MESH_AXES]
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1:
    raise ValueError(f"config field mesh: at most one axis may be -1, got "
                     f"{dict(zip(MESH_AXES, sizes))}")
  for a, s in zip(MESH_AXES, sizes):
    if s == 0 or s < -1:
      raise ValueError(f"config field mesh.{a} must be >= 1 or -1, got {s}")
  fixed = math.prod(s for s in sizes if s != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(f"config field mesh: {dict(zip(MESH_AXES, sizes))} does not divide "
                       f"{num_devices} devices ({num_devices} % {fixed} != 0)")
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise ValueError(f"config field mesh: {dict(zip(MESH_AXES, sizes))} needs "
                     f"{math.prod(sizes)} devices but {num_devices} are available; "
                     f"set one axis to -1 to use all of them")
  return tuple(sizes)


def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
  """The ("data", "fsdp", "tensor") mesh over all (or the given) devices, Auto axes."""
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def axis_rules(config) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
  """`config.mesh.logical_axis_rules` as a tuple of (logical name, mesh axes)
  pairs, mesh axes a name, a tuple of names or None (replicated).

  ValueError naming the field: a pair that is not (name, axes), a mesh axis
  not in ("data", "fsdp", "tensor"), or a logical name without a rule.
  """
  field = "config field mesh.logical_axis_rules"
  rules = []
  for pair in config.mesh.logical_axis_rules:
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
      raise ValueError(f"{field}: {pair!r} is not a (logical name, mesh axes) pair")
    name, axes = pair
    if isinstance(axes, list):  # a config read back from JSON
      axes = tuple(axes)
    for axis in axes if isinstance(axes, tuple) else () if axes is None else (axes,):
      if axis not in MESH_AXES:
        raise ValueError(f"{field}: {name!r} -> {axis!r} is not a mesh axis; use "
                         f"{', '.join(MESH_AXES)}, a tuple of them, or None")
    rules.append((str(name), axes))
  missing = LOGICAL_AXIS_NAMES - {name for name, _ in rules}
  if missing:
    raise ValueError(f"{field} has no rule for {', '.join(sorted(missing))}; add "
                     "(name, mesh axis or None) pairs (configs/base.py lists them all)")
  return tuple(rules)


def logical_shardings(boxed_tree, mesh, rules) -> Any:
  """NamedShardings for a tree of (abstract) boxed values with logical axis
  names, mapped to `mesh` axes by `rules` ((logical, mesh axes) pairs).

  Unboxed leaves (scalars such as step counters) are replicated.
  """
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def check_divisible(abstract_tree, shardings) -> None:
  """ValueError naming the parameter whose dimension a mesh axis does not divide."""
  leaves = jax.tree.leaves_with_path(abstract_tree)
  for (path, leaf), sharding in zip(leaves, jax.tree.leaves(shardings)):
    for dim, axes in zip(leaf.shape, sharding.spec):
      if axes is None:
        continue
      axes = axes if isinstance(axes, tuple) else (axes,)
      size = math.prod(sharding.mesh.shape[a] for a in axes)
      if dim % size:
        raise ValueError(
            f"{jax.tree_util.keystr(path)} has shape {leaf.shape}: dimension {dim} is not "
            f"divisible by mesh axes {axes} (size {size}); change config.mesh or the model dims")


def batch_sharding(mesh) -> NamedSharding:
  """Batch arrays: axis 0 over ("data", "fsdp")."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  heartbeat_timeout_s: int | None = None
  # The accelerators this process uses (e.g. (SLURM_LOCALID,) with one
  # process per GPU); None = all of the host's.
  local_device_ids: tuple[int, ...] | None = None


def initialize_distributed(cfg: DistributedConfig | None = None) -> None:
  """`jax.distributed.initialize`: an explicit coordinator (flags, SLURM's
  environment read by `aapt_jax.slurm`, local tests), used as given, or the
  platform's autodetection (Cloud TPU, ...) when none is given."""
  cfg = cfg or DistributedConfig()
  kwargs = {}
  if cfg.coordinator_address:
    kwargs.update(coordinator_address=cfg.coordinator_address,
                  num_processes=cfg.num_processes, process_id=cfg.process_id)
    if cfg.local_device_ids is not None:
      kwargs["local_device_ids"] = list(cfg.local_device_ids)
    else:  # all local devices: keep JAX's SLURM/MPI detection from picking one
      kwargs["cluster_detection_method"] = "deactivate"
  if cfg.heartbeat_timeout_s:
    # A process whose peer stops sending heartbeats for this long is
    # terminated instead of hanging (JAX's default: 100 s).
    if "heartbeat_timeout_seconds" not in inspect.signature(jax.distributed.initialize).parameters:
      raise ValueError("config field distributed.heartbeat_timeout_s needs a jax whose "
                       "jax.distributed.initialize takes heartbeat_timeout_seconds; set it "
                       "to 0 or upgrade jax")
    kwargs["heartbeat_timeout_seconds"] = int(cfg.heartbeat_timeout_s)
  jax.distributed.initialize(**kwargs)


def is_main_process() -> bool:
  """Process 0: the one that writes metrics, logs and the console."""
  return jax.process_index() == 0


def barrier(name: str, timeout_s: float = 1800.0) -> None:
  """Waits for every process at `name` (the coordination service's barrier,
  not a collective: processes may arrive minutes apart, e.g. one compiling
  while another loads the compilation cache; gloo's rendezvous waits 30 s)."""
  if jax.process_count() == 1:
    return
  from jax._src import distributed  # the client jax.distributed.initialize made
  distributed.global_state.client.wait_at_barrier(name, int(timeout_s * 1000))


def per_device_bytes(abstract_tree, shardings) -> int:
  """Bytes per device of a sharded abstract tree (largest shard per leaf)."""
  total = 0
  for leaf, sharding in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)):
    shard = sharding.shard_shape(leaf.shape)
    total += int(np.prod(shard)) * np.dtype(leaf.dtype).itemsize
  return total

