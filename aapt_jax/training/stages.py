"""One pure train-step function per stage: (state, batch) -> (state, metrics).

The single-network stages are `make_step` of their loss; stage 3 updates D
and then G. Each is jitted with the state donated (training/program.py). A
non-finite loss or gradient skips the update (params, optimizer and EMA
unchanged, `optimizer_update`) and is counted in `state.skipped`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from aapt_jax.models import Conditioning
from aapt_jax.objectives import flow_matching as fm


def _drop_conditions(rng, batch, p):
  """Condition dropout (for classifier-free guidance): per sample, with prob p,
  actions -> -1 (none), controls -> 0, text fully masked."""
  b = batch["latents"].shape[0]
  drop = jax.random.bernoulli(rng, p, (b,))
  actions = batch.get("actions")
  if actions is not None:
    actions = jnp.where(drop[:, None], -1, actions)
  controls = batch.get("controls")
  if controls is not None:
    controls = jnp.where(drop[:, None, None], 0.0, controls)
  text, mask = batch.get("text_embedding"), batch.get("text_mask")
  if text is not None:
    mask = jnp.ones(text.shape[:2], bool) if mask is None else mask
    mask = mask & ~drop[:, None]
  return actions, controls, text, mask


def _masked(ok, new, old):
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def ema_decay_at(step, ema_decay):
  """EMA decay with warm-up: min(decay, (1 + step) / (10 + step)), so a short
  run's EMA follows training instead of staying near the random init."""
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))


def optimizer_update(params, opt_state, grads, loss, tx):
  """One optax step of `params`, masked: (params, opt_state, ok, grad_norm).

  `ok` (a bool scalar) is False when `loss` or the gradient's global norm is
  non-finite; then the returned params and optimizer state are the inputs,
  unchanged (the step is skipped, not applied with NaNs).
  """
  grad_norm = optax.tree.norm(grads)
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, new_opt = tx.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  return _masked(ok, new_params, params), _masked(ok, new_opt, opt_state), ok, grad_norm


def apply_update(state, grads, loss, tx, ema_decay):
  """The generator's `optimizer_update` + its EMA, all skipped (and counted in
  `state.skipped`) when the loss or gradient is non-finite; advances `state.step`.
  Returns (state, {"grad_norm", "finite"})."""
  params, opt, ok, grad_norm = optimizer_update(state.gen_params, state.gen_opt, grads, loss, tx)
  decay = ema_decay_at(state.step, ema_decay)
  new_ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
  state = state.replace(
      step=state.step + 1, gen_params=params, gen_opt=opt,
      ema_params=_masked(ok, new_ema, state.ema_params),
      skipped=state.skipped + (~ok).astype(jnp.int32))
  return state, {"grad_norm": grad_norm, "finite": ok}


def make_step(loss_fn, tx, ema_decay):
  """The one train-step wrapper of the single-network stages: (state, batch)
  -> (state, metrics).

  loss_fn(params, state, batch, rng) -> (loss, aux): the stage's loss of the
  trained params (`state.gen_params`), given the whole (pre-update) state for
  frozen networks (a teacher, the EMA target) and a fresh key; `aux` is a
  dict of scalars. The step differentiates it, applies `apply_update` with
  `tx` and the EMA decay, advances `state.rng`, and returns
  {"loss", **aux, "grad_norm", "finite"}. Pure: jit it with the state donated.
  """

  def step(state, batch):
    rng, k = jax.random.split(jax.random.wrap_key_data(state.rng))
    (loss, aux), grads = jax.value_and_grad(
        lambda p: loss_fn(p, state, batch, k), has_aux=True)(state.gen_params)
    state, m = apply_update(state, grads, loss, tx, ema_decay)
    state = state.replace(rng=jax.random.key_data(rng))
    return state, {"loss": loss, **aux, **m}

  return step


