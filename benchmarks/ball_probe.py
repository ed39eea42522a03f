"""Does a pixel-space Pong model draw the ball? A fast probe of one checkpoint.

  python benchmarks/ball_probe.py --checkpoint=RUN [--seeds=1000,1001,1002]
      [--tf_frames=48] [--open_loop_frames=24] [--sampler_steps=8] [--denoise_t=0.1]

Against the emulator's frames of the same seeds (the sticky-random policy of
the evaluation suite), prints one JSON line and a table of:
  tf_*   the model's one-step teacher-forced prediction at t = 1 of frames
         1..tf_frames (evaluation/teacher_forced.py): what stage 1 learned,
         before any open-loop drift; beside it real_copy_previous_ball_*,
         the ball "found" in the previous real frame (~2 px from the true
         place: a model that copies its input scores this);
  dn_*   the denoising check (evaluation/teacher_forced.py): the same
         prediction from the real frame noised to t = denoise_t instead of
         from noise alone. A diffusion model reads its noisy input (dn_psnr
         far above tf_psnr); one that scores the same has learnt to ignore
         it, and more Euler steps then draw the same frame;
  ol_*   its open-loop rollout of open_loop_frames frames with sampler_steps
         Euler steps per frame (stage 1's sampler), and "hold the start
         frame" on the same frames;
each with ball/paddle presence (share of frames whose RAM has the object where
the detector finds it), ball position error (frame pixels, where found),
ball signal (`_ball_signal`: ball colour at the true place
above the field's average; compare with real_ball_signal), roughness
(adjacent-pixel |difference|, 0-255), change (|frame - the previous
real frame| for tf, |frame - own previous| for ol) and PSNR (dB). The
emulator's own values of roughness and change come alongside. A probe for
comparing training recipes (RESULTS.md, "Why the ball was lost"); the full
report is launch/evaluate.py.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def _objects(game, truth_rams, frames, frame_size):
  from aapt_jax.evaluation import objects
  truth = objects.ram_truth(game, truth_rams, frame_size)
  found = objects.detections(game, frames, np.ones(len(frames), bool))
  s = objects.object_series(truth, found)
  return {k: s[k][1:] for k in s}


def _summary(prefix, series_per_seed):
  out = {}
  for k in series_per_seed[0]:
    v = np.concatenate([s[k] for s in series_per_seed])
    out[f"{prefix}_{k}"] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
    if k.endswith("mse"):  # PSNR of the mean MSE over all frames and seeds
      mse = max(out.pop(f"{prefix}_{k}"), 1e-10)
      out[f"{prefix}_{k[:-3]}psnr"] = float(10 * np.log10(255.0 ** 2 / mse))
  return out


def _ball_signal(game, rams, frames, frame_size):
  """Per frame with a ball in the RAM: the ball colour's coverage in the 3 x 3
  frame pixels at the true position less 9 x its mean over the field (what
  noise or texture gives anywhere); NaN without a ball. A soft measure of a
  faint or blurred ball the detector misses."""
  from aapt_jax.evaluation.detectors import pong_coverage
  from aapt_jax.evaluation.objects import ram_truth
  out = np.full(len(frames) - 1, np.nan)
  for i, (truth, f) in enumerate(zip(ram_truth(game, rams, frame_size)[1:], frames[1:])):
    if truth["ball"] is None:
      continue
    cover = pong_coverage(f)[..., 0]                                 # [H, W]
    x, y = int(truth["ball"][0]), int(truth["ball"][1])
    window = cover[max(y - 1, 0):y + 2, max(x - 1, 0):x + 2]
    field = cover[int(34 * f.shape[0] / 210):int(194 * f.shape[0] / 210)]
    out[i] = window.sum() - window.size * field.mean()
  return out


def _mse(a, b):
  return float(np.mean(np.square(a.astype(np.float64) - b.astype(np.float64))))


def probe(model, seeds, tf_frames, open_loop_frames, denoise_t=None):
  """The probe's numbers (module docstring) of a StreamingModel of a Pong world."""
  from aapt_jax.evaluation import rollouts, teacher_forced
  from aapt_jax.inference.quality import change, roughness
  from aapt_jax.inference.session import StreamingSession

  world, game = model.world, model.world.game
  frames = max(tf_frames, open_loop_frames)
  episodes = [rollouts.play_emulator(world, s, frames) for s in seeds]
  n_tf = min(tf_frames, min(len(e.real) for e in episodes) - 1)
  denoise_t = teacher_forced.DENOISE_T if denoise_t is None else denoise_t
  real_frames = np.stack([e.real[:n_tf + 1] for e in episodes])
  actions = np.stack([e.actions[:n_tf + 1] for e in episodes])
  one_step_fn = teacher_forced.make_one_step_fn(model.generator)
  one_step = teacher_forced.one_step_predictions(model, real_frames, actions, seeds, one_step_fn)
  denoised = teacher_forced.one_step_predictions(model, real_frames, actions, seeds, one_step_fn,
                                                 noise_level=denoise_t)
  tf, dn, ol, real = [], [], [], []
  for e, pred, den in zip(episodes, one_step, denoised):
    r = e.real[:n_tf + 1]
    dn.append({"ball_signal": _ball_signal(game, e.ram[:n_tf + 1], den, model.frame_size),
               "mse": np.array([_mse(den[i], r[i]) for i in range(1, len(r))])})
    s = _objects(game, e.ram[:n_tf + 1], pred, model.frame_size)
    s["roughness"] = np.array([roughness(f) for f in pred[1:]])
    s["ball_signal"] = _ball_signal(game, e.ram[:n_tf + 1], pred, model.frame_size)
    s["change"] = np.array([change(pred[i], r[i - 1]) for i in range(1, len(r))])
    s["mse"] = np.array([_mse(pred[i], r[i]) for i in range(1, len(r))])
    s["copy_previous_mse"] = np.array([_mse(r[i - 1], r[i]) for i in range(1, len(r))])
    tf.append(s)
    # copying the previous real frame "finds" the ball where it was a frame ago (~2 px
    # off): a one-step ball must beat this row's error, not only its presence
    copied = _objects(game, e.ram[:n_tf + 1], np.concatenate([r[:1], r[:-1]]), model.frame_size)
    real.append({"ball_signal": _ball_signal(game, e.ram[:n_tf + 1], r, model.frame_size),
                 "copy_previous_ball_present": copied["ball_present"],
                 "copy_previous_ball_error": copied["ball_error"],
                 "roughness": np.array([roughness(f) for f in r[1:]]),
                 "change": np.array([change(r[i], r[i - 1]) for i in range(1, len(r))])})
  if open_loop_frames:
    for e in episodes:
      n = min(open_loop_frames, len(e.real) - 1)
      sub = rollouts.Episode(seed=e.seed, actions=e.actions[:n + 1], real=e.real[:n + 1],
                             ram=e.ram[:n + 1])
      gen = rollouts.roll_out(StreamingSession(model, e.seed), sub)
      s = _objects(game, sub.ram, gen, model.frame_size)
      s["roughness"] = np.array([roughness(f) for f in gen[1:]])
      s["ball_signal"] = _ball_signal(game, sub.ram, gen, model.frame_size)
      s["change"] = np.array([change(gen[i], gen[i - 1]) for i in range(1, n + 1)])
      s["mse"] = np.array([_mse(gen[i], sub.real[i]) for i in range(1, n + 1)])
      s["hold_start_mse"] = np.array([_mse(sub.real[0], sub.real[i]) for i in range(1, n + 1)])
      ol.append(s)
  out = {"checkpoint": model.source, "seeds": list(seeds), "tf_frames": n_tf,
         "open_loop_frames": open_loop_frames, "sampler_steps": model.sampler_steps,
         "denoise_t": denoise_t}
  out.update(_summary("tf", tf))
  out.update(_summary("dn", dn))
  out.update(_summary("real", real))
  if ol:
    out.update(_summary("ol", ol))
  return out


