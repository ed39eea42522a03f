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

Its pieces live in rooms of their own: the program (networks, abstract state,
shardings, the jitted step: program.py), the checks (validation.py), the
record files (data_files.py) and the metrics (metrics.py); `stage="pipeline"`
is aapt_jax/pipeline.py. Only process 0 writes TensorBoard events (`<workdir>/<stage>/tb`),
`<workdir>/<stage>/metrics.jsonl`, `<workdir>/<stage>/summary.json` (the
dict `run` returns) and the console (absl logging; a tqdm bar with a table
row every `train.log_every` steps).
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any

import jax
import numpy as np

from aapt_jax import checkpointing, loading, parallel
from aapt_jax.data import pipeline, records
from aapt_jax.models.discriminator import params_from_generator
from aapt_jax.parallel import barrier, is_main_process
from aapt_jax.training import memory, resume_check
from aapt_jax.training.data_files import episode_files, resolve_data
from aapt_jax.training.metrics import (MetricWriter, NonFiniteWatcher, ProfileWindow,
                                       StepTimer, compiled_analysis, data_fingerprint,
                                       format_summary, log, peak_flops_per_device,
                                       write_summary)
from aapt_jax.training.program import build_train_program, enable_compilation_cache
from aapt_jax.training.validation import check_config, check_data


SUMMARY = "summary.json"  # <workdir>/<stage>/summary.json: what `run` returns


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

    program = build_train_program(config, mesh)

    s2d = config.data.space_to_depth or 1
    # stored VAE latents are raw: the DiT sees them normalised, as the decoder expects
    stats = None if config.data.space_to_depth or self.spec.vae else (
        tuple(config.vae.latents_mean), tuple(config.vae.latents_std))
    # records' caption embeddings reach a model that takes text, padded to data.text_len
    text_len = int(config.data.text_len) if config.model.text_dim else None
    if self.spec.adversarial:
      ds = pipeline.make_adversarial_dataset(
          source, episodes, segment_frames=config.adversarial.segment_frames,
          rollout_frames=config.adversarial.rollout_frames, batch_size=per_process,
          seed=config.train.seed, space_to_depth=s2d, latent_stats=stats, text_len=text_len,
          rollout_targets=bool(config.adversarial.rollout_mse_weight))
    else:
      ds = pipeline.make_dataset(source, clip_frames=config.train.clip_frames,
                                 batch_size=per_process, seed=config.train.seed,
                                 space_to_depth=s2d, pixels=self.spec.vae, latent_stats=stats,
                                 text_len=text_len)
    iterator = pipeline.make_iterator(ds)

    ckpt = checkpointing.Checkpointer(self.checkpoint_dir, keep=config.checkpoint.keep)
    guard = checkpointing.PreemptionGuard(ckpt).install()
    writer = None
    try:
      with jax.set_mesh(mesh):
        latest, state, data_restored = ckpt.restore_latest(
            program.abstract_state, iterator=iterator, config=config, report=log)
        if latest is not None:
          resume_check.check_resume(checkpointing.read_config(ckpt.step_dir(latest)), config,
                                    workdir=self.workdir, stage=self.stage, step=latest,
                                    log=log, record=is_main_process())
          log(f"resuming {self.stage} from step {latest}: {ckpt.step_dir(latest)}"
              + ("" if data_restored else
                 " (no data iterator state for this process count: the data order "
                 "starts afresh)"))
        else:
          state = program.init_state()
          if self.spec.previous or config.init_from:  # stage 1 too: e.g. converted Wan weights
            state = self._init_from(state, program.shardings)
          if self.spec.adversarial:
            state = self._disc_init_from(state, program.shardings)
        start = int(jax.device_get(state.step))
        log(f"{self.stage}: {total} steps, global batch {bsize} on mesh "
            f"{dict(mesh.shape)} ({jax.device_count()} devices, {jax.process_count()} "
            f"processes); data {config.data.path} ({len(source)} records)\n"
            f"  checkpoints -> {self.checkpoint_dir} (every "
            f"{config.checkpoint.every_steps} steps, keep {config.checkpoint.keep})\n"
            f"  tensorboard -> {os.path.join(self.stage_dir, 'tb')}; metrics -> "
            f"{os.path.join(self.stage_dir, 'metrics.jsonl')}\n"
            f"  compilation cache -> {cache_dir}")
        if start >= total:
          log(f"{self.stage}: already at step {start} >= train.steps={total}; nothing "
              "to do (raise --config.train.steps to train on)")
          summary = {"stage": self.stage, "start_step": start, "step": start,
                     "steps_run": 0, "preempted": False, "first_loss": None,
                     "final_loss": None, "nonfinite_steps": 0, "seconds": 0.0,
                     "seconds_per_step": None, "resumed_from": latest,
                     "checkpoint": ckpt.step_dir(start) if start in ckpt.all_steps()
                     else None}
          write_summary(os.path.join(self.stage_dir, SUMMARY), summary)
          return summary

        writer = MetricWriter(self.stage_dir, enabled=is_main_process())
        summary = self._loop(state, program, iterator, ckpt, guard, writer, start, total)
        summary["resumed_from"] = latest
        write_summary(os.path.join(self.stage_dir, SUMMARY), summary)
        return summary
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
    where = loading.generator_location(source)
    for note in notes:
      log(f"{self.stage}: {field} {where}: {note}")
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
    log(f"{self.stage}: generator{' and teacher' if self.spec.teacher else ''} from "
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
    log(f"{self.stage}: discriminator backbone from {where} (EMA params)")
    return state

  def _loop(self, state, program, iterator, ckpt, guard, writer, start, total):
    config = self.config
    every = int(config.checkpoint.every_steps)
    log_every = int(config.train.log_every)
    bsharding = program.batch_sharding
    metrics = NonFiniteWatcher(config.train.max_nonfinite)
    tokens = program.tokens_per_step()
    timer = StepTimer(tokens, 6 * program.param_count() * tokens if tokens else None,
                      peak_flops_per_device(config), jax.device_count())
    profile = ProfileWindow(os.path.join(self.stage_dir, "tb"), min(start + 2, total),
                            int(config.train.profile_steps) if is_main_process() else 0)
    analysis = {}
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
      now = time.time()
      if t_first is None:
        t_first = now
      perf = timer.tick(s, now)
      if bar is not None:
        bar.set_postfix(loss=f"{host['loss']:.4f}", refresh=False)
      if s % log_every == 0 or s == total or s == start + 1:
        writer.write(s, {**{f"train/{k}": v for k, v in host.items()}, **perf,
                         "data_fingerprint": fp})
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
          compiled = program.step.lower(state, gbatch).compile()
          barrier(f"aapt_jax:{self.stage}:compiled:{start}")
          analysis = compiled_analysis(compiled)
          log(f"{self.stage}: step compiled in {time.time() - t:.1f} s; "
              + ", ".join(f"{k} {v:.4g}" for k, v in analysis.items()))
        profile.before(step + 1)
        state, m = compiled(state, gbatch)
        step += 1
        consume()                      # the previous step's metrics
        pending = (step, m, fp)
        profile.after(step, (state, m))  # (the traced steps' perf/* include its overhead)
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
        log(f"{self.stage}: stopped by {guard.signal_name or 'preemption'} at step "
            f"{step}; latest checkpoint: "
            f"{ckpt.step_dir(latest) if latest is not None else 'none'}. Rerun the same "
            "command to resume.")
    finally:
      profile.stop()
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
        "compiled": analysis,
    }
    log(format_summary(summary))
    return summary
