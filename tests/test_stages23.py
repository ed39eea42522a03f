"""Stages 2 and 3 as pure, jitted steps on the tiny model: they run, update
what they should and nothing else."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aapt_jax import load_config, parallel
from aapt_jax.models import build_generator
from aapt_jax.models.discriminator import build_discriminator
from aapt_jax.training import optimizers, stages
from aapt_jax.training.program import build_train_program, with_stage
from helpers import config_path

B = 2


def _changed(a, b):
  return any(float(jnp.abs(x - y).max()) > 0 for x, y in zip(jax.tree.leaves(a),
                                                               jax.tree.leaves(b)))


def _single_mesh(config):
  return parallel.make_mesh(config.mesh, jax.devices()[:1])


def test_consistency_step_updates_student_not_teacher():
  config = load_config(config_path("tiny.py"), {
      "mesh.data": 1, "consistency.optim.learning_rate": 1e-3, "consistency.num_steps": 8,
      "consistency.shift": 3.0})
  model = build_generator(config)
  tx = optimizers.make_optimizer(config.consistency.optim, 10)
  mesh = _single_mesh(config)
  with jax.set_mesh(mesh):
    state = build_train_program(with_stage(config, "consistency"), mesh).init_state()
    rng = np.random.default_rng(0)
    batch = {"latents": rng.standard_normal((B, 4, 4, 4, 4)).astype(np.float32),
             "actions": rng.integers(0, 5, (B, 4)).astype(np.int32)}
    step = jax.jit(stages.make_consistency_step(model, tx, config))
    new, metrics = step(state, batch)
  assert bool(metrics["finite"]) and float(metrics["loss"]) > 0
  assert _changed(state.gen_params, new.gen_params)
  assert not _changed(state.teacher_params, new.teacher_params)


@pytest.mark.slow
@pytest.mark.parametrize("gradient", [pytest.param("recompute", marks=pytest.mark.ci), "scan"])
def test_adversarial_step_updates_generator_and_discriminator(gradient):
  config = load_config(config_path("tiny.py"), {
      "mesh.data": 1, "adversarial.rollout_frames": 6, "adversarial.segment_frames": 4,
      "adversarial.segment_overlap": 1, "adversarial.gradient": gradient,
      "adversarial.gen_optim.learning_rate": 1e-3, "adversarial.disc_optim.learning_rate": 1e-3,
      "model.text_dim": 0, "model.control_dim": 0})
  model = build_generator(config)
  disc = build_discriminator(config)
  gen_tx = optimizers.make_optimizer(config.adversarial.gen_optim, 10)
  disc_tx = optimizers.make_optimizer(config.adversarial.disc_optim, 10)
  mesh = _single_mesh(config)
  with jax.set_mesh(mesh):
    state = build_train_program(with_stage(config, "adversarial"), mesh).init_state()
    rng = np.random.default_rng(1)
    batch = {"latents": rng.standard_normal((B, 4, 4, 4, 4)).astype(np.float32),
             "actions": rng.integers(0, 5, (B, 4)).astype(np.int32),
             "rollout_first": rng.standard_normal((B, 4, 4, 4)).astype(np.float32),
             "rollout_actions": rng.integers(0, 5, (B, 6)).astype(np.int32)}
    step = jax.jit(stages.make_adversarial_step(model, disc, gen_tx, disc_tx, config))
    new, metrics = step(state, batch)
  for k in ("loss", "d_loss", "r1"):
    assert np.isfinite(float(metrics[k])), k
  assert float(metrics["r1"]) > 0
  assert _changed(state.gen_params, new.gen_params)
  assert _changed(state.disc_params, new.disc_params)
  assert int(new.step) == 1


def test_judging_all_clips_in_one_forward_equals_one_forward_each():
  """Stage 3 judges every segment (real, fake, and their R1/R2-noised copies)
  in one D forward, zero-padding partial segments at the end: each clip's
  logits must equal judging it alone (D is block-causal)."""
  from aapt_jax.models import Conditioning
  from aapt_jax.models.discriminator import init_discriminator_params
  config = load_config(config_path("tiny.py"), {"model.text_dim": 0, "model.control_dim": 0})
  disc = build_discriminator(config)
  params = jax.tree.map(lambda a: a + 0.05, init_discriminator_params(disc, jax.random.key(3)))
  params = __import__("flax").linen.meta.unbox(params)["params"]
  ks = jax.random.split(jax.random.key(4), 4)
  clips = [jax.random.normal(ks[0], (B, 4, 4, 4, 4)), jax.random.normal(ks[1], (B, 3, 4, 4, 4))]
  conds = [Conditioning(actions=jax.random.randint(ks[2], (B, 4), 0, 5)),
           Conditioning(actions=None)]
  t = jax.random.uniform(ks[3], (B,))
  together = jax.jit(lambda p: stages._judge_all(disc, p, clips, conds, t, None, 4))(params)
  for clip, cond, got in zip(clips, conds, together):
    if cond.actions is None:
      cond = cond.replace(actions=jnp.zeros(clip.shape[:2], jnp.int32))
    alone = stages._judge(disc, params, clip, t, cond, None)
    assert got.shape == clip.shape[:2]
    np.testing.assert_allclose(np.asarray(got), np.asarray(alone), atol=1e-5, rtol=1e-5)
