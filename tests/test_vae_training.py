"""Stage "vae": the loss terms by hand, and the train step learns a fixed batch."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from aapt_jax import load_config
from aapt_jax.models.vae import build_vae, init_params
from aapt_jax.objectives import vae as obj
from aapt_jax.training.optimizers import make_optimizer
from aapt_jax.training.state import TrainState
from aapt_jax.training.vae_stage import make_vae_step
from helpers import config_path

WEIGHTS = {"l1_weight": 1.0, "l2_weight": 2.0, "grad_weight": 3.0, "hard_weight": 5.0,
           "hard_fraction": 0.5, "kl_weight": 4.0}


def test_loss_terms_by_hand():
  video = jnp.zeros((1, 1, 2, 3, 3))
  recon = jnp.full_like(video, 0.5)
  mean, logvar = jnp.ones((1, 1, 1, 1, 2)), jnp.zeros((1, 1, 1, 1, 2))
  loss, terms = obj.vae_loss(video, recon, mean, logvar, WEIGHTS)
  # l1 0.5, l2 0.25, no gradients in a constant image, every pixel's RGB
  # squared error 3 x 0.25, KL 0.5 (1 + 1 - 1 - 0)
  assert np.allclose([terms["l1"], terms["l2"], terms["grad"], terms["hard"], terms["kl"]],
                     [0.5, 0.25, 0.0, 0.75, 0.5])
  assert np.isclose(loss, 0.5 + 2 * 0.25 + 3 * 0.0 + 5 * 0.75 + 4 * 0.5)


def test_hard_pixel_term_by_hand():
  """The mean of each frame's worst pixels: one wrong pixel of 8 (a 'ball')
  is 1/8 of the mean error but all of the worst 1/8."""
  video = jnp.zeros((1, 2, 2, 4, 3))
  recon = video.at[0, 0, 1, 2].set(1.0).at[0, 1, 0, 0, 0].set(0.5)
  # frame 0: RGB sum 3 at one pixel; frame 1: 0.25 at one pixel
  assert np.isclose(obj.hard_pixel_l2(video, recon, 1 / 8), (3.0 + 0.25) / 2)
  assert np.isclose(obj.hard_pixel_l2(video, recon, 2 / 8), (3.0 / 2 + 0.25 / 2) / 2)
  assert np.isclose(obj.hard_pixel_l2(video, recon, 1e-6), (3.0 + 0.25) / 2)  # at least 1 pixel


def test_gradient_term_by_hand():
  ramp = jnp.broadcast_to(0.1 * jnp.arange(4.0)[None, None, None, :, None], (1, 1, 3, 4, 3))
  # x-differences 0.1 against 0, y-differences 0 against 0
  assert np.isclose(obj.image_gradient_l1(ramp, jnp.zeros_like(ramp)), 0.05)


def test_uint8_video_maps_to_signed_range():
  signed = obj.pixels_to_signed(jnp.array([0, 255], jnp.uint8))
  assert np.allclose(signed, [-1.0, 1.0])


def test_kl_of_the_standard_normal_is_zero():
  assert obj.kl_to_standard_normal(jnp.zeros(5), jnp.zeros(5)) == 0.0
  assert obj.kl_to_standard_normal(jnp.zeros(5), jnp.full(5, 1.0)) > 0.0


def test_step_learns_a_fixed_batch():
  """12 steps on one smooth clip (r = s = 1, the smallest VAE that compiles
  fast) cut the loss, and the loss is the weighted sum of its terms."""
  weights = {"vae.l1_weight": 1.0, "vae.l2_weight": 0.5, "vae.grad_weight": 0.5,
             "vae.kl_weight": 1e-3}
  config = load_config(config_path("base.py"), {
      "vae.base_dim": 8, "vae.z_dim": 4, "vae.dim_mult": (1,), "vae.num_res_blocks": 1,
      "vae.temperal_downsample": (), "model.latent_size": (8, 8),
      "vae.optim.learning_rate": 3e-3, **weights})
  vae = build_vae(config)
  params = nn.meta.unbox(init_params(vae, jax.random.key(0)))["params"]
  tx = make_optimizer(config.vae.optim, 100)
  state = TrainState(step=jnp.zeros((), jnp.int32), gen_params=params, gen_opt=tx.init(params),
                     ema_params=params, rng=jax.random.key_data(jax.random.key(1)),
                     skipped=jnp.zeros((), jnp.int32))
  y, x = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
  clip = [np.stack([np.sin(0.7 * x + t + c) * np.cos(0.5 * y - t) for c in range(3)], -1)
          for t in range(3)]
  batch = {"video": jnp.asarray(0.8 * np.stack([clip, clip[::-1]]), jnp.float32)}  # [2, 3, 8, 8, 3]
  step = jax.jit(make_vae_step(vae, tx, config))
  losses = []
  for _ in range(12):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  by_hand = sum(w * float(metrics[k.split(".")[1][:-len("_weight")]]) for k, w in weights.items())
  assert np.isclose(losses[-1], by_hand, rtol=1e-5)
  assert int(state.step) == 12 and int(state.skipped) == 0
  assert losses[-1] < 0.8 * losses[0], losses


def test_the_vae_train_state_shards_over_fsdp_and_steps_like_one_device():
  """Stage "vae" on a data=1 x fsdp=8 mesh: conv output channels are split
  8 ways (the RGB head and norms replicated), and one step equals the step
  of the same state on one device."""
  from aapt_jax import parallel
  from aapt_jax.training.program import build_train_program
  config = load_config(config_path("base.py"), {
      "vae.base_dim": 8, "vae.z_dim": 8, "vae.dim_mult": (1,), "vae.num_res_blocks": 1,
      "vae.temperal_downsample": (), "model.latent_size": (8, 8),
      "vae.optim.learning_rate": 3e-3, "mesh.data": 1, "mesh.fsdp": 8, "stage": "vae"})
  mesh = parallel.make_mesh(config.mesh)
  program = build_train_program(config, mesh)
  vae, tx, shardings = program.model, program.tx, program.shardings
  state = program.init_state()
  kernel = state.gen_params["decoder"]["conv_in"]["kernel"]  # [3, 3, 3, 8, 8]
  assert shardings.gen_params["decoder"]["conv_in"]["kernel"].spec[-1] == "fsdp"
  assert kernel.addressable_shards[0].data.shape == (3, 3, 3, 8, 1)
  head = state.gen_params["decoder"]["conv_out"]["kernel"]  # [3, 3, 3, 8, 3]
  assert head.addressable_shards[0].data.shape == head.shape
  video = jax.random.uniform(jax.random.key(2), (8, 2, 8, 8, 3), minval=-1, maxval=1)
  step = make_vae_step(vae, tx, config)
  sharded, m_sharded = jax.jit(step)(state, {"video": jax.device_put(
      video, parallel.batch_sharding(mesh))})
  one = jax.devices()[0]
  local, m_local = jax.jit(step)(jax.device_put(state, one), {"video": jax.device_put(video, one)})
  assert np.isclose(float(m_sharded["loss"]), float(m_local["loss"]), rtol=1e-5)
  # Adam's moments are linear in the gradient (its update is not: it would
  # hide a gradient off by a constant factor)
  moments = lambda s: [np.asarray(x) for x in jax.tree.leaves(s.gen_opt) if np.ndim(x) > 0]
  for a, b in zip(moments(sharded), moments(local)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * float(np.max(np.abs(b))) + 1e-12)
  assert moments(local) and float(np.max(np.abs(moments(local)[0]))) > 0
