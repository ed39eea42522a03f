"""Checkpoints of a training stage: one Orbax `CheckpointManager` per stage.

Layout (what `aapt_jax.loading` reads, and `init_from` accepts)::

    <workdir>/<stage>/checkpoints/<step>/
        state/    the sharded TrainState (Orbax PyTree, tensorstore)
        data/     each process's grain iterator state (process_<i>-of-<n>.json)
        config/   the run's config (JSON)

Saves are asynchronous: `save` returns once the arrays are copied off the
devices (the trainer may then donate them to the next step); the files are
written in a background thread into ``<step>.orbax-checkpoint-tmp`` and
renamed to ``<step>`` only when every item of every process is written. A
process killed mid-save leaves only the tmp directory, which `latest_step`
never returns (and the next manager deletes). `restore` reads onto an
abstract target whose leaves carry the *new* shardings, so a checkpoint
restores onto any mesh shape (or one device). `check_compatible` compares
the checkpoint's array shapes with the target's before anything is restored
or trained, so a config with another model shape fails with the fields that
differ instead of training (and saving) over the checkpoint.

Damage: `restore_latest` tries the committed steps newest first; a step that
fails to restore (a truncated or deleted shard, unreadable metadata) is
reported, renamed ``<step>.damaged`` (kept for inspection, never listed
again) and the previous kept step is used. A failed save surfaces at once:
`raise_save_error` (cheap, called by `PreemptionGuard.requested` every step)
raises `CheckpointSaveError` as soon as the background write has failed, with
the first error kept; `save`, `wait` and `close` raise it too, and `close`
never replaces an error already raised with a later one.

Preemption: `PreemptionGuard` turns a SIGTERM (or a first Ctrl-C) into a
flag in single-process runs and asks Orbax's `reached_preemption` (JAX's
preemption service, which owns SIGTERM under `jax.distributed`) in
multi-process runs; the trainer then saves and exits 0.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

STATE, DATA, CONFIG = "state", "data", "config"
DAMAGED_SUFFIX = ".damaged"  # a step that failed to restore, set aside


class CheckpointMismatch(ValueError):
  """The checkpoint is sound but holds another model than the config builds."""


class CheckpointSaveError(RuntimeError):
  """A checkpoint save (possibly in the background) failed; its cause chained."""

# Replicated shards are split across replicas for writing (replica-parallel)
# only where a replica's slice is at least this big: slicing costs one small
# compile per distinct shape, which dominated the first save of small models.
MIN_REPLICA_PARALLEL_SLICE_BYTES = 4 << 20


def _type_handlers():
  th = ocp.type_handlers
  return th.create_type_handler_registry(
      (int, th.ScalarHandler()), (float, th.ScalarHandler()),
      (np.number, th.ScalarHandler()), (np.ndarray, th.NumpyHandler()),
      (str, th.StringHandler()),
      (jax.Array, th.ArrayHandler(
          use_replica_parallel=True,
          min_slice_bytes_for_replica_parallel=MIN_REPLICA_PARALLEL_SLICE_BYTES)))


class _QuietMetadataWarning(logging.Filter):
  """Orbax warns on every read of a step whose item lacks its own metadata
  file (the manager keeps it a level up): noise in a user's terminal."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Metadata file does not exist")


logging.getLogger("absl").addFilter(_QuietMetadataWarning())


def stage_dir(workdir: str, stage: str) -> str:
  return os.path.join(os.path.abspath(workdir), stage)


def checkpoint_dir(workdir: str, stage: str) -> str:
  """`<workdir>/<stage>/checkpoints`."""
  return os.path.join(stage_dir(workdir, stage), "checkpoints")


def config_to_dict(config) -> dict[str, Any]:
  """A JSON-able dict of a ConfigDict (tuples become lists)."""
  if isinstance(config, ml_collections.ConfigDict):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(config, default=str))


def flatten_config(d, prefix=""):
  """{"a.b.c": value} of a nested dict (a config's `config_to_dict`)."""
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(flatten_config(v, key + "."))
    else:
      out[key] = v
  return out


