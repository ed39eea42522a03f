"""Stages 2 and 3 as pure, jitted steps on the tiny model: they run, update
what they should and nothing else."""
import flax.linen as nn
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


@pytest.mark.parametrize("clips_per_forward", [0, 2])
def test_judging_all_clips_in_one_forward_equals_one_forward_each(clips_per_forward):
  """Stage 3 judges every segment (real, fake, and their R1/R2-noised copies)
  in one D forward (0), or a few clips per forward one after another (2: two
  forwards, the second padded with a zero clip), zero-padding partial
  segments at the end: each clip's logits, and D's gradient of a sum of
  them, must equal judging it alone (D is block-causal), with its own
  actions, controls, text and diffusion noise; a clip without a condition
  the others have is an error, not zeros."""
  from aapt_jax.models import Conditioning
  from aapt_jax.models.discriminator import init_discriminator_params
  config = load_config(config_path("tiny.py"), {"adversarial.disc_noise_input": True})
  disc = build_discriminator(config)
  params = jax.tree.map(lambda a: a + 0.05, init_discriminator_params(disc, jax.random.key(3)))
  params = __import__("flax").linen.meta.unbox(params)["params"]
  lengths = (4, 3, 2)
  ks = iter(jax.random.split(jax.random.key(4), 6 * len(lengths) + 1))
  clips = [jax.random.normal(next(ks), (B, n, 4, 4, 4)) for n in lengths]
  noises = [jax.random.normal(next(ks), (B, n, 4, 4, 4)) for n in lengths]
  conds = [Conditioning(actions=jax.random.randint(next(ks), (B, n), 0, 5),
                        controls=jax.random.normal(next(ks), (B, n, 3)),
                        text=jax.random.normal(next(ks), (B, 5, 12)),
                        text_mask=jnp.arange(5)[None] < jnp.array([[2 + i], [5]]))
           for i, n in enumerate(lengths)]
  t = jax.random.uniform(next(ks), (B,))
  weights = [jnp.arange(1.0, 1.0 + n) for n in lengths]
  objective = lambda logits: sum(jnp.sum(jnp.sin(l) * w) for l, w in zip(logits, weights))

  def judged(p):
    logits = stages._judge_all(disc, p, clips, conds, t, 4, noises, clips_per_forward)
    return objective(logits), logits

  (_, together), grad = jax.jit(jax.value_and_grad(judged, has_aux=True))(params)
  alone = [stages._judge(disc, params, clip, t, cond, noise)
           for clip, cond, noise in zip(clips, conds, noises)]
  for clip, got, want in zip(clips, together, alone):
    assert got.shape == clip.shape[:2]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
  want_grad = jax.grad(lambda p: objective([stages._judge(disc, p, clip, t, cond, noise)
                                            for clip, cond, noise in zip(clips, conds, noises)]))
  for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(want_grad(params))):
    # float32 sums in another order (one forward against several): gradients
    # of size ~2 agree to ~2e-5 (jax 0.10.2); a wrong judging differs by O(1)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)
  with pytest.raises(ValueError, match="controls"):
    stages._judge_all(disc, params, clips[:2], [conds[0], conds[1].replace(controls=None)], t, 4)


# --------------------------------------------------------------------------
# Stage 3. One compiled step (recompute, text + controls + actions in play)
# serves most tests: they run it on variants of one batch.

ADV = {"mesh.data": 1, "adversarial.rollout_frames": 6, "adversarial.segment_frames": 4,
       "adversarial.segment_overlap": 1, "adversarial.gen_optim.learning_rate": 1e-3,
       "adversarial.disc_optim.learning_rate": 1e-3}
L_TEXT = 5