def diffusion_loss(model, params, batch, rng, config):
  """Stage 1: flow matching with teacher forcing, all frames in one block-causal pass.

  The sink (frame 0) is clean at t = 0 and carries no loss. Options
  (config.diffusion): `context_noise` noises the recycled frames,
  `change_weight` / `change_threshold` weight the elements that changed since
  the previous frame, `loss_space = "x0"` measures the error of the clean frame.
  """
  k_in, k_drop = jax.random.split(rng)
  df = config.diffusion
  latents = batch["latents"]                                    # [B, T, h, w, C]
  noisy, t, previous, noise = fm.teacher_forcing_inputs(latents, k_in,
                                                        config.diffusion.timestep_shift)
  previous = fm.noisy_context(previous, jax.random.fold_in(rng, 2), df.context_noise)
  actions, controls, text, mask = _drop_conditions(k_drop, batch, config.diffusion.cond_dropout)
  cond = Conditioning(previous=previous, actions=actions, controls=controls, text=text,
                      text_mask=mask)
  velocity = model.apply({"params": params}, noisy, t, cond)
  weights = jnp.ones(latents.shape[:2]).at[:, 0].set(0.0)
  element_weights = (fm.change_weights(latents, df.change_weight, df.change_threshold)
                     if df.change_weight else None)
  if df.loss_space not in ("velocity", "x0"):
    raise ValueError(f"config field diffusion.loss_space={df.loss_space!r}: use 'velocity' "
                     "or 'x0'")
  if df.loss_space == "x0":  # the clean frame's error x0 - (x_t - t v) = t (v_target - v)
    x0_weights = fm.x0_space_weights(t, latents)
    element_weights = x0_weights if element_weights is None else element_weights * x0_weights
  return fm.loss(velocity, fm.velocity_target(latents, noise), weights, element_weights)


def make_diffusion_step(model, tx, config):
  """The stage-1 step: `make_step` of `diffusion_loss`."""
  return make_step(lambda p, state, batch, k: (diffusion_loss(model, p, batch, k, config), {}),
                   tx, config.train.ema_decay)


# --------------------------------------------------------------------------
# Stage 2: consistency distillation.


def consistency_loss(model, params, teacher_params, target_params, batch, rng, config):
  """The student's clean prediction at t_k matches the EMA target's at the
  teacher's Euler step t_{k-1}; teacher forcing (clean sink + recycled frames),
  no condition dropout (no CFG)."""
  from aapt_jax.objectives import consistency as cd
  c = config.consistency
  latents = batch["latents"]                                    # [B, T, h, w, C]
  b, t_len = latents.shape[:2]
  k_t, k_n = jax.random.split(rng)
  t_k, t_prev = cd.sample_steps(k_t, b, c.num_steps, c.shift)
  sink = jnp.arange(t_len)[None, :] == 0
  t = jnp.where(sink, 0.0, t_k[:, None])                        # [B, T]
  t_prev = jnp.where(sink, 0.0, t_prev[:, None])
  noise = jax.random.normal(k_n, latents.shape, latents.dtype)
  x_t = fm.interpolate(latents, noise, t)
  previous = jnp.concatenate([jnp.zeros_like(latents[:, :1]), latents[:, :-1]], axis=1)
  cond = Conditioning(previous=previous, actions=batch.get("actions"),
                      controls=batch.get("controls"), text=batch.get("text_embedding"),
                      text_mask=batch.get("text_mask"))
  velocity = lambda p: (lambda x, s: model.apply({"params": p}, x, s, cond))
  target = cd.consistency_target(velocity(teacher_params), velocity(target_params), x_t, t,
                                 t_prev)
  student = cd.clean_prediction(x_t, t, velocity(params)(x_t, t))
  per_frame = cd.distance(student, target, c.distance, c.huber_c)
  weights = (~sink).astype(jnp.float32) * jnp.ones((b, 1))
  return jnp.sum(per_frame * weights) / jnp.sum(weights)


def make_consistency_step(model, tx, config):
  """The stage-2 step: `make_step` of `consistency_loss` against the frozen
  `state.teacher_params` and the EMA target `state.ema_params`."""
  return make_step(lambda p, state, batch, k: (consistency_loss(
      model, p, state.teacher_params, state.ema_params, batch, k, config), {}),
                   tx, config.train.ema_decay)


# --------------------------------------------------------------------------
# Stage 3: adversarial post-training with student forcing.


