"""Stage 1 (diffusion adaptation): flow-matching maths by hand, the sharded
step equals the unsharded one, parameters and activations really sharded,
non-finite updates skipped."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aapt_jax import load_config, parallel
from aapt_jax.objectives import flow_matching as fm
from aapt_jax.training import stages
from aapt_jax.training.program import build_train_program
from helpers import config_path


def test_shift_interpolate_target_by_hand():
  t = jnp.array([[0.0, 0.5, 1.0]])
  np.testing.assert_allclose(np.asarray(fm.shift_timesteps(t, 3.0)), [[0.0, 0.75, 1.0]])
  np.testing.assert_allclose(np.asarray(fm.shift_timesteps(t, 1.0)), np.asarray(t))
  x0 = jnp.full((1, 3, 2, 2, 1), 2.0)
  noise = jnp.full((1, 3, 2, 2, 1), -1.0)
  xt = fm.interpolate(x0, noise, t)
  np.testing.assert_allclose(np.asarray(xt[0, :, 0, 0, 0]), [2.0, 0.5, -1.0])
  v = fm.velocity_target(x0, noise)
  np.testing.assert_allclose(np.asarray(v), -3.0)
  # x_0 = x_t - t v recovers the clean frame
  np.testing.assert_allclose(np.asarray(xt - t[..., None, None, None] * v), np.asarray(x0))


def test_loss_by_hand_and_zero_for_perfect_velocity():
  target = jnp.zeros((2, 3, 1, 1, 2))
  velocity = target.at[:, 1].set(1.0).at[:, 2].set(2.0)  # frame errors 0, 1, 4
  weights = jnp.ones((2, 3)).at[:, 0].set(0.0)
  assert float(fm.loss(velocity, target)) == pytest.approx((0 + 1 + 4) / 3)
  assert float(fm.loss(velocity, target, weights)) == pytest.approx((1 + 4) / 2)
  assert float(fm.loss(target, target, weights)) == 0.0


def test_teacher_forcing_inputs():
  latents = jax.random.normal(jax.random.key(0), (2, 4, 2, 2, 3))
  noisy, t, previous, noise = fm.teacher_forcing_inputs(latents, jax.random.key(1), 3.0)
  assert bool(jnp.all(t[:, 0] == 0.0)) and bool(jnp.all((t >= 0) & (t <= 1)))
  np.testing.assert_allclose(np.asarray(noisy[:, 0]), np.asarray(latents[:, 0]))  # sink clean
  np.testing.assert_allclose(np.asarray(previous[:, 1:]), np.asarray(latents[:, :-1]))
  assert float(jnp.abs(previous[:, 0]).max()) == 0.0
  np.testing.assert_allclose(np.asarray(noisy),
                             np.asarray(fm.interpolate(latents, noise, t)), atol=1e-6)


B, T = 4, 5


def _setup(mesh_overrides):
  return load_config(config_path("tiny.py"), {
      "train.batch_size": B, "diffusion.optim.learning_rate": 1e-3, **mesh_overrides})


def _batch(spec, nan=False):
  rng = np.random.default_rng(0)
  latents = rng.standard_normal((B, T, *spec.latent_size, spec.latent_channels)).astype(np.float32)
  if nan:
    latents[0, 1] = np.nan
  return {"latents": latents, "actions": rng.integers(0, spec.num_actions, (B, T)).astype(np.int32)}


@pytest.fixture(scope="module")
def sharded_and_single():
  out = {}
  for name, mesh_over in [("sharded", {"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2}),
                          ("single", {"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1})]:
    config = _setup(mesh_over)
    devices = jax.devices() if name == "sharded" else jax.devices()[:1]
    mesh = parallel.make_mesh(config.mesh, devices)
    program = build_train_program(config, mesh)
    model = program.model
    with jax.set_mesh(mesh):
      state = program.init_state()
      batch = jax.device_put(_batch(model.spec), program.batch_sharding)
      loss_fn = jax.jit(lambda p, b: jax.value_and_grad(
          lambda q: stages.diffusion_loss(model, q, b, jax.random.key(3), config))(p))
      loss, grads = loss_fn(state.gen_params, batch)
      lowered = program.step.lower(state, batch)
      # the step donates its state: step a second, equal copy
      new_state, metrics = program.step(program.init_state(), batch)
      out[name] = dict(state=state, loss=loss, grads=grads, new_state=new_state,
                       metrics=metrics, lowered=lowered, model=model, mesh=mesh)
  return out


def test_sharded_step_equals_single_device(sharded_and_single):
  a, b = sharded_and_single["sharded"], sharded_and_single["single"]
  np.testing.assert_allclose(float(a["loss"]), float(b["loss"]), rtol=1e-5)
  for x, y in zip(jax.tree.leaves(a["grads"]), jax.tree.leaves(b["grads"])):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-6, rtol=2e-4)
  np.testing.assert_allclose(float(a["metrics"]["loss"]), float(b["metrics"]["loss"]), rtol=1e-5)
  for x, y in zip(jax.tree.leaves(a["new_state"].gen_params),
                  jax.tree.leaves(b["new_state"].gen_params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-6, rtol=2e-4)


def test_parameters_are_really_sharded(sharded_and_single):
  params = sharded_and_single["sharded"]["state"].gen_params
  fc1 = params["transformer"]["blocks"]["ffn"]["fc1"]["kernel"]  # [layers, embed, mlp]
  assert fc1.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  assert fc1.addressable_shards[0].data.shape == (fc1.shape[0], fc1.shape[1] // 4,
                                                  fc1.shape[2] // 2)
  opt_leaves = [l for l in jax.tree.leaves(sharded_and_single["sharded"]["state"].gen_opt)
                if l.shape == fc1.shape]
  assert opt_leaves and all(l.sharding.spec == fc1.sharding.spec for l in opt_leaves)


def test_residual_activation_is_batch_sharded_in_compiled_step(sharded_and_single):
  """The logical constraint ("batch" -> data x fsdp) on the residual stream is
  in the program, and after partitioning the activation is [B/4, ...] per device."""
  lowered = sharded_and_single["sharded"]["lowered"]
  text = lowered.as_text()
  spec = sharded_and_single["sharded"]["model"].spec
  residual = f"tensor<{B}x{T}x{spec.tokens_per_frame}x{spec.dim}xf32>"
  constraints = re.findall(r"sdy.sharding_constraint [^\n]*", text)
  assert any('[{"data", "fsdp"}, {}, {}, {}]' in c and residual in c for c in constraints), (
      "the residual stream's logical constraint is missing from the program")
  compiled = lowered.compile().as_text()
  per_device = f"f32[{B // 4},{T},{spec.tokens_per_frame},{spec.dim}]"
  assert per_device in compiled
  assert f"f32[{B},{T},{spec.tokens_per_frame},{spec.dim}]" not in compiled


def test_nonfinite_loss_skips_update():
  config = _setup({"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1})
  mesh = parallel.make_mesh(config.mesh, jax.devices()[:1])
  program = build_train_program(config, mesh)
  model, step = program.model, program.step
  with jax.set_mesh(mesh):
    state = program.init_state()
    before = jax.tree.map(np.asarray, state.gen_params)
    new_state, metrics = step(state, _batch(model.spec, nan=True))
  assert not bool(metrics["finite"])
  assert int(new_state.skipped) == 1 and int(new_state.step) == 1
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(new_state.gen_params)):
    np.testing.assert_array_equal(x, np.asarray(y))
  new_state2, metrics2 = step(new_state, _batch(model.spec))
  assert bool(metrics2["finite"]) and int(new_state2.skipped) == 1


def test_bad_mesh_is_a_clear_error():
  config = load_config(config_path("tiny.py"), {"mesh.data": 3, "mesh.fsdp": 1, "mesh.tensor": 1})
  with pytest.raises(ValueError, match="mesh"):
    parallel.make_mesh(config.mesh)
  config = load_config(config_path("tiny.py"), {"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 8,
                                                 "model.dim": 36})
  with pytest.raises(ValueError, match="not divisible"):
    build_train_program(config, parallel.make_mesh(config.mesh))


def test_ema_decay_warms_up_then_holds():
  np.testing.assert_allclose(float(stages.ema_decay_at(0, 0.995)), 0.1)
  np.testing.assert_allclose(float(stages.ema_decay_at(90, 0.995)), 91 / 100)
  np.testing.assert_allclose(float(stages.ema_decay_at(10_000, 0.995)), 0.995)


def test_sharding_rules_come_from_the_config():
  """config.mesh.logical_axis_rules decides the shardings (here: the MLP width
  replicated instead of split over "tensor"); a missing rule or an unknown
  mesh axis is named. Abstract mesh: nothing compiled or allocated."""
  from aapt_jax.training.memory import abstract_mesh
  config = _setup({})
  fc1 = lambda p: p.shardings.gen_params["transformer"]["blocks"]["ffn"]["fc1"]["kernel"].spec
  mesh = abstract_mesh(1, 4, 2)
  assert fc1(build_train_program(config, mesh)) == jax.sharding.PartitionSpec(
      None, "fsdp", "tensor")
  rules = tuple((n, None if n == "mlp" else a) for n, a in config.mesh.logical_axis_rules)
  with config.unlocked():
    config.mesh.logical_axis_rules = rules
  assert fc1(build_train_program(config, mesh)) == jax.sharding.PartitionSpec(
      None, "fsdp", None)
  with config.unlocked():
    config.mesh.logical_axis_rules = tuple(r for r in rules if r[0] != "mlp")
  with pytest.raises(ValueError, match=r"mesh\.logical_axis_rules has no rule for mlp"):
    build_train_program(config, mesh)
  with config.unlocked():
    config.mesh.logical_axis_rules = rules + (("mlp", "model"),)
  with pytest.raises(ValueError, match=r"'mlp' -> 'model' is not a mesh axis"):
    build_train_program(config, mesh)