def _adversarial_setup(**overrides):
  config = load_config(config_path("tiny.py"), {**ADV, **overrides})
  model = build_generator(config)
  disc = build_discriminator(config)
  gen_tx = optimizers.make_optimizer(config.adversarial.gen_optim, 10)
  disc_tx = optimizers.make_optimizer(config.adversarial.disc_optim, 10)
  mesh = _single_mesh(config)
  with jax.set_mesh(mesh):
    state = build_train_program(with_stage(config, "adversarial"), mesh).init_state()
  step = stages.make_adversarial_step(model, disc, gen_tx, disc_tx, config)
  return dict(config=config, model=model, disc=disc, mesh=mesh, state=state, step=step)


def _adversarial_batch(config, seed=1):
  """Real clips and a rollout, each with its own actions, controls and text."""
  m, a = config.model, config.adversarial
  rng = np.random.default_rng(seed)
  frame = (*m.latent_size, m.latent_channels)
  f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  batch = {}
  for prefix, n in (("", a.segment_frames), ("rollout_", a.rollout_frames)):
    batch.update({prefix + "actions": rng.integers(0, m.num_actions, (B, n)).astype(np.int32),
                  prefix + "controls": f32(B, n, m.control_dim),
                  prefix + "text_embedding": f32(B, L_TEXT, m.text_dim),
                  prefix + "text_mask": np.arange(L_TEXT)[None] < np.array([[3], [5]])})
  batch["latents"] = f32(B, a.segment_frames, *frame)
  batch["rollout_first"] = f32(B, *frame)
  return batch


@pytest.fixture(scope="module")
def adversarial():
  s = _adversarial_setup()
  s["jitted"] = jax.jit(s["step"])
  s["batch"] = _adversarial_batch(s["config"])

  def run(batch):
    with jax.set_mesh(s["mesh"]):
      return s["jitted"](s["state"], batch)

  s["run"] = run
  s["new"], s["metrics"] = run(s["batch"])
  return s


def test_adversarial_step_updates_generator_and_discriminator(adversarial):
  new, metrics, state = adversarial["new"], adversarial["metrics"], adversarial["state"]
  for k in ("loss", "d_loss", "r1"):
    assert np.isfinite(float(metrics[k])), k
  assert float(metrics["r1"]) > 0
  assert bool(metrics["finite"]) and bool(metrics["d_finite"])
  assert _changed(state.gen_params, new.gen_params)
  assert _changed(state.disc_params, new.disc_params)
  assert int(new.step) == 1


@pytest.mark.slow
def test_adversarial_step_with_scan_gradient_runs():
  s = _adversarial_setup(**{"adversarial.gradient": "scan"})
  with jax.set_mesh(s["mesh"]):
    new, metrics = jax.jit(s["step"])(s["state"], _adversarial_batch(s["config"]))
  assert np.isfinite(float(metrics["loss"])) and float(metrics["r1"]) > 0
  assert _changed(s["state"].gen_params, new.gen_params)
  assert _changed(s["state"].disc_params, new.disc_params)


