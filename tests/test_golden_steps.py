"""Golden one-step values per stage on configs/tiny.py: from a fixed seed and
a fixed batch, one step's loss and checksums of the parameters it leaves
(their sum, and the summed absolute change). A silent change of any stage's
maths (loss, noise draws, optimizer, masking, EMA) moves these numbers.

The numbers were computed once from the code before the training package was
reorganised (issue 17) and must not change with a refactor. Change them only
with a deliberate change of a stage's maths, and say so in the commit.
"""
import jax
import numpy as np
import pytest

from aapt_jax import load_config, parallel
from aapt_jax.training.program import build_train_program
from helpers import config_path

VAE_TINY = {"vae.base_dim": 8, "vae.z_dim": 4, "vae.dim_mult": (1, 2),
            "vae.num_res_blocks": 1, "vae.temperal_downsample": (True,),
            "model.latent_size": (4, 4), "vae.optim.learning_rate": 3e-3}
ADV_TINY = {"adversarial.rollout_frames": 4, "adversarial.segment_frames": 3,
            "adversarial.segment_overlap": 1, "adversarial.gen_optim.learning_rate": 1e-3,
            "adversarial.disc_optim.learning_rate": 1e-3, "model.text_dim": 0,
            "model.control_dim": 0}


def _batch(stage, spec=None):
  """A fixed batch of global size 2 for `stage` (numpy, seed 0)."""
  rng = np.random.default_rng(0)
  if stage == "vae":
    return {"video": rng.integers(0, 256, (2, 5, 8, 8, 3), dtype=np.uint8)}
  if stage == "adversarial":
    return {"latents": rng.standard_normal((2, 3, 4, 4, 4)).astype(np.float32),
            "actions": rng.integers(0, 5, (2, 3)).astype(np.int32),
            "rollout_first": rng.standard_normal((2, 4, 4, 4)).astype(np.float32),
            "rollout_actions": rng.integers(0, 5, (2, 4)).astype(np.int32)}
  return {"latents": rng.standard_normal((2, 5, 4, 4, 4)).astype(np.float32),
          "actions": rng.integers(0, 5, (2, 5)).astype(np.int32),
          "controls": rng.standard_normal((2, 5, 3)).astype(np.float32),
          "text_embedding": rng.standard_normal((2, 6, 12)).astype(np.float32),
          "text_mask": np.arange(6)[None, :] < np.array([[6], [3]])}


def one_step(stage, overrides):
  """(state before, state after, metrics) of one step of `stage` on one device."""
  config = load_config(config_path("tiny.py"), {
      "stage": stage, "mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1, "train.seed": 7,
      "train.steps": 10,
      "consistency.num_steps": 8, "consistency.optim.learning_rate": 1e-3,
      "diffusion.optim.learning_rate": 1e-3, **overrides})
  mesh = parallel.make_mesh(config.mesh, jax.devices()[:1])
  program = build_train_program(config, mesh)
  with jax.set_mesh(mesh):
    state = program.init_state()
    before = jax.device_get(state)
    new, metrics = program.step(state, _batch(stage))   # donates `state`
  return before, jax.device_get(new), jax.device_get(metrics)


def checksums(before, after, field="gen_params"):
  """(sum of the new params, summed |new - old|), in float64."""
  new = [np.asarray(x, np.float64) for x in jax.tree.leaves(getattr(after, field))]
  old = [np.asarray(x, np.float64) for x in jax.tree.leaves(getattr(before, field))]
  return (float(sum(x.sum() for x in new)),
          float(sum(np.abs(x - y).sum() for x, y in zip(new, old))))


def _check(stage, overrides, loss, total, moved, field="gen_params"):
  before, after, metrics = one_step(stage, overrides)
  got = (float(metrics["loss"]),) + checksums(before, after, field)
  print(f"{stage}: loss {got[0]!r}, sum {got[1]!r}, moved {got[2]!r}")
  assert bool(metrics["finite"]) and int(after.step) == 1 and int(after.skipped) == 0
  np.testing.assert_allclose(got, (loss, total, moved), rtol=2e-5)
  return before, after, metrics


def test_golden_vae_step():
  _check("vae", VAE_TINY, *GOLDEN["vae"])


def test_golden_diffusion_step():
  _check("diffusion", {}, *GOLDEN["diffusion"])


def test_golden_consistency_step():
  before, after, _ = _check("consistency", {}, *GOLDEN["consistency"])
  assert checksums(before, after, "teacher_params")[1] == 0.0


@pytest.mark.slow
@pytest.mark.ci
def test_golden_adversarial_step():
  before, after, metrics = _check("adversarial", ADV_TINY, *GOLDEN["adversarial"][:3])
  got = (float(metrics["d_loss"]),) + checksums(before, after, "disc_params")
  print(f"adversarial D: {got!r}")
  assert bool(metrics["d_finite"])
  np.testing.assert_allclose(got, GOLDEN["adversarial"][3:], rtol=2e-5)


# stage: (loss, sum of gen params after, summed |change|[, D loss, D sum, D |change|])
GOLDEN = {
    "vae": (0.5475119352340698, 320.6744932857214, 348.08256492454655),
    "diffusion": (4.258915901184082, 239.7595665516924, 38.95358582823064),
    "consistency": (0.11918701231479645, 239.23313704302132, 38.95542232857292),
    # changed deliberately by the stage-3 fixes of issue 13 (D at t = 0, frame 0 of
    # segment 0 masked, one rollout per step): was (2.3084, 109.633, 62.689, 0.97937, ...)
    "adversarial": (2.44368839263916, 109.937266632935, 62.73877069323453,
                    0.9232110977172852, 203.5573297647927, 83.07944822201236),
}
