"""Loading a trained generator from a run / stage / step directory."""
import os

import jax
import numpy as np
import pytest

from aapt_jax import checkpointing, load_config, loading, parallel
from aapt_jax.models import build_generator
from aapt_jax.training.program import build_train_program
from helpers import config_path


def test_load_ema_params_from_any_level_of_a_run(tmp_path):
  config = load_config(config_path("tiny.py"), {"mesh.data": 1})
  mesh = parallel.make_mesh(config.mesh, jax.devices()[:1])
  with jax.set_mesh(mesh):
    state = build_train_program(config, mesh).init_state()
  state = state.replace(ema_params=jax.tree.map(lambda a: a + 1.0, state.ema_params))
  run = str(tmp_path / "run")
  with checkpointing.Checkpointer(checkpointing.checkpoint_dir(run, "diffusion")) as ckpt:
    ckpt.save(3, state, config=config)
    ckpt.save(7, state, config=config)
  step_dir = os.path.join(run, "diffusion", "checkpoints", "7")
  for path in (run, os.path.join(run, "diffusion"), step_dir):
    assert loading.resolve_step_dir(path) == step_dir
  loaded_config, params = loading.load_generator_params(run)
  assert loaded_config.model.dim == config.model.dim
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state.ema_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # the restored tree is what the model applies
  build_generator(loaded_config)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a directory"):
    loading.resolve_step_dir(str(tmp_path / "nope"))
  with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
    loading.resolve_step_dir(str(tmp_path))


def test_adapt_params_pads_input_columns_keeps_new_leaves_and_names_misfits():
  rng = np.random.default_rng(0)
  old = {"patch": {"kernel": rng.standard_normal((4, 3)).astype(np.float32)},
         "head": {"bias": rng.standard_normal((3,)).astype(np.float32)}}
  target = {"patch": {"kernel": np.ones((6, 3), np.float32)},
            "head": {"bias": np.ones((3,), np.float32)},
            "action_embedding": {"embedding": np.full((5, 3), 7.0, np.float32)}}
  new, notes = loading.adapt_params(old, target)
  np.testing.assert_array_equal(new["patch"]["kernel"][:4], old["patch"]["kernel"])
  np.testing.assert_array_equal(new["patch"]["kernel"][4:], 0.0)   # new input columns
  np.testing.assert_array_equal(new["head"]["bias"], old["head"]["bias"])
  np.testing.assert_array_equal(new["action_embedding"]["embedding"], 7.0)  # fresh init kept
  assert any("patch/kernel (4, 3)->(6, 3)" in n for n in notes)
  assert any("action_embedding/embedding" in n for n in notes)
  bad = {**old, "head": {"bias": np.zeros((4,), np.float32)}}      # larger than the model
  with pytest.raises(ValueError, match=r"head/bias: checkpoint \(4,\) vs model \(3,\)"):
    loading.adapt_params(bad, target)
  extra = {**old, "other": {"w": np.zeros((2,), np.float32)}}
  with pytest.raises(ValueError, match="other/w: not in the model"):
    loading.adapt_params(extra, target)