def read_config(step_dir: str) -> ml_collections.ConfigDict:
  """The config a step directory was saved with (its `config` item, read
  through Orbax's JSON handler, the API that wrote it). ValueError when the
  checkpoint has none or it is unreadable."""
  where = os.path.join(step_dir, CONFIG)
  try:
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
      return ml_collections.ConfigDict(checkpointer.restore(where))
  except (OSError, ValueError) as e:
    raise ValueError(f"checkpoint {step_dir} has no readable config ({where}): {e}") from None


def config_diff(saved: dict, current: dict, sections=("model",)) -> list[str]:
  """`field: checkpoint=..., config=...` for each differing field of `sections`."""
  a, b = flatten_config(saved), flatten_config(current)
  keys = sorted(k for k in set(a) | set(b) if k.split(".")[0] in sections)
  return [f"{k}: checkpoint={a.get(k, '<absent>')!r}, config={b.get(k, '<absent>')!r}"
          for k in keys if a.get(k) != b.get(k)]


def _path_str(path) -> str:
  parts = []
  for p in path:
    for attr in ("name", "key", "idx"):
      if hasattr(p, attr):
        parts.append(str(getattr(p, attr)))
        break
    else:
      parts.append(str(p))
  return "/".join(parts)


def named_leaves(tree) -> dict[str, Any]:
  """{"a/b/c": leaf} in the tree's leaf order."""
  return {_path_str(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _leaf_shapes(tree) -> dict[str, tuple[tuple[int, ...], str]]:
  """{path: (shape, dtype)} of the array leaves of a state or its metadata."""
  out = {}
  leaves = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))[0]
  for path, leaf in leaves:
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
      out[_path_str(path)] = (tuple(leaf.shape), np.dtype(leaf.dtype).name)
  return out


