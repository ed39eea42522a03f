"""The train program of one stage: `build_train_program(config, mesh)`.

The one abstract-first recipe, shared by the trainer, the memory check
(training/memory.py) and the benchmarks:

  1. the stage's model(s) and optimizer(s) from the config (`STAGES`);
  2. the abstract TrainState, `jax.eval_shape` of its init (nothing allocated),
     boxed with logical axis names;
  3. its shardings on `mesh` from `config.mesh.logical_axis_rules`;
  4. the jitted, donated step with one signature for every stage,
     `(state, batch) -> (state, metrics)`, traced inside those rules (the one
     place they are applied to activations), and the jitted init that
     places each leaf of a fresh state on its sharding.

Nothing is compiled or allocated until `init_state()` or `step` is called.
Trace, lower and call the step under `jax.set_mesh(program.mesh)`.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

from aapt_jax import parallel
from aapt_jax.models import build_generator, build_vae
from aapt_jax.models.discriminator import build_discriminator
from aapt_jax.training import optimizers, stages
from aapt_jax.training import state as state_lib

DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "aapt_jax", "jax")


@dataclasses.dataclass(frozen=True)
class StageSpec:
  """What a stage trains and how its step is made."""
  make_step: Callable[[TrainProgram], Callable]  # program -> step(state, batch)
  optim: Callable[[Any], Any]          # config -> the trained network's optimizer section
  previous: str | None = None          # the stage it starts from (config.init_from)
  teacher: bool = False                # keeps a frozen teacher (the previous stage's EMA)
  adversarial: bool = False            # a discriminator (from stage 1) and rollout batches
  vae: bool = False                    # trains the video VAE on pixel clips


def _vae_step(p):
  from aapt_jax.training.vae_stage import make_vae_step
  return make_vae_step(p.model, p.tx, p.config)


STAGES: dict[str, StageSpec] = {
    "vae": StageSpec(_vae_step, lambda c: c.vae.optim, vae=True),
    "diffusion": StageSpec(lambda p: stages.make_diffusion_step(p.model, p.tx, p.config),
                           lambda c: c.diffusion.optim),
    "consistency": StageSpec(lambda p: stages.make_consistency_step(p.model, p.tx, p.config),
                             lambda c: c.consistency.optim, previous="diffusion", teacher=True),
    "adversarial": StageSpec(
        lambda p: stages.make_adversarial_step(p.model, p.disc, p.tx, p.disc_tx, p.config),
        lambda c: c.adversarial.gen_optim, previous="consistency", adversarial=True),
}


def stage_spec(stage: str) -> StageSpec:
  """The StageSpec of a single stage; ValueError naming the field otherwise."""
  if stage not in STAGES:
    raise ValueError(f"config field stage={stage!r} names no single stage; choose from "
                     f"{', '.join(STAGES)} (stage='pipeline' runs several: "
                     "aapt_jax.pipeline.train)")
  return STAGES[stage]


def with_stage(config, stage: str):
  """`config` running `stage`: itself when it does, else a copy with
  `stage` set (e.g. the stage-1 program of a pipeline config)."""
  if config.stage == stage:
    return config
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.stage = stage
  return c


def enable_compilation_cache() -> str:
  """Turns on JAX's persistent compilation cache (unless a directory is set
  already, e.g. by JAX_COMPILATION_CACHE_DIR); returns the directory."""
  current = jax.config.jax_compilation_cache_dir
  if not current:
    current = os.path.expanduser(os.environ.get("JAX_COMPILATION_CACHE_DIR")
                                 or DEFAULT_CACHE_DIR)
    jax.config.update("jax_compilation_cache_dir", current)
  return current


@dataclasses.dataclass(frozen=True)
class TrainProgram:
  """A stage's networks, abstract state, shardings and jitted functions
  (see the module docstring). `disc`/`disc_tx` are None outside stage 3."""
  config: Any
  mesh: Any                 # a jax Mesh, or an AbstractMesh (shapes and shardings only)
  spec: StageSpec
  rules: tuple              # (logical axis, mesh axes or None) pairs, from the config
  model: Any                # the trained network: the generator, or (stage "vae") the VAE
  tx: Any
  disc: Any
  disc_tx: Any
  boxed: Any                # abstract TrainState with logical names (nn.Partitioned leaves)
  abstract: Any             # the same, unboxed: ShapeDtypeStructs
  shardings: Any            # TrainState of NamedShardings
  init: Callable            # rng -> boxed TrainState (the function eval_shape traced)

  @property
  def batch_sharding(self):
    """Batch arrays: axis 0 over ("data", "fsdp")."""
    return parallel.batch_sharding(self.mesh)

  @property
  def abstract_state(self):
    """ShapeDtypeStructs carrying the shardings: the restore target and the
    state argument of an AOT `step.lower(...)`."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        self.abstract, self.shardings)

  @functools.cached_property
  def step(self):
    """jit of the stage's step `(state, batch) -> (state, metrics)`: state
    donated and kept on its shardings, the batch sharded on axis 0."""
    inner = self.spec.make_step(self)
    rules = self.rules

    def step(state, batch):
      with nn.logical_axis_rules(rules):
        return inner(state, batch)

    return jax.jit(step, in_shardings=(self.shardings, self.batch_sharding),
                   out_shardings=(self.shardings, None), donate_argnums=0)

  @functools.cached_property
  def _init_jit(self):
    init = self.init
    return jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=self.shardings)

  def init_state(self, seed: int | None = None):
    """A fresh TrainState, each leaf created on its device shards (default
    seed: config.train.seed, the seed the abstract state was traced with)."""
    seed = int(self.config.train.seed) if seed is None else int(seed)
    return self._init_jit(jax.random.key(seed))

  def tokens_per_step(self) -> int | None:
    """Generator tokens per step of the global batch (samples x latent frames
    x tokens per frame; stage 3 counts its rollout frames); None for the VAE."""
    if self.spec.vae:
      return None
    c = self.config
    frames = c.adversarial.rollout_frames if self.spec.adversarial else c.train.clip_frames
    return int(c.train.batch_size) * int(frames) * int(self.model.spec.tokens_per_frame)

  def param_count(self) -> int:
    """Parameters of the trained network."""
    return int(sum(x.size for x in jax.tree.leaves(self.abstract.gen_params)))