_CONDITION_KEYS = ("actions", "controls", "text_embedding", "text_mask")


def _conditions(batch, prefix=""):
  """The Conditioning of the real clips (prefix "") or of the rollout
  ("rollout_"): actions [B, T], controls [B, T, A], text [B, L, D] with its
  mask [B, L] (one per sample, for all frames; all valid when absent).

  The rollout, its fake segments and the real segments carry the same kinds
  of condition (else D could tell real from fake by the condition alone):
  a key present for one and not the other is a ValueError.
  """
  for key in _CONDITION_KEYS:
    real, rollout = key in batch, "rollout_" + key in batch
    if real != rollout:
      have, lack = (key, "rollout_" + key) if real else ("rollout_" + key, key)
      raise ValueError(f"the stage-3 batch has {have!r} but no {lack!r}: the rollout and the "
                       "real clips must carry the same conditions "
                       "(data.pipeline.make_adversarial_dataset gives both)")
  text, mask = batch.get(prefix + "text_embedding"), batch.get(prefix + "text_mask")
  if text is not None and mask is None:
    mask = jnp.ones(text.shape[:2], bool)
  return Conditioning(actions=batch.get(prefix + "actions"),
                      controls=batch.get(prefix + "controls"), text=text, text_mask=mask)


def _segment_cond(cond, start, stop):
  """Frames start..stop-1 of a Conditioning (text and its mask are per sample)."""
  pick = lambda a: None if a is None else a[:, start:stop]
  return cond.replace(actions=pick(cond.actions), controls=pick(cond.controls))


def _judge(disc, disc_params, frames, t, cond, noise=None):
  """D's logits [B, n] for a clip/segment (its first frame is D's sink); t [B]
  is every frame's timestep, `noise` the diffusion noise (disc_noise_input)."""
  tt = jnp.broadcast_to(t[:, None], frames.shape[:2])
  return disc.apply({"params": disc_params}, frames, tt, cond, noise=noise)


def _pad_frames(a, length):
  """[B, n, ...] -> [B, length, ...], zeros after frame n."""
  return jnp.pad(a, [(0, 0), (0, length - a.shape[1])] + [(0, 0)] * (a.ndim - 2))