def _losses_by_hand(s):
  """The step's D loss (RpGAN, before the update) and G loss (against the
  updated D), from D's logits on the same inputs: the student-forcing rollout
  of the step's noises (state.rng's second key), reals and fakes each with
  their own actions, controls and text, clean frames at t = 0, segment 0's
  frame 0 in neither loss."""
  from aapt_jax import rollout as ro
  from aapt_jax.models import Conditioning
  from aapt_jax.objectives import adversarial as adv
  config, model, disc = s["config"], s["model"], s["disc"]
  state, new, batch = s["state"], s["new"], s["batch"]
  a = config.adversarial
  first = jnp.asarray(batch["rollout_first"])
  _, k_noise = jax.random.split(jax.random.wrap_key_data(state.rng), 6)[:2]
  noise = jax.random.normal(k_noise, (B, a.rollout_frames - 1) + first.shape[1:])
  inputs = jnp.concatenate([first[:, None], noise], axis=1)
  cond = lambda p: Conditioning(actions=batch[p + "actions"], controls=batch[p + "controls"],
                                text=batch[p + "text_embedding"], text_mask=batch[p + "text_mask"])
  real_cond, roll_cond = cond(""), cond("rollout_")
  rolled, _ = ro.rollout_student_forcing(model, state.gen_params, inputs, roll_cond)
  pick = lambda c, i, j: c.replace(actions=c.actions[:, i:j], controls=c.controls[:, i:j])
  logits = lambda dp, x, c: disc.apply({"params": dp}, x, jnp.zeros(x.shape[:2]), c)
  d_loss = g_loss = 0.0
  for s0 in adv.segment_starts(a.rollout_frames, a.segment_frames, a.segment_overlap):
    fake = rolled[:, s0:s0 + a.segment_frames]
    n = fake.shape[1]
    real = jnp.asarray(batch["latents"][:, :n])
    w = np.ones((B, n))
    w[:, 0] = 0.0 if s0 == 0 else 1.0
    for dp, sign in ((state.disc_params, 1.0), (new.disc_params, -1.0)):
      diff = logits(dp, fake, pick(roll_cond, s0, s0 + n)) - logits(dp, real, pick(real_cond, 0, n))
      term = float(jnp.sum(w * jax.nn.softplus(sign * diff)) / w.sum())
      if sign > 0:
        d_loss += term
      else:
        g_loss += term
  return d_loss, g_loss


def test_adversarial_losses_by_hand(adversarial):
  d_loss, g_loss = _losses_by_hand(adversarial)
  m = adversarial["metrics"]
  assert float(m["d_loss"]) == pytest.approx(d_loss, rel=2e-4, abs=1e-5)
  assert float(m["loss"]) == pytest.approx(g_loss, rel=2e-4, abs=1e-5)


def test_rollout_mse_adds_the_rollouts_error_against_its_real_frames():
  """adversarial.rollout_mse_weight = w: G's loss is the RpGAN loss plus w
  times the squared error of the judged rollout frames against the batch's
  "rollout_latents", each segment's weighted mean (segment 0's frame 0,
  the real start frame, dropped), averaged over the segments."""
  from aapt_jax import rollout as ro
  from aapt_jax.models import Conditioning
  from aapt_jax.objectives import adversarial as adv
  w = 3.0
  s = _adversarial_setup(**{"adversarial.rollout_mse_weight": w})
  config, a = s["config"], s["config"].adversarial
  batch = _adversarial_batch(config)
  rng = np.random.default_rng(7)
  batch["rollout_latents"] = rng.standard_normal(
      (B, a.rollout_frames) + batch["rollout_first"].shape[1:]).astype(np.float32)
  with jax.set_mesh(s["mesh"]):
    new, m = jax.jit(s["step"])(s["state"], batch)
  s.update(new=new, batch=batch)
  _, g_adv = _losses_by_hand(s)
  # the rollout by hand, as _losses_by_hand makes it
  first = jnp.asarray(batch["rollout_first"])
  _, k_noise = jax.random.split(jax.random.wrap_key_data(s["state"].rng), 6)[:2]
  noise = jax.random.normal(k_noise, (B, a.rollout_frames - 1) + first.shape[1:])
  cond = Conditioning(actions=batch["rollout_actions"], controls=batch["rollout_controls"],
                      text=batch["rollout_text_embedding"], text_mask=batch["rollout_text_mask"])
  rolled, _ = ro.rollout_student_forcing(s["model"], s["state"].gen_params,
                                         jnp.concatenate([first[:, None], noise], 1), cond)
  rolled, target = np.asarray(rolled), batch["rollout_latents"]
  starts = adv.segment_starts(a.rollout_frames, a.segment_frames, a.segment_overlap)
  mse = 0.0
  for s0 in starts:
    err = ((rolled - target)[:, s0:s0 + a.segment_frames] ** 2).mean(axis=(2, 3, 4))  # [B, S]
    if s0 == 0:
      err = err[:, 1:]
    mse += err.mean() / len(starts)
  assert float(m["g_adv"]) == pytest.approx(g_adv, rel=2e-4, abs=1e-5)
  assert float(m["rollout_mse"]) == pytest.approx(mse, rel=2e-4)
  assert float(m["loss"]) == pytest.approx(g_adv + w * mse, rel=2e-4)


