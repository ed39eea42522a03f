"""The training loop: `Trainer(config, workdir).run()`.

One program for one CPU and for a multi-host cluster. `run()`:

1. checks its inputs at the edge (stage, numbers, the data path and the
   first/last record's shapes against the model) before compiling anything;
   with `data.world` set and `data.path` empty, prepares a small dataset of
   that world into `<workdir>/data` first;
2. builds the mesh (activated with `jax.set_mesh`), the model, the optimizer
   of the stage, and the TrainState -- restored from the latest complete
   checkpoint in `<workdir>/<stage>/checkpoints` when there is one (after a
   shape check against the checkpoint), so a rerun resumes -- and the grain
   iterator (its position restored too);
3. loops over one jitted, donated step with no per-step host sync: the
   metrics of step i are read only after step i+1 is dispatched;
4. saves every `checkpoint.every_steps`, at the end, and on preemption
   (SIGTERM / `reached_preemption`), then returns; stops with
   `NonFiniteLossError` after `train.max_nonfinite` non-finite losses in a
   row, without saving.

Stages plug in through `STAGES`: stage name -> (step factory, optimizer
section). Only process 0 writes TensorBoard events (`<workdir>/<stage>/tb`),
`<workdir>/<stage>/metrics.jsonl` and the console.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from aapt_jax import checkpointing, loading, parallel
from aapt_jax.data import pipeline, records
from aapt_jax.models import build_generator, build_vae
from aapt_jax.models.discriminator import build_discriminator, params_from_generator
from aapt_jax.training import memory, optimizers, resume_check, stages
from aapt_jax.training import state as state_lib

DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "aapt_jax", "jax")

# A dataset prepared automatically for `data.world` (small: a first run on
# one CPU; prepare more with launch/prepare_data.py and set data.path).


@dataclasses.dataclass(frozen=True)
class StageSpec:
  make_step: Callable[..., Callable]   # (model, tx, config[, disc, disc_tx]) -> step(state, batch)
  optim: Callable[[Any], Any]          # config -> optimizer section
  previous: str | None = None          # the stage it starts from (config.init_from)
  teacher: bool = False                # keeps a frozen teacher (the previous stage's EMA)
  adversarial: bool = False            # a discriminator (from stage 1) and rollout batches
  vae: bool = False                    # trains the video VAE on pixel clips


def _make_vae_step(model, tx, config):
  from aapt_jax.training.vae_stage import make_vae_step
  return make_vae_step(model, tx, config)


STAGES: dict[str, StageSpec] = {
    "vae": StageSpec(_make_vae_step, lambda c: c.vae.optim, vae=True),
    "diffusion": StageSpec(stages.make_diffusion_step, lambda c: c.diffusion.optim),
    "consistency": StageSpec(stages.make_consistency_step, lambda c: c.consistency.optim,
                             previous="diffusion", teacher=True),
    "adversarial": StageSpec(
        lambda model, tx, config, disc, disc_tx: stages.make_adversarial_step(
            model, disc, tx, disc_tx, config),
        lambda c: c.adversarial.gen_optim, previous="consistency", adversarial=True),
}
PIPELINE = ("diffusion", "consistency", "adversarial")
KNOWN_STAGES = ("vae", "diffusion", "consistency", "adversarial", "pipeline")


class NonFiniteLossError(RuntimeError):
  """`train.max_nonfinite` non-finite losses in a row."""


def enable_compilation_cache() -> str:
  """Turns on JAX's persistent compilation cache (unless a directory is set
  already, e.g. by JAX_COMPILATION_CACHE_DIR); returns the directory."""
  current = jax.config.jax_compilation_cache_dir
  if not current:
    current = os.path.expanduser(os.environ.get("JAX_COMPILATION_CACHE_DIR")
                                 or DEFAULT_CACHE_DIR)
    jax.config.update("jax_compilation_cache_dir", current)
  return current


def is_main_process() -> bool:
  return jax.process_index() == 0


def _log(*args):
  if is_main_process():
    print(*args, flush=True)


def barrier(name: str, timeout_s: float = 1800.0) -> None:
  """Waits for every process at `name` (the coordination service's barrier,
  not a collective: processes may arrive minutes apart, e.g. one compiling
  while another loads the compilation cache; gloo's rendezvous waits 30 s)."""
  if jax.process_count() == 1:
    return
  from jax._src import distributed  # the client jax.distributed.initialize made
  distributed.global_state.client.wait_at_barrier(name, int(timeout_s * 1000))


# ----------------------------------------------------------------------------
# Checks at the edge.


def check_config(config) -> StageSpec:
  """ValueError naming the field for a config the trainer cannot run."""
  stage = config.stage
  if stage == "pipeline":
    raise ValueError("stage='pipeline' runs several stages: use trainer.train(config, "
                     "workdir) (launch/train.py does)")
  if stage not in STAGES:
    if stage in KNOWN_STAGES:
      raise ValueError(f"config field stage={stage!r} is not implemented yet; "
                       f"available: {', '.join(STAGES)}")
    raise ValueError(f"config field stage={stage!r} is unknown; choose from "
                     f"{', '.join(KNOWN_STAGES)}")
  for field, value, low in (
      ("train.steps", config.train.steps, 1), ("train.batch_size", config.train.batch_size, 1),
      ("train.clip_frames", config.train.clip_frames, 2),
      ("train.log_every", config.train.log_every, 1),
      ("train.max_nonfinite", config.train.max_nonfinite, 1),
      ("checkpoint.every_steps", config.checkpoint.every_steps, 1),
      ("checkpoint.keep", config.checkpoint.keep, 1)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
      raise ValueError(f"config field {field} must be an int, got {value!r}")
    if value < low:
      raise ValueError(f"config field {field} must be >= {low}, got {value}")
  if STAGES[stage].vae:
    from aapt_jax.models.vae import VAESpec
    r = VAESpec.from_config(config).temporal_factor
    if (config.train.clip_frames - 1) % r:
      raise ValueError(f"config field train.clip_frames={config.train.clip_frames}: stage "
                       f"'vae' trains on clips of 1 + k*{r} video frames (vae temporal "
                       f"factor {r}), e.g. {1 + r * max(1, config.train.clip_frames // r)}")
  if STAGES[stage].adversarial:
    a = config.adversarial
    from aapt_jax.objectives.adversarial import segment_starts
    try:
      segment_starts(a.rollout_frames, a.segment_frames, a.segment_overlap)
    except ValueError as e:
      raise ValueError(f"config fields adversarial.rollout_frames/segment_frames/"
                       f"segment_overlap: {e}") from None
    if a.segment_frames > a.rollout_frames:
      raise ValueError(f"config field adversarial.segment_frames={a.segment_frames} > "
                       f"adversarial.rollout_frames={a.rollout_frames}")
    for field, allowed in (("gradient", ("recompute", "scan")),
                           ("segment_gradient", ("end_to_end", "truncated"))):
      if a[field] not in allowed:
        raise ValueError(f"config field adversarial.{field}={a[field]!r}: choose from "
                         f"{', '.join(allowed)}")
  return STAGES[stage]


def _record_files(path: str) -> list[str]:
  """The training files under data.path: a directory's clips-* files (what
  prepare_data writes; episodes-* are for later stages), else all its records."""
  if os.path.isdir(path) and any(f.startswith("clips-") and f.endswith(records.SUFFIX)
                                 for f in os.listdir(path)):
    return records.resolve_paths(os.path.join(path, "clips-*" + records.SUFFIX))
  return records.resolve_paths(path)


def episode_files(config, clip_files: list[str]) -> list[str]:
  """Where stage 3 draws rollout start frames and actions: the long episodes
  (episodes-* next to the clips, as prepare_data writes them), else the clips."""
  path = config.data.path
  if os.path.isdir(path) and any(f.startswith("episodes-") and f.endswith(records.SUFFIX)
                                 for f in os.listdir(path)):
    return records.resolve_paths(os.path.join(path, "episodes-*" + records.SUFFIX))
  return clip_files


def prepare_world_data(config, out_dir: str) -> None:
  """Records a small dataset of `config.data.world` into `out_dir` (process 0;
  the others wait) unless a finished one (metadata.json) is there."""
  from aapt_jax.data import prepare
  world = config.data.world
  if world not in prepare.WORLDS:
    raise ValueError(f"config field data.world={world!r} is not supported; choose from "
                     f"{', '.join(prepare.WORLDS)} or set data.path")
  done = os.path.exists(os.path.join(out_dir, "metadata.json"))
  if is_main_process() and not done:
    clip = 2 * config.train.clip_frames
    episodes, frames = int(config.data.record_episodes), int(config.data.record_frames)
    _log(f"data.path is empty: recording {episodes} episodes x "
         f"{frames} frames of {world}/{config.data.game} at "
         f"{config.data.frame_size}x{config.data.frame_size} into {out_dir} "
         f"(clips of {clip} frames); set data.path to use other data")
    summary = prepare.prepare_atari(
        out_dir, game=config.data.game, episodes=episodes,
        frames_per_episode=frames, clip_frames=clip,
        clip_stride=config.train.clip_frames, size=config.data.frame_size,
        frame_skip=config.data.frame_skip, seed=config.train.seed,
        overwrite=True, progress=True)
    _log(prepare.format_summary(summary, out_dir))
  if jax.process_count() > 1:
    barrier("aapt_jax:prepare_world_data")
    if not os.path.exists(os.path.join(out_dir, "metadata.json")):
      raise FileNotFoundError(
          f"process {jax.process_index()} cannot see the data process 0 prepared in "
          f"{out_dir}; use a --workdir all hosts share, or set data.path")


def resolve_data(config, workdir: str) -> list[str]:
  """The record files to train on; prepares world data when asked to."""
  path = config.data.path
  if not path:
    if not config.data.world:
      raise ValueError(
          "config field data.path is empty: set --config.data.path=DIR (ArrayRecord "
          "files from launch/prepare_data.py), or set data.world (e.g. 'atari') to "
          "record a small dataset automatically")
    path = os.path.join(os.path.abspath(workdir), "data")
    prepare_world_data(config, path)
    with config.unlocked():
      config.data.path = path
  if not os.path.exists(path) and not any(c in path for c in "*?["):
    raise FileNotFoundError(f"config field data.path={path!r} does not exist; "
                            "point it at a directory of ArrayRecord files "
                            "(launch/prepare_data.py writes one)")
  try:
    return _record_files(path)
  except FileNotFoundError:
    raise FileNotFoundError(f"config field data.path={path!r} holds no ArrayRecord "
                            f"files (*{records.SUFFIX})") from None


def check_example(example: dict, config, where: str, min_frames: int | None = None,
                  min_field: str = "train.clip_frames") -> None:
  """ValueError naming `where` and the field if a record does not fit the model
  (or is shorter than `min_frames`, default train.clip_frames, named `min_field`)."""
  m, d = config.model, config.data
  _, ph, pw = m.patch_size
  lh, lw = m.latent_size
  if "latents" in example:
    x = example["latents"]
    if x.ndim != 4:
      raise ValueError(f"{where}: field 'latents': shape {x.shape}, expected [T, h, w, C]")
    t, h, w, c = x.shape
    field = "'latents'"
  elif "video" in example:
    v = example["video"]
    s = int(d.space_to_depth)
    if v.ndim != 4 or v.shape[-1] != 3:
      raise ValueError(f"{where}: field 'video': shape {v.shape}, expected [T, H, W, 3]")
    if s < 1:
      raise ValueError(f"{where}: field 'video': records hold pixels but "
                       "data.space_to_depth=0 (latents from a VAE); encode them with "
                       "launch/prepare_data.py --vae_checkpoint=RUN or set data.space_to_depth")
    if v.shape[1] % s or v.shape[2] % s:
      raise ValueError(f"{where}: field 'video': frame size {v.shape[1]}x{v.shape[2]} "
                       f"is not divisible by data.space_to_depth={s}")
    t, h, w, c = v.shape[0], v.shape[1] // s, v.shape[2] // s, 3 * s * s
    field = f"'video' (as {h}x{w}x{c} latents by {s}x{s} space-to-depth)"
  else:
    raise ValueError(f"{where}: no 'latents' or 'video' field")
  if c != m.latent_channels:
    raise ValueError(f"{where}: field {field}: {c} channels but model.latent_channels="
                     f"{m.latent_channels}")
  if (h, w) != (lh, lw):
    raise ValueError(f"{where}: field {field}: frames are {h}x{w} but model.latent_size="
                     f"{(lh, lw)}; set model.latent_size or use matching records")
  if h % ph or w % pw:
    raise ValueError(f"{where}: field {field}: {h}x{w} is not divisible by the patch "
                     f"{(ph, pw)} (model.patch_size)")
  if min_frames is None:
    min_frames = config.train.clip_frames
  if t < min_frames:
    raise ValueError(f"{where}: field {field}: {t} frames < {min_field}={min_frames}")
  if "actions" in example:
    a = example["actions"]
    if not m.num_actions:
      raise ValueError(f"{where}: field 'actions': the records have actions but "
                       "model.num_actions=0; set model.num_actions")
    if a.size and int(a.max()) >= m.num_actions:
      raise ValueError(f"{where}: field 'actions': action id {int(a.max())} >= "
                       f"model.num_actions={m.num_actions}")
  if "controls" in example:
    u = example["controls"]
    if u.ndim != 2 or u.shape[1] != m.control_dim:
      raise ValueError(f"{where}: field 'controls': shape {u.shape} but model.control_dim="
                       f"{m.control_dim}")


def check_vae_example(example: dict, config, where: str) -> None:
  """ValueError naming `where` and the field if a record cannot train the VAE."""
  from aapt_jax.models.vae import VAESpec
  if "video" not in example:
    raise ValueError(f"{where}: no 'video' field: stage 'vae' trains on pixel clips")
  v = example["video"]
  size = VAESpec.from_config(config).frame_size
  if v.ndim != 4 or v.shape[-1] != 3 or tuple(v.shape[1:3]) != tuple(size):
    raise ValueError(f"{where}: field 'video': shape {v.shape}, expected [T, {size[0]}, "
                     f"{size[1]}, 3] (model.latent_size x the VAE's spatial factor)")
  if v.shape[0] < config.train.clip_frames:
    raise ValueError(f"{where}: field 'video': {v.shape[0]} frames < train.clip_frames="
                     f"{config.train.clip_frames}")


def check_data(source: records.RecordSource, config, min_frames: int | None = None,
               min_field: str = "train.clip_frames") -> None:
  """Validates and checks the first and last record against the model."""
  n = len(source)
  if n == 0:
    raise ValueError(f"config field data.path={config.data.path!r}: the records are empty")
  for i in sorted({0, n - 1}):
    path, pos = source.locate(i)
    where = f"{path}[{pos}]"
    example = source[i]
    records.validate_example(example, source=where)
    if STAGES.get(config.stage) and STAGES[config.stage].vae:
      check_vae_example(example, config, where)
    else:
      check_example(example, config, where, min_frames, min_field)


# ----------------------------------------------------------------------------
# Metrics.


class Metrics:
  """Consumes each step's metrics on the host (one step late); counts
  non-finite losses in a row and raises `NonFiniteLossError` after `limit`."""

  def __init__(self, limit: int):
    self.limit = int(limit)
    self.nonfinite_in_a_row = 0
    self.nonfinite_total = 0
    self.first: tuple[int, float] | None = None
    self.last: tuple[int, float] | None = None
    self.last_finite: tuple[int, float] | None = None

  def consume(self, step: int, metrics: dict[str, Any]) -> dict[str, float]:
    host = {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}
    loss = host["loss"]
    if self.first is None:
      self.first = (step, loss)
    self.last = (step, loss)
    if host.get("finite", 1.0) and math.isfinite(loss):
      self.nonfinite_in_a_row = 0
      self.last_finite = (step, loss)
    else:
      self.nonfinite_in_a_row += 1
      self.nonfinite_total += 1
      if self.nonfinite_in_a_row >= self.limit:
        raise NonFiniteLossError(
            f"{self.nonfinite_in_a_row} non-finite losses in a row (train.max_nonfinite="
            f"{self.limit}), last at step {step} (loss {loss}); their updates were skipped "
            "and no checkpoint was saved since the first of them. Lower the learning "
            "rate (e.g. --config.diffusion.optim.learning_rate) or check the data.")
    return host


class MetricWriter:
  """TensorBoard events + metrics.jsonl + console lines, on process 0 only."""

  def __init__(self, directory: str, enabled: bool):
    self.enabled = enabled
    self.tb = None
    self.jsonl = None
    if enabled:
      from tensorboardX import SummaryWriter
      os.makedirs(directory, exist_ok=True)
      self.tb = SummaryWriter(os.path.join(directory, "tb"), flush_secs=30)
      self.jsonl = open(os.path.join(directory, "metrics.jsonl"), "a")

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    for k, v in scalars.items():
      if k != "data_fingerprint" and v is not None:
        self.tb.add_scalar(f"train/{k}", v, step)
    self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self.jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self.tb.close()
      self.jsonl.close()
      self.enabled = False


def data_fingerprint(batch: dict[str, np.ndarray]) -> float:
  """A cheap host-side checksum of a batch (for tests of the data order)."""
  x = batch["latents"] if "latents" in batch else batch["video"]
  w = np.arange(1, x.shape[0] + 1, dtype=np.float64).reshape(-1, *([1] * (x.ndim - 1)))
  return float(np.sum(x.astype(np.float64) * w))


# ----------------------------------------------------------------------------
# The trainer.


class Trainer:
  """Runs `config.stage` in `<workdir>/<stage>/` (see the module docstring)."""

  def __init__(self, config, workdir: str):
    if not workdir:
      raise ValueError("--workdir is required (the run's directory)")
    self.config = config
    self.workdir = os.path.abspath(workdir)
    self.spec = check_config(config)
    self.stage = config.stage
    self.stage_dir = checkpointing.stage_dir(self.workdir, self.stage)
    self.checkpoint_dir = checkpointing.checkpoint_dir(self.workdir, self.stage)

  def run(self) -> dict[str, Any]:
    """Trains to `train.steps` (resuming); returns a summary dict."""
    config = self.config
    cache_dir = enable_compilation_cache()
    files = resolve_data(config, self.workdir)
    source = records.RecordSource(files)
    episodes = None
    if self.spec.adversarial:
      a = config.adversarial
      check_data(source, config, a.segment_frames, "adversarial.segment_frames")
      episodes = records.RecordSource(episode_files(config, files))
      check_data(episodes, config, a.rollout_frames, "adversarial.rollout_frames")
    else:
      check_data(source, config)

    # before anything is allocated: will the state fit the devices at hand?
    # (the message gives the memory per device and a config to use instead)
    if not self.spec.vae:  # the estimate models the DiT's train state
      memory.check_fits(config)
    mesh = parallel.make_mesh(config.mesh)
    bsize = int(config.train.batch_size)
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    if bsize % batch_devices:
      raise ValueError(f"config field train.batch_size={bsize} is not divisible by the "
                       f"mesh's data x fsdp = {batch_devices} devices; use a multiple of "
                       f"{batch_devices} or change config.mesh")
    per_process = pipeline.per_process_batch_size(bsize)
    total = int(config.train.steps)

    model = build_vae(config) if self.spec.vae else build_generator(config)
    tx = optimizers.make_optimizer(self.spec.optim(config), total)
    disc = disc_tx = None
    if self.spec.adversarial:
      disc = build_discriminator(config)
      disc_tx = optimizers.make_optimizer(config.adversarial.disc_optim, total)
    roles = dict(teacher=self.spec.teacher, disc=disc, disc_tx=disc_tx)
    boxed, _ = state_lib.abstract_state(model, tx, config.train.seed, **roles)
    shardings = state_lib.state_shardings(boxed, mesh)
    abstract = nn.meta.unbox(boxed)
    parallel.check_divisible(abstract.gen_params, shardings.gen_params)
    if disc is not None:
      parallel.check_divisible(abstract.disc_params, shardings.disc_params)

    s2d = config.data.space_to_depth or 1
    # stored VAE latents are raw: the DiT sees them normalised, as the decoder expects
    stats = None if config.data.space_to_depth or self.spec.vae else (
        tuple(config.vae.latents_mean), tuple(config.vae.latents_std))
    if self.spec.adversarial:
      ds = pipeline.make_adversarial_dataset(
          source, episodes, segment_frames=config.adversarial.segment_frames,
          rollout_frames=config.adversarial.rollout_frames, batch_size=per_process,
          seed=config.train.seed, space_to_depth=s2d, latent_stats=stats)
    else:
      ds = pipeline.make_dataset(source, clip_frames=config.train.clip_frames,
                                 batch_size=per_process, seed=config.train.seed,
                                 space_to_depth=s2d, pixels=self.spec.vae, latent_stats=stats)
    iterator = pipeline.make_iterator(ds)

    ckpt = checkpointing.Checkpointer(self.checkpoint_dir, keep=config.checkpoint.keep)
    guard = checkpointing.PreemptionGuard(ckpt).install()
    writer = None
    try:
      with jax.set_mesh(mesh):
        target = checkpointing.abstract_with_shardings(abstract, shardings)
        latest, state, data_restored = ckpt.restore_latest(target, iterator=iterator,
                                                           config=config, report=_log)
        if latest is not None:
          resume_check.check_resume(ckpt.read_config(latest), config, workdir=self.workdir,
                                    stage=self.stage, step=latest, log=_log,
                                    record=is_main_process())
          _log(f"resuming {self.stage} from step {latest}: {ckpt.step_dir(latest)}"
               + ("" if data_restored else
                  " (no data iterator state for this process count: the data order "
                  "starts afresh)"))
        else:
          state, _ = state_lib.create_train_state(model, tx, mesh, config.train.seed,
                                                  **roles)
          if self.spec.previous or config.init_from:  # stage 1 too: e.g. converted Wan weights
            state = self._init_from(state, shardings)
          if self.spec.adversarial:
            state = self._disc_init_from(state, shardings)
        start = int(jax.device_get(state.step))
        _log(f"{self.stage}: {total} steps, global batch {bsize} on mesh "
             f"{dict(mesh.shape)} ({jax.device_count()} devices, {jax.process_count()} "
             f"processes); data {config.data.path} ({len(source)} records)\n"
             f"  checkpoints -> {self.checkpoint_dir} (every "
             f"{config.checkpoint.every_steps} steps, keep {config.checkpoint.keep})\n"
             f"  tensorboard -> {os.path.join(self.stage_dir, 'tb')}; metrics -> "
             f"{os.path.join(self.stage_dir, 'metrics.jsonl')}\n"
             f"  compilation cache -> {cache_dir}")
        if start >= total:
          _log(f"{self.stage}: already at step {start} >= train.steps={total}; nothing "
               "to do (raise --config.train.steps to train on)")
          return {"stage": self.stage, "start_step": start, "step": start,
                  "steps_run": 0, "preempted": False, "first_loss": None,
                  "final_loss": None, "seconds": 0.0, "seconds_per_step": None,
                  "checkpoint": ckpt.step_dir(start) if start in ckpt.all_steps() else None}

        make = self.spec.make_step
        step_fn = jax.jit(make(model, tx, config, disc, disc_tx) if disc is not None
                          else make(model, tx, config),
                          in_shardings=(shardings, parallel.batch_sharding(mesh)),
                          out_shardings=(shardings, None), donate_argnums=0)
        writer = MetricWriter(self.stage_dir, enabled=is_main_process())
        return self._loop(state, step_fn, iterator, ckpt, guard, writer, mesh, start,
                          total)
    finally:
      guard.uninstall()
      ckpt.close()
      if writer is not None:
        writer.close()

  def _load_generator(self, source: str, previous: str, field: str, target):
    """A checkpoint's EMA generator params fitted to `target` (zero-padded
    input columns / zero new leaves, see loading.adapt_params)."""
    try:
      _, params = loading.load_generator_params(source)
    except FileNotFoundError as e:
      raise FileNotFoundError(
          f"stage {self.stage!r} starts from a {previous!r} checkpoint: {e}; run stage "
          f"{previous!r} in this --workdir first or set config.{field}") from None
    try:
      params, notes = loading.adapt_params(params, target)
    except ValueError as e:
      raise ValueError(f"config.{field}={source!r}: {e}") from None
    where = loading.resolve_step_dir(source)
    for note in notes:
      _log(f"{self.stage}: {field} {where}: {note}")
    return params, where

  def _init_from(self, state, shardings):
    """Starts the generator (and the teacher) from the previous stage's EMA
    params: `config.init_from`, else `<workdir>/<previous stage>`."""
    source = self.config.init_from or os.path.join(self.workdir, self.spec.previous)
    params, where = self._load_generator(source, self.spec.previous or "init_from",
                                         "init_from", state.gen_params)

    def placed():  # fresh device buffers per field (the state is donated)
      return jax.tree.map(lambda a, s: jax.device_put(a, s), params, shardings.gen_params)

    state = state.replace(gen_params=placed(), ema_params=placed())
    if self.spec.teacher:
      state = state.replace(teacher_params=placed())
    _log(f"{self.stage}: generator{' and teacher' if self.spec.teacher else ''} from "
         f"{where} (EMA params)")
    return state

  def _disc_init_from(self, state, shardings):
    """The discriminator's backbone from the stage-1 (diffusion) generator:
    `config.disc_init_from`, else `<workdir>/diffusion`; its heads keep their init."""
    source = self.config.disc_init_from or os.path.join(self.workdir, "diffusion")
    params, where = self._load_generator(source, "diffusion", "disc_init_from",
                                         state.gen_params)
    disc_params = params_from_generator(jax.device_get(state.disc_params), params)
    state = state.replace(disc_params=jax.tree.map(
        lambda a, s: jax.device_put(np.asarray(a), s), disc_params, shardings.disc_params))
    _log(f"{self.stage}: discriminator backbone from {where} (EMA params)")
    return state

  def _loop(self, state, step_fn, iterator, ckpt, guard, writer, mesh, start, total):
    config = self.config
    every = int(config.checkpoint.every_steps)
    log_every = int(config.train.log_every)
    bsharding = parallel.batch_sharding(mesh)
    metrics = Metrics(config.train.max_nonfinite)
    bar = None
    if is_main_process():
      from tqdm import tqdm
      bar = tqdm(total=total, initial=start, unit="step", desc=self.stage,
                 dynamic_ncols=True, mininterval=0.5, file=sys.stderr)
    t0 = time.time()
    t_first = None   # when step start+1's metrics were read (after its compile)
    pending = None   # (step, metrics, fingerprint) of the last dispatched step
    step = start
    preempted = False

    def consume():
      nonlocal pending, t_first
      if pending is None:
        return
      s, m, fp = pending
      pending = None
      host = metrics.consume(s, m)
      if t_first is None:
        t_first = time.time()
      if bar is not None:
        bar.set_postfix(loss=f"{host['loss']:.4f}", refresh=False)
      if s % log_every == 0 or s == total or s == start + 1:
        writer.write(s, {**host, "data_fingerprint": fp})
        if bar is not None and (s % log_every == 0 or s == total):
          bar.write(f"step {s:>7d}  loss {host['loss']:.5f}  grad_norm "
                    f"{host['grad_norm']:.4f}  skipped {metrics.nonfinite_total}")

    def save(s):
      consume()  # a save never follows an unread step (non-finite check first)
      if metrics.nonfinite_in_a_row:
        if bar is not None:
          bar.write(f"{self.stage}: not saving step {s}: its loss was non-finite "
                    f"({metrics.nonfinite_in_a_row} in a row)")
        return
      ckpt.save(s, state, iterator=iterator, config=config)

    try:
      compiled = None
      while step < total:
        if guard.requested(step):
          preempted = True
          break
        batch = next(iterator)
        fp = data_fingerprint(batch) if (step + 1) % log_every == 0 or \
            step + 1 in (total, start + 1) else None
        gbatch = pipeline.make_global_batch(batch, bsharding)
        if compiled is None:  # compile ahead, then start all processes together
          t = time.time()
          compiled = step_fn.lower(state, gbatch).compile()
          barrier(f"aapt_jax:{self.stage}:compiled:{start}")
          if bar is not None:
            bar.write(f"{self.stage}: step compiled in {time.time() - t:.1f} s")
        state, m = compiled(state, gbatch)
        step += 1
        consume()                      # the previous step's metrics
        pending = (step, m, fp)
        if bar is not None:
          bar.update(1)
        if step % every == 0 or step == total:
          save(step)
      consume()
      if preempted:
        save(step)
      ckpt.wait()
      if preempted:
        latest = ckpt.latest_step()
        _log(f"\n{self.stage}: stopped by {guard.signal_name or 'preemption'} at step "
             f"{step}; latest checkpoint: "
             f"{ckpt.step_dir(latest) if latest is not None else 'none'}. Rerun the same "
             "command to resume.")
    finally:
      if bar is not None:
        bar.close()
    seconds = time.time() - t0
    run_steps = step - start
    per_step = ((time.time() - t_first) / (run_steps - 1)
                if t_first is not None and run_steps > 1 else None)
    summary = {
        "stage": self.stage, "start_step": start, "step": step, "steps_run": run_steps,
        "preempted": preempted,
        "first_loss": metrics.first[1] if metrics.first else None,
        "final_loss": metrics.last[1] if metrics.last else None,
        "nonfinite_steps": metrics.nonfinite_total,
        "seconds": seconds, "seconds_per_step": per_step,
        "checkpoint": ckpt.step_dir(step) if step in ckpt.all_steps() else None,
    }
    _log(format_summary(summary))
    return summary


def format_summary(s: dict[str, Any]) -> str:
  if not s["steps_run"]:
    return f"{s['stage']}: no steps run (at step {s['step']})."
  per = (f", {s['seconds_per_step'] * 1e3:.1f} ms/step after the first"
         if s["seconds_per_step"] else "")
  return (f"{s['stage']}: steps {s['start_step']} -> {s['step']} ({s['steps_run']} run) in "
          f"{s['seconds']:.1f} s{per}; loss {s['first_loss']:.5f} (first) -> "
          f"{s['final_loss']:.5f} (final); {s.get('nonfinite_steps', 0)} non-finite "
          f"step(s) skipped" + (f"; checkpoint {s['checkpoint']}" if s["checkpoint"] else ""))


def stage_config(config, stage: str):
  """A copy of a pipeline config for one of its stages (its steps from
  `pipeline.<stage>_steps`, 0 = train.steps)."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.stage = stage
    steps = int(config.pipeline[f"{stage}_steps"])
    if steps:
      c.train.steps = steps
  return c


def train(config, workdir: str) -> list[dict[str, Any]]:
  """Runs `config.stage`; `pipeline` runs diffusion -> consistency ->
  adversarial in `workdir` (each resuming or skipping when already done,
  each starting from the one before) and then writes `<workdir>/sample.mp4`.
  Returns the stages' summaries."""
  if config.stage != "pipeline":
    return [Trainer(config, workdir).run()]
  configs = [stage_config(config, s) for s in PIPELINE]
  for c in configs:  # every stage's config is checked before the first one trains
    check_config(c)
  summaries = []
  for c in configs:
    _log(f"\npipeline: stage {c.stage} ({c.train.steps} steps)")
    summaries.append(Trainer(c, workdir).run())
    if summaries[-1]["preempted"]:  # SIGTERM ends the run; a rerun resumes this stage
      _log(f"pipeline: stopped during stage {c.stage}; rerun the same command to resume")
      return summaries
    for later in configs:  # later stages reuse the data the first one resolved
      with later.unlocked():
        later.data.path = c.data.path
  if is_main_process() and config.pipeline.sample_frames:
    from aapt_jax.inference.video import generate_video
    out = os.path.join(os.path.abspath(workdir), "sample.mp4")
    path, stats = generate_video(configs[-1], checkpoint=workdir,
                                 frames=int(config.pipeline.sample_frames),
                                 seed=config.train.seed, out=out)
    from aapt_jax.inference.quality import describe
    _log(f"pipeline: sample video {path}: {stats['video_frames']} frames at "
         f"{stats['frames_per_s']} frames/s (mean pixel {stats['mean_pixel']}, "
         f"std {stats['std_pixel']})\n{describe(stats)}")
    summaries.append({"stage": "sample", "video": path, **stats})
  return summaries
