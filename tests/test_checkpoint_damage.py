"""Checkpoints that survive damage: a committed step that no longer restores
is set aside and the previous kept step used; a failed (background) save
surfaces at once, the first error kept, and `close` never hides it."""
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from orbax.checkpoint._src.path import atomicity

from aapt_jax import checkpointing


def _state(scale):
  return {"w": jnp.arange(1000.0) * scale, "b": jnp.ones((3,)) * scale}


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      state)


def _saved(directory, steps=(1, 2, 3)):
  with checkpointing.Checkpointer(str(directory)) as ckpt:
    for step in steps:
      ckpt.save(step, _state(step))
  return str(directory)


def _shards(directory, step):
  """The step's array data files, largest first."""
  return sorted(glob.glob(os.path.join(directory, str(step), "state", "**", "d", "*"),
                          recursive=True), key=os.path.getsize, reverse=True)


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_damaged_latest_step_falls_back_to_the_previous_kept_step(tmp_path, damage):
  directory = _saved(tmp_path / "ckpt")
  shard = _shards(directory, 3)[0]
  if damage == "truncate":
    with open(shard, "r+b") as f:
      f.truncate(10)
  else:
    os.remove(shard)
  reports = []
  with checkpointing.Checkpointer(directory) as ckpt:
    step, state, _ = ckpt.restore_latest(_abstract(_state(1)), report=reports.append)
    assert step == 2 and ckpt.all_steps() == [1, 2]
    np.testing.assert_array_equal(np.asarray(state["w"]), np.arange(1000.0) * 2)
    assert ckpt.save(3, _state(30))  # the step is free again: a rerun saves it anew
  report, = reports
  assert "checkpoint step 3" in report and "failed to restore" in report
  assert "resuming from step 2" in report and "1 steps lost" in report
  assert os.path.isdir(os.path.join(directory, "3" + checkpointing.DAMAGED_SUFFIX))
  with checkpointing.Checkpointer(directory) as ckpt:  # a new manager: the damaged step stays aside
    assert ckpt.all_steps() == [1, 2, 3]
    step, state, _ = ckpt.restore_latest(_abstract(_state(1)), report=reports.append)
  assert step == 3 and float(state["w"][1]) == 30.0 and len(reports) == 1


def test_every_kept_step_damaged_is_an_error_and_a_mismatch_is_never_skipped(tmp_path):
  directory = _saved(tmp_path / "ckpt", steps=(1, 2))
  with checkpointing.Checkpointer(directory) as ckpt:  # another model: raised, nothing renamed
    other = {"w": jax.ShapeDtypeStruct((7,), jnp.float32), "b": _abstract(_state(1))["b"]}
    with pytest.raises(checkpointing.CheckpointMismatch, match=r"w: checkpoint \(1000,\)"):
      ckpt.restore_latest(other)
  assert sorted(os.listdir(directory)) == ["1", "2"]
  for step in (1, 2):
    os.remove(_shards(directory, step)[0])
  with checkpointing.Checkpointer(directory) as ckpt:
    with pytest.raises(ValueError, match=r"no kept checkpoint .* restores: step 2: .*step 1: "):
      ckpt.restore_latest(_abstract(_state(1)), report=lambda m: None)
  with checkpointing.Checkpointer(str(tmp_path / "empty")) as ckpt:
    assert ckpt.restore_latest(_abstract(_state(1))) == (None, None, False)


def _disk_full(monkeypatch, errors):
  """The background commit (tmp dir -> step dir) fails as on a full disk."""
  async def finalize(self, *args, **kwargs):
    errors.append(OSError(28, f"No space left on device (failure {len(errors) + 1})"))
    raise errors[-1]
  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", finalize)


def test_a_failed_background_save_surfaces_at_once_with_the_first_error(tmp_path,
                                                                         monkeypatch):
  directory = _saved(tmp_path / "ckpt", steps=(1,))
  errors = []
  _disk_full(monkeypatch, errors)
  ckpt = checkpointing.Checkpointer(directory)
  guard = checkpointing.PreemptionGuard(ckpt)
  assert ckpt.save(2, _state(2))  # returns at once; the write fails in the background
  with pytest.raises(checkpointing.CheckpointSaveError) as first:
    while not guard.requested(2):  # what the training loop asks every step
      pass
  assert "step 2" in str(first.value) and "No space left on device (failure 1)" in str(first.value)
  assert first.value.__cause__ is errors[0]
  for again in (lambda: ckpt.save(3, _state(3)), ckpt.wait, ckpt.raise_save_error):
    with pytest.raises(checkpointing.CheckpointSaveError) as later:
      again()
    assert later.value is first.value  # the first error, never a later one
  assert len(errors) == 1  # no save was started after the failure
  ckpt.close()  # already raised: a `finally: close()` does not replace it
  assert checkpointing.Checkpointer(directory).all_steps() == [1]


def test_close_raises_a_save_error_nobody_has_seen(tmp_path, monkeypatch):
  errors = []
  _disk_full(monkeypatch, errors)
  ckpt = checkpointing.Checkpointer(str(tmp_path / "ckpt"))
  ckpt.save(1, _state(1))
  with pytest.raises(checkpointing.CheckpointSaveError, match="No space left on device"):
    ckpt.close()