def test_rollout_mse_needs_student_forcing_and_a_weight_at_least_zero():
  from aapt_jax.training.validation import check_config
  for overrides, match in (({"adversarial.rollout_mse_weight": -1.0}, ">= 0"),
                           ({"adversarial.rollout_mse_weight": 1.0,
                             "adversarial.forcing": "teacher"}, "forcing")):
    config = with_stage(load_config(config_path("tiny.py"), {**ADV, **overrides}), "adversarial")
    with pytest.raises(ValueError, match=match):
      check_config(config)


def test_rollout_and_fakes_carry_controls_and_text(adversarial):
  """The rollout's controls and text reach the rollout and D's fake segments:
  changing them changes both losses; the real clips' controls reach D."""
  base, run = adversarial["metrics"], adversarial["run"]
  for key in ("rollout_controls", "rollout_text_embedding", "controls"):
    batch = dict(adversarial["batch"])
    batch[key] = batch[key] + 1.0
    _, m = run(batch)
    assert abs(float(m["d_loss"]) - float(base["d_loss"])) > 1e-6, key
    assert abs(float(m["loss"]) - float(base["loss"])) > 1e-6, key


def test_mismatched_conditions_are_named():
  s = _adversarial_setup()
  batch = _adversarial_batch(s["config"])
  del batch["rollout_controls"]
  with pytest.raises(ValueError, match="rollout_controls"), jax.set_mesh(s["mesh"]):
    jax.eval_shape(s["step"], s["state"], batch)


def test_noise_input_shares_one_diffusion_noise_between_x_and_its_perturbed_copy():
  """With adversarial.disc_noise_input, D(x) and D(x + σε) see the same
  diffusion noise: at σ = 0 the approximate R1/R2 are exactly 0."""
  s = _adversarial_setup(**{"adversarial.disc_noise_input": True, "adversarial.r1_sigma": 0.0,
                            "adversarial.rollout_frames": 4,
                            "adversarial.segment_frames": 4})
  with jax.set_mesh(s["mesh"]):
    _, metrics = jax.jit(s["step"])(s["state"], _adversarial_batch(s["config"]))
  assert np.isfinite(float(metrics["d_loss"]))
  assert float(metrics["r1"]) < 1e-12


def _count_scans(jaxpr, length):
  """scan equations of `length` steps in a (closed) jaxpr and its sub-jaxprs."""
  count = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "scan" and eqn.params["length"] == length:
      count += 1
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          count += _count_scans(sub.jaxpr, length)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          count += _count_scans(sub, length)
  return count


@pytest.mark.parametrize("gradient, scans", [("recompute", 1), ("scan", 2)])
def test_the_rollout_runs_once_per_step(gradient, scans):
  """The D phase and the G phase share one rollout: "recompute" scans the
  frames once (the G phase re-runs them in parallel); "scan" scans once and
  differentiates that scan (its forward and its transpose)."""
  s = _adversarial_setup(**{"adversarial.gradient": gradient})
  with jax.set_mesh(s["mesh"]):
    jaxpr = jax.make_jaxpr(s["step"])(s["state"], _adversarial_batch(s["config"]))
  assert _count_scans(jaxpr.jaxpr, ADV["adversarial.rollout_frames"] - 1) == scans