class Checkpointer:
  """The checkpoints of one stage directory.

  Args:
    directory: `<workdir>/<stage>/checkpoints` (created on the first save).
    keep: checkpoints kept (older ones are deleted after a newer one commits).
    async_save: write in a background thread (the default).
  """

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    if int(keep) < 1:
      raise ValueError(f"config field checkpoint.keep must be >= 1, got {keep}")
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=int(keep), create=True, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={STATE: ocp.PyTreeCheckpointHandler(type_handler_registry=_type_handlers()),
                       DATA: grain.checkpoint.CheckpointHandler(),
                       CONFIG: ocp.JsonCheckpointHandler()})
    self._save_error: CheckpointSaveError | None = None  # the first failed save
    self._save_error_raised = False
    self._saving_step: int | None = None  # the save in flight, if any

  # -------------------------------------------------------------- queries

  def all_steps(self) -> list[int]:
    """Steps of the complete (committed) checkpoints, ascending."""
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest complete checkpoint (never a half-written one), or None."""
    return self.manager.latest_step()

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def has_data_state(self, step: int) -> bool:
    """Whether `step` holds this process's iterator state for this process count."""
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    return os.path.exists(os.path.join(self.step_dir(step), DATA, name))

  def check_compatible(self, step: int, abstract_state, config=None) -> None:
    """ValueError naming every array whose shape/dtype (or presence) differs
    between the checkpoint at `step` and `abstract_state`, with the config
    fields that differ, before anything is restored or trained."""
    saved = _leaf_shapes(self.manager.item_metadata(step)[STATE])
    wanted = _leaf_shapes(abstract_state)
    problems = []
    for k in list(wanted) + [k for k in saved if k not in wanted]:  # state order
      if k not in saved:
        problems.append(f"{k}: not in the checkpoint (config wants {wanted[k][0]} "
                        f"{wanted[k][1]})")
      elif k not in wanted:
        problems.append(f"{k}: in the checkpoint ({saved[k][0]} {saved[k][1]}) but not "
                        "in the state this config builds")
      elif saved[k] != wanted[k]:
        problems.append(f"{k}: checkpoint {saved[k][0]} {saved[k][1]}, config "
                        f"{wanted[k][0]} {wanted[k][1]}")
    if not problems:
      return
    diff = []
    if config is not None:
      try:
        diff = config_diff(read_config(self.step_dir(step)).to_dict(), config_to_dict(config),
                           sections=("model", "diffusion", "stage"))
      except Exception:  # a checkpoint without a readable config  # noqa: BLE001
        diff = []
    lines = [f"the checkpoint {self.step_dir(step)} does not match this config"]
    if diff:
      lines += ["config fields that differ from the checkpoint's:"] + [f"  {d}" for d in diff]
    lines.append(f"arrays that differ ({len(problems)}):")
    lines += [f"  {p}" for p in problems[:6]]
    if len(problems) > 6:
      lines.append(f"  ... and {len(problems) - 6} more")
    lines.append("Use the config the checkpoint was written with, or a new --workdir; "
                 "nothing was trained or saved.")
    raise CheckpointMismatch("\n".join(lines))

  # -------------------------------------------------------------- save / restore

  def save(self, step: int, state, *, iterator=None, config=None, force: bool = True) -> bool:
    """Starts an async save of `state` (+ iterator state, config) at `step`.

    Returns False if `step` is already saved. The arrays are copied off the
    devices before this returns, so `state` may be donated right after.
    """
    step = int(step)
    self.raise_save_error()
    if step in self.manager.all_steps():
      return False
    items = {STATE: ocp.args.PyTreeSave(state)}
    if iterator is not None:
      items[DATA] = grain.checkpoint.CheckpointSave(iterator)
    if config is not None:
      items[CONFIG] = ocp.args.JsonSave(config_to_dict(config))
    try:
      saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
    except Exception as e:  # noqa: BLE001 - an earlier background save's error lands here too
      self._raise(e, self._saving_step if self._saving_step is not None else step)
    self._saving_step = step if saved else self._saving_step
    return saved

  def _raise(self, error: BaseException, step: int | None):
    """Raises the first save error (recorded now if it is the first)."""
    if self._save_error is None:
      self._save_error = CheckpointSaveError(
          f"saving the checkpoint of step {step} in {self.directory} failed: "
          f"{type(error).__name__}: {error}")
      self._save_error.__cause__ = error
    self._save_error_raised = True
    raise self._save_error

  def raise_save_error(self) -> None:
    """Raises `CheckpointSaveError` if a save failed (the first error, at
    every call) once the background save is over; cheap and non-blocking:
    call it every step."""
    if self._save_error is not None:
      self._raise(self._save_error, None)
    if self._saving_step is None or self.manager.is_saving_in_progress():
      return
    try:  # the save is over: joining its finished thread re-raises what it raised
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - orbax raises what the writer raised
      self._raise(e, self._saving_step)
    self._saving_step = None

  def restore(self, step: int, abstract_state, *, iterator=None):
    """The state at `step` on `abstract_state`'s shardings (any mesh); with
    `iterator`, also sets its position (in place) when the checkpoint holds
    this process's iterator state. Returns (state, iterator_restored)."""
    items = {STATE: ocp.args.PyTreeRestore(
        abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))}
    data = iterator is not None and self.has_data_state(step)
    if data:
      items[DATA] = grain.checkpoint.CheckpointRestore(iterator)
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    return out[STATE], data

  def restore_latest(self, abstract_state, *, iterator=None, config=None, report=None):
    """(step, state, iterator_restored) of the newest committed step that
    restores (`check_compatible`, then `restore`), or (None, None, False)
    when there is none. A step that fails to restore is set aside as
    `<step>.damaged` (process 0) and `report`ed (default: stderr) naming it,
    the error and the step used instead. `CheckpointMismatch` (a sound
    checkpoint of another model) is raised, never skipped; ValueError when
    every kept step is damaged."""
    report = report or (lambda m: print(m, file=sys.stderr, flush=True))
    damaged = []
    for step in reversed(self.all_steps()):
      try:
        self.check_compatible(step, abstract_state, config)
        state, data = self.restore(step, abstract_state, iterator=iterator)
      except CheckpointMismatch:
        raise
      except Exception as e:  # noqa: BLE001 - any read error means a damaged step
        damaged.append((step, f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"))
        continue
      if damaged:
        self._set_aside([d for d, _ in damaged])
        report("\n".join(f"checkpoint step {d} in {self.directory} failed to restore ({why}); "
                         f"set aside as {d}{DAMAGED_SUFFIX}" for d, why in damaged)
               + f"\nresuming from step {step}, the previous kept step, instead of step "
               f"{damaged[0][0]} ({damaged[0][0] - step} steps lost)")
      return step, state, data
    if damaged:
      raise ValueError(f"no kept checkpoint in {self.directory} restores: "
                       + "; ".join(f"step {d}: {why}" for d, why in damaged)
                       + ". Move the directory away (or use a new --workdir) to start afresh.")
    return None, None, False

  def _set_aside(self, steps) -> None:
    """Renames the `steps` directories to `<step>.damaged` so that no later
    listing, save or restore sees them, and re-reads the manager's steps."""
    if jax.process_index() == 0:
      for step in steps:
        target = self.step_dir(step) + DAMAGED_SUFFIX
        if os.path.exists(target):
          target += f".{int(time.time())}"
        os.rename(self.step_dir(step), target)
    self.manager.reload()

  def reached_preemption(self, step: int) -> bool:
    """Orbax's preemption sync point (only ever True under jax.distributed)."""
    return self.manager.reached_preemption(int(step))

  def wait(self) -> None:
    """Blocks until the pending async save is committed; raises
    `CheckpointSaveError` (the first one) if a save failed."""
    self.raise_save_error()
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      self._raise(e, self._saving_step)
    self._saving_step = None

  def close(self) -> None:
    """Waits for the pending save and closes the manager. Raises the first
    save error unless it was raised already (so a `finally: close()` never
    replaces the error the loop is propagating with itself or a later one)."""
    raised_before, error = self._save_error_raised, None
    try:
      self.wait()
    except CheckpointSaveError as e:
      error = e
    try:
      self.manager.close()
    except Exception:  # noqa: BLE001 - after a failed save, the first error is the one to see
      if self._save_error is None:
        raise
    if error is not None and not raised_before:
      raise error

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def abstract_with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs carrying `shardings`: a restore target for any mesh."""
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract_tree, shardings)


class PreemptionGuard:
  """Tells the training loop to save and stop.

  Single-process runs: SIGTERM (and a first Ctrl-C, SIGINT) sets a flag; a
  second Ctrl-C interrupts at once. Handlers are installed by `install` and
  removed by `uninstall`. Multi-process runs: JAX's preemption service owns
  SIGTERM; `requested(step)` asks Orbax's `reached_preemption(step)`, which
  every process answers alike at the same step.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, checkpointer: Checkpointer | None = None):
    self.checkpointer = checkpointer
    self.flag = threading.Event()
    self.signal_name: str | None = None
    self._previous: dict[int, Any] = {}

  def install(self) -> PreemptionGuard:
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handler)
    return self

  def _handler(self, signum, frame):
    del frame
    if signum == signal.SIGINT:
      if self.flag.is_set():
        raise KeyboardInterrupt
      sys.stderr.write("\ninterrupted: saving a checkpoint, then stopping (Ctrl-C again "
                       "to stop without saving)\n")
    self.signal_name = signal.Signals(signum).name
    self.flag.set()

  def requested(self, step: int) -> bool:
    """Whether the loop should save and stop now. Also raises
    `CheckpointSaveError` as soon as a background save has failed, so the
    loop stops at the next step instead of training on without checkpoints."""
    if self.checkpointer is not None:
      self.checkpointer.raise_save_error()
    if self.flag.is_set():
      return True
    if jax.process_count() > 1 and self.checkpointer is not None:
      if self.checkpointer.reached_preemption(step):
        self.signal_name = "preemption notice"
        return True
    return False

  def uninstall(self) -> None:
    for sig, previous in self._previous.items():
      signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
    self._previous = {}

  def __enter__(self):
    return self.install()

  def __exit__(self, *exc):
    self.uninstall()