COLUMNS = ("tf_ball_present", "tf_ball_error", "real_copy_previous_ball_present",
           "real_copy_previous_ball_error", "tf_ball_signal", "real_ball_signal",
           "tf_player_present", "tf_enemy_present", "tf_roughness", "tf_change", "tf_psnr",
           "tf_copy_previous_psnr", "dn_psnr", "dn_ball_signal", "ol_ball_present",
           "ol_ball_error", "ol_ball_signal",
           "ol_roughness", "ol_change", "ol_psnr", "ol_hold_start_psnr", "real_roughness",
           "real_change")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--checkpoint", required=True, help="a run, stage, step or export directory")
  p.add_argument("--seeds", default="1000,1001,1002", help="emulator/policy seeds")
  p.add_argument("--tf_frames", type=int, default=48)
  p.add_argument("--open_loop_frames", type=int, default=24)
  p.add_argument("--sampler_steps", type=int, default=8,
                 help="Euler steps per open-loop frame (0 = the model's default)")
  p.add_argument("--denoise_t", type=float, default=0.1,  # teacher_forced.DENOISE_T
                 help="noise level t in (0, 1] of the denoising check (dn_*)")
  args = p.parse_args(argv)
  if not 0.0 < args.denoise_t <= 1.0:
    p.error(f"--denoise_t must be in (0, 1], got {args.denoise_t}")
  seeds = [int(s) for s in args.seeds.split(",")]
  from aapt_jax.inference.session import StreamingModel
  model = StreamingModel.load(args.checkpoint, sampler_steps=args.sampler_steps)
  out = probe(model, seeds, args.tf_frames, args.open_loop_frames, args.denoise_t)
  print(json.dumps(out))
  for k in COLUMNS:
    if k in out:
      print(f"  {k:24s} {out[k]:8.3f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
