"""Writes an evaluation (suite.evaluate's result) as report.json, report.md
and PNG plots into a folder."""
from __future__ import annotations

import json
import math
import os

import numpy as np

from aapt_jax.evaluation import plots
from aapt_jax.evaluation.teacher_forced import DENOISE_T

# (metric key, row title, format, higher is better)
_ROWS = [("psnr", "PSNR (dB)", "{:.2f}"), ("ssim", "SSIM", "{:.3f}"),
         ("ball_present", "ball found where the emulator shows it", "{:.2f}"),
         ("ball_error", "ball position error (px)", "{:.2f}"),
         ("ball_phantom", "ball found where there is none", "{:.2f}"),
         ("player_present", "player paddle found", "{:.2f}"),
         ("player_error", "player paddle error (px)", "{:.2f}"),
         ("enemy_present", "enemy paddle found", "{:.2f}"),
         ("enemy_error", "enemy paddle error (px)", "{:.2f}"),
         ("follow", "paddle moves as the action says", "{:.2f}"),
         ("camera_follow", "picture turns against the yaw (camera world)", "{:.2f}"),
         ("change_corr", "one-step change against the real change: correlation", "{:.2f}"),
         ("change_gain", "one-step change's size over the real change's (1 = as large)",
          "{:.2f}")]
_PREDICTOR_NOTES = {
    "model": "the model, open loop (its own frames recycled)",
    "hold_start": "hold the start frame (open loop)",
    "copy_previous": "copy the previous real frame (one step, teacher forced)",
    "model_1step": "the model's one-step prediction from real previous frames (teacher forced)",
    "model_denoise": (f"the same from the real frame noised to t = {DENOISE_T} instead of "
                      "from noise alone (the denoising check: a diffusion model scores far above "
                      "model_1step; the same score = it ignores its noisy input)"),
    "emulator": "the emulator's own frames (detector and action-following reference)",
}


def _cell(s: dict, fmt: str) -> str:
  if s["mean"] is None:
    return "–"
  text = f"{fmt.format(s['mean'])} ± {fmt.format(s['std'])}"
  return text if s["n"] > 1 else text + " (1 seed)"


