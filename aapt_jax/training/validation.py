"""Checks at the edge, before anything compiles: the config of a stage
(`check_config`) and the records against the model (`check_data`). Each
raises ValueError naming the field (or the record) and the fix."""
from __future__ import annotations

import numpy as np

from aapt_jax.data import records
from aapt_jax.training.program import STAGES, StageSpec


def check_config(config) -> StageSpec:
  """ValueError naming the field for a config the trainer cannot run."""
  stage = config.stage
  if stage == "pipeline":
    raise ValueError("stage='pipeline' runs several stages: use aapt_jax.pipeline."
                     "train(config, workdir) (launch/train.py does)")
  if stage not in STAGES:
    raise ValueError(f"config field stage={stage!r} is unknown; choose from "
                     f"{', '.join(STAGES)} or pipeline")
  for field, value, low in (
      ("train.steps", config.train.steps, 1), ("train.batch_size", config.train.batch_size, 1),
      ("train.clip_frames", config.train.clip_frames, 2),
      ("train.log_every", config.train.log_every, 1),
      ("train.max_nonfinite", config.train.max_nonfinite, 1),
      ("train.profile_steps", config.train.profile_steps, 0),
      ("checkpoint.every_steps", config.checkpoint.every_steps, 1),
      ("checkpoint.keep", config.checkpoint.keep, 1)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
      raise ValueError(f"config field {field} must be an int, got {value!r}")
    if value < low:
      raise ValueError(f"config field {field} must be >= {low}, got {value}")
  if STAGES[stage].vae:
    from aapt_jax.models.vae import VAESpec
    r = VAESpec.from_config(config).temporal_factor
    if (config.train.clip_frames - 1) % r:
      raise ValueError(f"config field train.clip_frames={config.train.clip_frames}: stage "
                       f"'vae' trains on clips of 1 + k*{r} video frames (vae temporal "
                       f"factor {r}), e.g. {1 + r * max(1, config.train.clip_frames // r)}")
  if STAGES[stage].adversarial:
    a = config.adversarial
    from aapt_jax.objectives.adversarial import segment_starts
    try:
      segment_starts(a.rollout_frames, a.segment_frames, a.segment_overlap)
    except ValueError as e:
      raise ValueError(f"config fields adversarial.rollout_frames/segment_frames/"
                       f"segment_overlap: {e}") from None
    if a.segment_frames > a.rollout_frames:
      raise ValueError(f"config field adversarial.segment_frames={a.segment_frames} > "
                       f"adversarial.rollout_frames={a.rollout_frames}")
    w = a.rollout_mse_weight
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
      raise ValueError(f"config field adversarial.rollout_mse_weight must be a number >= 0, "
                       f"got {w!r}")
    if w and a.forcing == "teacher":
      raise ValueError("config field adversarial.rollout_mse_weight > 0 needs forcing="
                       "'student' (it scores the rollout; teacher forcing has none)")
    for field, allowed in (("forcing", ("student", "teacher")),
                           ("gradient", ("recompute", "scan")),
                           ("segment_gradient", ("end_to_end", "truncated"))):
      if a[field] not in allowed:
        raise ValueError(f"config field adversarial.{field}={a[field]!r}: choose from "
                         f"{', '.join(allowed)}")
  return STAGES[stage]


def check_example(example: dict, config, where: str, min_frames: int | None = None,
                  min_field: str = "train.clip_frames") -> None:
  """ValueError naming `where` and the field if a record does not fit the model
  (or is shorter than `min_frames`, default train.clip_frames, named `min_field`)."""
  m, d = config.model, config.data
  _, ph, pw = m.patch_size
  lh, lw = m.latent_size
  if "latents" in example:
    x = example["latents"]
    if x.ndim != 4:
      raise ValueError(f"{where}: field 'latents': shape {x.shape}, expected [T, h, w, C]")
    t, h, w, c = x.shape
    field = "'latents'"
  elif "video" in example:
    v = example["video"]
    s = int(d.space_to_depth)
    if v.ndim != 4 or v.shape[-1] != 3:
      raise ValueError(f"{where}: field 'video': shape {v.shape}, expected [T, H, W, 3]")
    if s < 1:
      raise ValueError(f"{where}: field 'video': records hold pixels but "
                       "data.space_to_depth=0 (latents from a VAE); encode them with "
                       "launch/prepare_data.py --vae_checkpoint=RUN or set data.space_to_depth")
    if v.shape[1] % s or v.shape[2] % s:
      raise ValueError(f"{where}: field 'video': frame size {v.shape[1]}x{v.shape[2]} "
                       f"is not divisible by data.space_to_depth={s}")
    t, h, w, c = v.shape[0], v.shape[1] // s, v.shape[2] // s, 3 * s * s
    field = f"'video' (as {h}x{w}x{c} latents by {s}x{s} space-to-depth)"
  else:
    raise ValueError(f"{where}: no 'latents' or 'video' field")
  if c != m.latent_channels:
    raise ValueError(f"{where}: field {field}: {c} channels but model.latent_channels="
                     f"{m.latent_channels}")
  if (h, w) != (lh, lw):
    raise ValueError(f"{where}: field {field}: frames are {h}x{w} but model.latent_size="
                     f"{(lh, lw)}; set model.latent_size or use matching records")
  if h % ph or w % pw:
    raise ValueError(f"{where}: field {field}: {h}x{w} is not divisible by the patch "
                     f"{(ph, pw)} (model.patch_size)")
  if min_frames is None:
    min_frames = config.train.clip_frames
  if t < min_frames:
    raise ValueError(f"{where}: field {field}: {t} frames < {min_field}={min_frames}")
  if "actions" in example:
    a = example["actions"]
    if not m.num_actions:
      raise ValueError(f"{where}: field 'actions': the records have actions but "
                       "model.num_actions=0; set model.num_actions")
    if a.size and int(a.max()) >= m.num_actions:
      raise ValueError(f"{where}: field 'actions': action id {int(a.max())} >= "
                       f"model.num_actions={m.num_actions}")
  if "controls" in example:
    u = example["controls"]
    if u.ndim != 2 or u.shape[1] != m.control_dim:
      raise ValueError(f"{where}: field 'controls': shape {u.shape} but model.control_dim="
                       f"{m.control_dim}")
  if "text_embedding" in example and m.text_dim:
    e = example["text_embedding"]
    if e.ndim != 2 or e.shape[1] != m.text_dim:
      raise ValueError(f"{where}: field 'text_embedding': shape {e.shape} but model.text_dim="
                       f"{m.text_dim}; set model.text_dim to the text encoder's width")
    if int(config.data.text_len) < 1:
      raise ValueError(f"config field data.text_len={config.data.text_len} must be >= 1 "
                       "for records with text")


def check_vae_example(example: dict, config, where: str) -> None:
  """ValueError naming `where` and the field if a record cannot train the VAE."""
  from aapt_jax.models.vae import VAESpec
  if "video" not in example:
    raise ValueError(f"{where}: no 'video' field: stage 'vae' trains on pixel clips")
  v = example["video"]
  size = VAESpec.from_config(config).frame_size
  if v.ndim != 4 or v.shape[-1] != 3 or tuple(v.shape[1:3]) != tuple(size):
    raise ValueError(f"{where}: field 'video': shape {v.shape}, expected [T, {size[0]}, "
                     f"{size[1]}, 3] (model.latent_size x the VAE's spatial factor)")
  if v.shape[0] < config.train.clip_frames:
    raise ValueError(f"{where}: field 'video': {v.shape[0]} frames < train.clip_frames="
                     f"{config.train.clip_frames}")


def check_data(source: records.RecordSource, config, min_frames: int | None = None,
               min_field: str = "train.clip_frames") -> None:
  """Validates and checks the first and last record against the model."""
  n = len(source)
  if n == 0:
    raise ValueError(f"config field data.path={config.data.path!r}: the records are empty")
  for i in sorted({0, n - 1}):
    path, pos = source.locate(i)
    where = f"{path}[{pos}]"
    example = source[i]
    records.validate_example(example, source=where)
    if STAGES.get(config.stage) and STAGES[config.stage].vae:
      check_vae_example(example, config, where)
    else:
      check_example(example, config, where, min_frames, min_field)