def _judge_all(disc, disc_params, clips, conds, t, length, noises=None, clips_per_forward=0):
  """D's logits [B, n_k] for clips [B, n_k, ...] (n_k <= length), in few forwards.

  conds: each clip's Conditioning (all with the same fields); noises: each
  clip's diffusion noise shaped like it (with disc_noise_input), or None.

  Each clip is zero-padded at its end to `length` frames (D is block-causal,
  so padding changes no logit of an earlier frame) and the clips are stacked
  on the batch axis, sample-major ([B, clips] -> B·clips rows, so each
  device keeps its own samples' clips). clips_per_forward <= 0: all clips
  in ONE forward. Else `clips_per_forward` clips per forward, the forwards
  one after another in a `lax.map` whose body is rematerialised (the list
  padded with zero clips to a whole number of forwards): a backward pass
  then holds one forward's activations at a time instead of every clip's,
  for one more D forward. Either way fewer, larger matmuls than a forward
  per clip, and no independent forwards whose collectives devices could
  start in different orders (which deadlocks XLA's CPU runtime on a
  multi-device mesh). The logits are the same either way.
  """
  n = len(clips)
  per = n if clips_per_forward <= 0 else min(int(clips_per_forward), n)
  chunks = -(-n // per)
  pad = chunks * per - n
  b = clips[0].shape[0]

  def stacked(values, per_frame):
    """[B, ...] per clip -> [chunks, B·per, ...] (zero clips at the end)."""
    values = [_pad_frames(v, length) if per_frame else v for v in values]
    values += [jnp.zeros_like(values[0])] * pad
    a = jnp.stack(values, axis=1)                              # [B, chunks·per, ...]
    a = a.reshape((b, chunks, per) + a.shape[2:])
    return jnp.swapaxes(a, 0, 1).reshape((chunks, b * per) + a.shape[3:])

  def field(name, per_frame):
    values = [getattr(c, name) for c in conds]
    missing = [v is None for v in values]
    if all(missing):
      return None
    if any(missing):
      raise ValueError(f"stage 3 judges clips with and without cond.{name} in one D forward: "
                       "every clip must carry the same conditions")
    return stacked(values, per_frame)

  xs = dict(frames=stacked(list(clips), True), actions=field("actions", True),
            controls=field("controls", True), text=field("text", False),
            text_mask=field("text_mask", False),
            noise=None if noises is None else stacked(list(noises), True))
  tt = jnp.repeat(t, per)                                      # [B·per], sample-major

  def judge(x):
    cond = Conditioning(actions=x["actions"], controls=x["controls"], text=x["text"],
                        text_mask=x["text_mask"])
    return _judge(disc, disc_params, x["frames"], tt, cond, x["noise"])  # [B·per, length]

  if chunks == 1:
    logits = judge(jax.tree.map(lambda a: a[0], xs))[None]
  else:
    logits = jax.lax.map(jax.checkpoint(judge), xs)           # [chunks, B·per, length]
  logits = jnp.swapaxes(logits.reshape(chunks, b, per, length), 0, 1)
  logits = logits.reshape(b, chunks * per, length)
  return [logits[:, i, :c.shape[1]] for i, c in enumerate(clips)]


def rollout_mse(frames, target, weights):
  """Squared error of generated `frames` [B, S, h, w, C] against `target`
  (same shape), the mean over each frame's elements weighted by `weights`
  [B, S] (0 drops a frame) and normalised by their sum."""
  per_frame = jnp.mean(jnp.square(frames.astype(jnp.float32) - target.astype(jnp.float32)),
                       axis=(2, 3, 4))                       # [B, S]
  return jnp.sum(per_frame * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def make_adversarial_step(model, disc, gen_tx, disc_tx, config):
  """The stage-3 step: one D update on detached fakes (RpGAN + λ·(R1 + R2)),
  then one G update through the student-forcing rollout (RpGAN against the
  updated D), EMA of G.

  batch: "latents" real clips [B, S, h, w, C] paired with every fake segment;
  "rollout_first" [B, h, w, C] the real start frame of the rollout (from long
  episodes). Conditions (data.pipeline.make_adversarial_dataset): the real
  clips' "actions" [B, S], "controls" [B, S, A], "text_embedding" [B, L, D]
  and "text_mask" [B, L], and the rollout's own "rollout_actions" [B, R],
  "rollout_controls" [B, R, A], "rollout_text_embedding", "rollout_text_mask";
  the rollout, its fake segments and the real segments carry the same kinds
  (text and its mask per sample, for all frames).

  `adversarial.forcing = "teacher"` (the paper's Fig. 7 ablation) replaces
  the rollout: G makes each frame of the real clip in one step from the real
  previous frames (one parallel pass), and D judges that one segment against
  the real clip with the real clip's conditions.

  With `adversarial.rollout_mse_weight` = w > 0 (not the paper: for worlds
  that replay their conditions deterministically, like the emulators), G's
  loss adds w times the squared error of the judged frames against the
  batch's "rollout_latents" [B, R, h, w, C] (the episode's real frames from
  the same start under the same conditions), weighted like D's losses.

  D sees clean frames at t = 0; with `adversarial.disc_noise_input` it sees
  them noised at a per-sample t ~ U[0, 1], x and x + σε (R1/R2) with one
  shared diffusion-noise draw. Frame 0 of the first segment (the real start
  frame) is in neither loss nor in R1/R2. The rollout runs once: "recompute"
  rolls out without gradient (what D judges) and the G phase re-runs those
  frames in one parallel pass; "scan" differentiates the scan whose forward D
  judged (`jax.vjp`). state.rng splits into (next rng, rollout noise, D's
  timesteps, D's diffusion noise, R1, R2).
  """
  from aapt_jax import rollout as ro
  from aapt_jax.objectives import adversarial as adv
  a = config.adversarial
  length, seg, overlap = a.rollout_frames, a.segment_frames, a.segment_overlap
  teacher = a.forcing == "teacher"
  starts = (0,) if teacher else adv.segment_starts(length, seg, overlap)
  k = len(starts)
  truncated = a.segment_gradient == "truncated"
  mse_weight = float(a.rollout_mse_weight)
  sg = jax.lax.stop_gradient

  def step(state, batch):
    rng, k_noise, k_t, k_dn, k_r1, k_r2 = jax.random.split(
        jax.random.wrap_key_data(state.rng), 6)
    real = batch["latents"]                                  # [B, S, h, w, C]
    b = real.shape[0]
    first = batch["rollout_first"]                           # [B, h, w, C]
    noise = jax.random.normal(k_noise, (b, length - 1) + first.shape[1:], first.dtype)
    inputs = jnp.concatenate([first[:, None], noise], axis=1)  # [B, R, h, w, C]
    roll_cond, real_cond = _conditions(batch, "rollout_"), _conditions(batch)
    # D's timestep: clean frames at t = 0 (the paper's D takes frames, not
    # noise); with disc_noise_input, per sample t ~ U[0, 1]
    t = jax.random.uniform(k_t, (b,)) if a.disc_noise_input else jnp.zeros((b,))

    def generate(gen_params, rollout=None):
      return ro.segment_frames(model, gen_params, inputs, roll_cond, starts, seg,
                               gradient=a.gradient, segment_gradient=a.segment_gradient,
                               rollout=rollout)

    if teacher:  # G's one-step frames of the real clip from its real previous frames
      tf_inputs = jnp.concatenate([real[:, :1], noise[:, :real.shape[1] - 1]], axis=1)
      generate = lambda gp, rollout=None: [ro.recompute_frames(model, gp, tf_inputs, real,
                                                               real_cond)]
      roll_cond = real_cond

    # --- the rollout, once for both phases
    if a.gradient == "scan" or teacher:  # its forward is what D judges; G pulls back through it
      segs, pullback = jax.vjp(generate, state.gen_params)
    else:
      rollout = sg(ro.rollout_student_forcing(model, sg(state.gen_params), inputs, roll_cond,
                                              cache_at=starts if truncated else ()))
      segs = [rollout[0][:, s0:s0 + seg] for s0 in starts]
    # D's forwards after the rollout (see the barrier before the G phase)
    fakes, d_params = jax.lax.optimization_barrier(([sg(f) for f in segs], state.disc_params))

    # --- discriminator
    reals = [real[:, :f.shape[1]] for f in fakes]
    real_conds = [_segment_cond(real_cond, 0, f.shape[1]) for f in fakes]
    fake_conds = [_segment_cond(roll_cond, s0, s0 + f.shape[1]) for s0, f in zip(starts, fakes)]
    # frame 0 of segment 0 is the real start frame, paired with a real clip
    # frame: it is in neither loss (nor in R1/R2)
    weights = [jnp.ones((b, f.shape[1])).at[:, 0].set(0.0 if s0 == 0 else 1.0)
               for s0, f in zip(starts, fakes)]
    # approximate R1 / R2 inputs (objectives.adversarial.approx_r1, judged with the rest)
    noisy_reals = [adv.perturb(x, a.r1_sigma, key)
                   for x, key in zip(reals, jax.random.split(k_r1, k))]
    noisy_fakes = [adv.perturb(x, a.r1_sigma, key)
                   for x, key in zip(fakes, jax.random.split(k_r2, k))]
    # D's diffusion noise (disc_noise_input): one draw per judged clip, shared
    # by its σ-perturbed copy, so D(x) - D(x + σε) measures σε alone
    noises = None
    if a.disc_noise_input:
      noises = [jax.random.normal(key, x.shape, x.dtype)
                for x, key in zip(reals + fakes, jax.random.split(k_dn, 2 * k))]

    def d_loss(dp):
      logits = _judge_all(disc, dp, reals + fakes + noisy_reals + noisy_fakes,
                          real_conds + fake_conds + real_conds + fake_conds, t, seg,
                          None if noises is None else noises + noises,
                          a.disc_clips_per_forward)
      d_real, d_fake = logits[:k], logits[k:2 * k]
      d_real_noisy, d_fake_noisy = logits[2 * k:3 * k], logits[3 * k:]
      total = sum(adv.discriminator_loss(r, f, w) for r, f, w in zip(d_real, d_fake, weights))
      r1_total = sum(adv.r1_penalty(clean, noisy, w) for clean, noisy, w in
                     zip(d_real + d_fake, d_real_noisy + d_fake_noisy, weights + weights))
      return total + a.r1_weight * r1_total, (total, r1_total)

    (d_total, (d_adv, d_r1)), d_grads = jax.value_and_grad(d_loss, has_aux=True)(d_params)
    disc_params, disc_opt, d_ok, _ = optimizer_update(state.disc_params, state.disc_opt,
                                                      d_grads, d_total, disc_tx)

    # --- generator, against the updated discriminator. The barrier orders
    # the G phase after the whole D update: left free to overlap, devices can
    # start their collectives in different orders (a deadlock on CPU) and
    # hold both phases' activations.
    disc_params, gen_params = jax.lax.optimization_barrier((disc_params, state.gen_params))
    if a.gradient != "scan" and not teacher:  # one parallel pass over the rolled frames
      segs, pullback = jax.vjp(lambda gp: generate(gp, rollout), gen_params)

    def g_loss(segs):
      # the reals' logits are constants to G: one forward without a backward,
      # then the fakes' forward (after it: one order of collectives) and its
      # backward, which alone reaches G
      segs, dp, judged_reals = jax.lax.optimization_barrier((segs, disc_params, reals))
      real_logits = sg(_judge_all(disc, dp, judged_reals, real_conds, t, seg,
                                  None if noises is None else noises[:k],
                                  a.disc_clips_per_forward))
      segs, real_logits = jax.lax.optimization_barrier((segs, real_logits))
      fake_logits = _judge_all(disc, dp, segs, fake_conds, t, seg,
                               None if noises is None else noises[k:], a.disc_clips_per_forward)
      g_adv = sum(adv.generator_loss(r, f, w) for r, f, w in zip(real_logits, fake_logits, weights))
      if not mse_weight:
        return g_adv, (g_adv, jnp.zeros(()))
      # the rollout's frames against the episode's real frames under the same
      # conditions from the same start: each segment's weighted mean
      target = batch["rollout_latents"]                      # [B, R, h, w, C]
      mse = sum(rollout_mse(f, target[:, s0:s0 + f.shape[1]], w)
                for s0, f, w in zip(starts, segs, weights)) / k
      return g_adv + mse_weight * mse, (g_adv, mse)

    (g_total, (g_adv, g_mse)), seg_grads = jax.value_and_grad(g_loss, has_aux=True)(segs)
    (g_grads,) = pullback(seg_grads)
    state, m = apply_update(state, g_grads, g_total, gen_tx, config.train.ema_decay)
    state = state.replace(rng=jax.random.key_data(rng), disc_params=disc_params,
                          disc_opt=disc_opt, skipped=state.skipped + (~d_ok).astype(jnp.int32))
    extra = {"g_adv": g_adv, "rollout_mse": g_mse} if mse_weight else {}
    return state, {"loss": g_total, "d_loss": d_adv, "r1": d_r1, "d_finite": d_ok, **extra, **m}

  return step


def adversarial_frame_passes(config) -> int:
  """The compute of one stage-3 step per sample, in latent-frame passes of
  the DiT (a frame's forward = 1, its backward = 2; G and D are the same
  backbone), as `make_adversarial_step` spends it: the rollout (R frames) and
  G's pass over them (forward and backward; "teacher": only the pass, over S
  frames), D's forward and backward on reals, fakes and their σ-perturbed
  copies (4 x the judged frames x 3), and the G phase's D on reals and fakes
  (2 x judged x 3). What `launch/claims.py` equalises across arms."""
  from aapt_jax.objectives.adversarial import segment_starts
  a = config.adversarial
  r, s = int(a.rollout_frames), int(a.segment_frames)
  if a.forcing == "teacher":
    generator, judged = 3 * s, s
  else:
    judged = sum(min(s0 + s, r) - s0 for s0 in segment_starts(r, s, a.segment_overlap))
    generator = r + 3 * r if a.gradient == "recompute" else 3 * r
  return generator + 18 * judged