def _json_ready(tree):
  if isinstance(tree, dict):
    return {str(k): _json_ready(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [_json_ready(v) for v in tree]
  if isinstance(tree, np.ndarray):
    return [_json_ready(v) for v in tree.tolist()]
  if isinstance(tree, float) and not math.isfinite(tree):
    return None
  return tree


def drift_cells(curves, buckets) -> list[str]:
  """Per horizon bucket ("lo-hi"), the mean of drift curves [seeds, T+1] over
  seeds and the bucket's frames (NaN left out; "–" when none)."""
  cells = []
  for label in buckets:
    lo, hi = (int(v) for v in label.split("-"))
    part = np.asarray(curves, np.float64)[:, lo:hi + 1]
    part = part[np.isfinite(part)]
    cells.append(f"{part.mean():.2f}" if part.size else "–")
  return cells


def clip_phrase(result: dict) -> str:
  """What the horizons are cut by: the training clip, or the clip that
  Settings.horizon_clip set (then the checkpoints' own clips beside it)."""
  clip, s = result["clip_frames"], result["settings"]
  if not s.get("horizon_clip"):
    text = f"training clip {clip} frames (10x = {10 * clip})"
  else:
    own = sorted({result["train_clip_frames"]} if "train_clip_frames" in result else
                 {a["train_clip_frames"] for a in result.get("arms", ())})
    text = (f"horizons cut by a clip of {clip} frames (10x = {10 * clip}; --horizon_clip), "
            f"trained on clips of {' and '.join(str(c) for c in own)} frames")
  if s.get("horizons"):
    text += f"; horizons end at frames {', '.join(str(e) for e in s['horizons'])} (--horizons)"
  return text


def markdown(result: dict) -> str:
  """report.md's text: one table per metric (rows predictors, columns horizons)."""
  s = result["settings"]
  camera = "camera_follow" in result["table"]  # a camera world: the explorer's controls
  played = ("the camera explorer's control vectors" if camera
            else f"sticky-random policy, repeat {s['repeat_prob']}")
  lines = [f"# Evaluation of {result['source']}", "",
           f"{result['game']}, open loop against the emulator replaying the same "
           f"{'controls' if camera else 'actions'} ({played}); seeds {list(s['seeds'])}; "
           f"{s['frames']} latent frames; {clip_phrase(result)}. Cells: mean ± std over seeds of each "
           f"seed's mean over the horizon's frames. The emulator's "
           f"{'episode' if camera else 'game'} ends after "
           + ", ".join(f"{v} frames (seed {k})" for k, v in result["real_frames"].items())
           + ": comparisons stop there; drift curves go on. Teacher-forced one-step rows "
           f"cover frames 1-{result['teacher_forced_frames']}.", "",
           "Predictors: " + "; ".join(f"`{k}` = {v}" for k, v in _PREDICTOR_NOTES.items()),
           ""]
  header = "| | " + " | ".join(result["buckets"]) + " |"
  rule = "|---" * (len(result["buckets"]) + 1) + "|"
  for key, title, fmt in _ROWS:
    if key not in result["table"]:
      continue
    lines += [f"## {title}", "", header, rule]
    for name, cells in result["table"][key].items():
      if key in ("psnr", "ssim") and name == "emulator":
        continue
      lines.append(f"| {name} | " + " | ".join(_cell(c, fmt) for c in cells) + " |")
    lines.append("")
  lines += ["## Drift (model vs emulator, mean over seeds and the horizon's frames)", "",
            header, rule]
  for stat in ("mean_colour", "roughness", "change"):
    for name, curves in result["drift"].items():
      lines.append(f"| {stat} {name} | " + " | ".join(drift_cells(curves[stat],
                                                                 result["buckets"])) + " |")
  lines.append("")
  if result.get("turning"):
    n = result["settings"]["turn_frames"]
    lines += ["## Turning test (camera world)", "",
              f"From each seed's start frame, yaw +1 (turn right at the full rate) for {n} "
              f"frames, then yaw -1 for {n}; no walking. *Turned*: the share of the phase's "
              "frames whose picture moved against the turn (right turn: the scene moves "
              "left) by at least 1/128 of the width; *px per frame*: the mean shift against "
              "the turn (negative: the wrong way). Strip: turning.png.", "",
              "| phase | video | turned | px per frame |", "|---|---|---|---|"]
    for phase, videos in result["turning"].items():
      for video, stats in videos.items():
        lines.append(f"| {phase} | {video} | {_cell(stats['turned'], '{:.2f}')} | "
                     f"{_cell(stats['px_per_frame'], '{:.2f}')} |")
    lines.append("")
  lines += ["## FVD (I3D, Kinetics-400)", ""]
  if result["fvd"]:
    lines += ["| window | " + " | ".join(next(iter(result["fvd"].values()))) + " |",
              "|---" * (1 + len(next(iter(result["fvd"].values())))) + "|"]
    for window, scores in result["fvd"].items():
      lines.append(f"| {window} | " + " | ".join(f"{v:.1f}" for v in scores.values()) + " |")
    lines.append("")
  lines += [f"FVD: {result['fvd_note'] or 'not computed (--fvd=false)'}", "",
            "Plots: psnr.png, drift.png, objects.png, frames.png. "
            f"Run time {result['seconds']} s ("
            + ", ".join(f"{k} {v} s" for k, v in result["seconds_per_phase"].items())
            + ").", ""]
  return "\n".join(lines)


def write_report(result: dict, out_dir: str) -> dict[str, str]:
  """Writes report.json, report.md and the plots; returns {name: path}."""
  os.makedirs(out_dir, exist_ok=True)
  paths = {"report.json": os.path.join(out_dir, "report.json"),
           "report.md": os.path.join(out_dir, "report.md")}
  data = {k: v for k, v in result.items() if k not in ("strip", "turning_strip")}
  with open(paths["report.json"], "w") as f:
    json.dump(_json_ready(data), f, indent=1)
  with open(paths["report.md"], "w") as f:
    f.write(markdown(result))
  paths.update(plots.write_plots(result, out_dir))
  return paths