def test_teacher_forcing_judges_one_step_frames_of_the_real_clip():
  """adversarial.forcing="teacher" (claim (a)'s ablation): no rollout; the
  fakes are G's one-step frames of the real clip from its real previous
  frames, judged against that clip with its own conditions. The step's D and
  G losses equal those computed by hand from D's logits."""
  from aapt_jax import rollout as ro
  from aapt_jax.models import Conditioning
  s = _adversarial_setup(**{"adversarial.forcing": "teacher"})
  batch = _adversarial_batch(s["config"])
  with jax.set_mesh(s["mesh"]):
    jaxpr = jax.make_jaxpr(s["step"])(s["state"], batch)
    new, m = jax.jit(s["step"])(s["state"], batch)
  assert _count_scans(jaxpr.jaxpr, ADV["adversarial.rollout_frames"] - 1) == 0
  model, disc, state, a = s["model"], s["disc"], s["state"], s["config"].adversarial
  real = jnp.asarray(batch["latents"])                             # [B, S, h, w, C]
  _, k_noise = jax.random.split(jax.random.wrap_key_data(state.rng), 6)[:2]
  noise = jax.random.normal(k_noise, (B, a.rollout_frames - 1) + real.shape[2:])
  inputs = jnp.concatenate([real[:, :1], noise[:, :real.shape[1] - 1]], axis=1)
  cond = Conditioning(actions=batch["actions"], controls=batch["controls"],
                      text=batch["text_embedding"], text_mask=batch["text_mask"])
  fake = ro.recompute_frames(model, state.gen_params, inputs, real, cond)
  # the fake's frame i >= 1 is the one-step frame eps - v(eps, 1 | real frame i - 1)
  v1 = model.apply({"params": state.gen_params}, inputs[:, :2],
                   jnp.array([[0.0, 1.0]] * B), cond.replace(
                       previous=jnp.concatenate([jnp.zeros_like(real[:, :1]), real[:, :1]], 1),
                       actions=cond.actions[:, :2], controls=cond.controls[:, :2]))
  np.testing.assert_allclose(np.asarray(fake[:, 1]), np.asarray(inputs[:, 1] - v1[:, 1]),
                             atol=1e-5)
  w = np.ones(real.shape[:2])
  w[:, 0] = 0.0
  logits = lambda dp, x: disc.apply({"params": dp}, x, jnp.zeros(x.shape[:2]), cond)
  for dp, sign, key in ((state.disc_params, 1.0, "d_loss"), (new.disc_params, -1.0, "loss")):
    diff = logits(dp, fake) - logits(dp, real)
    by_hand = float(jnp.sum(w * jax.nn.softplus(sign * diff)) / w.sum())
    assert float(m[key]) == pytest.approx(by_hand, rel=2e-4, abs=1e-5), key
  assert _changed(state.gen_params, new.gen_params)


def test_judging_a_clip_per_forward_holds_one_forwards_activations():
  """adversarial.disc_clips_per_forward: the backward pass of D judged one clip
  per forward (lax.map, rematerialised) holds about one forward's activations
  instead of all clips' (compiled temp memory, fp32; 8 clips -> well under
  half), and the logits are the ones of a single forward."""
  from aapt_jax.models import Conditioning
  from aapt_jax.models.discriminator import init_discriminator_params
  config = load_config(config_path("tiny.py"), {"model.latent_size": (16, 16),
                                                "model.num_layers": 4})
  disc = build_discriminator(config)
  params = nn.meta.unbox(init_discriminator_params(disc, jax.random.key(3)))["params"]
  ks = jax.random.split(jax.random.key(5), 8)
  clips = [jax.random.normal(key, (B, 4, 16, 16, 4)) for key in ks]
  conds = [Conditioning()] * len(clips)
  t = jnp.zeros((B,))

  def compiled(per):
    loss = lambda p: sum(jnp.sum(jnp.sin(l)) for l in stages._judge_all(
        disc, p, clips, conds, t, 4, None, per))
    return jax.jit(jax.value_and_grad(loss)).lower(params).compile()

  one, each = compiled(0), compiled(1)
  ratio = each.memory_analysis().temp_size_in_bytes / one.memory_analysis().temp_size_in_bytes
  assert ratio < 0.4, ratio
  np.testing.assert_allclose(float(one(params)[0]), float(each(params)[0]), rtol=1e-5)