def build_train_program(config, mesh) -> TrainProgram:
  """The train program of `config.stage` on `mesh` (module docstring).

  ValueError: a stage that is not a single stage, bad rules
  (`config.mesh.logical_axis_rules`), or a parameter dimension a mesh axis
  does not divide (named, with the fix).
  """
  spec = stage_spec(config.stage)
  rules = parallel.axis_rules(config)
  total = int(config.train.steps)
  model = build_vae(config) if spec.vae else build_generator(config)
  tx = optimizers.make_optimizer(spec.optim(config), total)
  disc = disc_tx = None
  if spec.adversarial:
    disc = build_discriminator(config)
    disc_tx = optimizers.make_optimizer(config.adversarial.disc_optim, total)
  init = state_lib.init_fn(model, tx, disc=disc, disc_tx=disc_tx, teacher=spec.teacher)
  boxed = jax.eval_shape(init, jax.random.key(int(config.train.seed)))
  shardings = parallel.logical_shardings(boxed, mesh, rules)
  abstract = nn.meta.unbox(boxed)
  parallel.check_divisible(abstract.gen_params, shardings.gen_params)
  if disc is not None:
    parallel.check_divisible(abstract.disc_params, shardings.disc_params)
  return TrainProgram(config=config, mesh=mesh, spec=spec, rules=rules, model=model, tx=tx,
                      disc=disc, disc_tx=disc_tx, boxed=boxed, abstract=abstract,
                      shardings=shardings, init=init)
