"""PNG plots of an evaluation (matplotlib, no display): curves over frames
with the spread over seeds as a band (min to max), and a frame strip."""
from __future__ import annotations

import os
import warnings

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _band(ax, curves: np.ndarray, label: str, smooth: int = 1):
  """Mean over seeds with a min-max band; curves [S, T+1] (NaN = none)."""
  curves = np.asarray(curves, np.float64)
  if smooth > 1:  # a running mean over the frames that exist (NaN stays NaN)
    kernel = np.ones(smooth)
    ok = np.isfinite(curves)
    with np.errstate(invalid="ignore"):
      curves = np.stack([np.convolve(np.where(o, c, 0.0), kernel, "same")
                         / np.convolve(o.astype(float), kernel, "same")
                         for c, o in zip(curves, ok)])
    curves[~ok] = np.nan
  x = np.arange(curves.shape[1])
  with warnings.catch_warnings():  # all-NaN frames (past every game's end) stay NaN
    warnings.simplefilter("ignore", RuntimeWarning)
    mean, lo, hi = np.nanmean(curves, 0), np.nanmin(curves, 0), np.nanmax(curves, 0)
  line, = ax.plot(x, mean, label=label, lw=1)
  ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, lw=0)


def _bucket_edges(ax, result):
  for label in result["buckets"][:-1]:
    ax.axvline(int(label.split("-")[1]) + 0.5, color="grey", lw=0.5, ls=":")


def _bar_rows(ax, rows, buckets, title):
  """Grouped bars, one group per horizon bucket: rows [(name, spread per
  bucket)] as mean ± std over seeds."""
  width = 0.8 / max(len(rows), 1)
  for k, (name, cells) in enumerate(rows):
    mean = [c["mean"] if c["mean"] is not None else np.nan for c in cells]
    err = [c["std"] if c["std"] is not None else 0.0 for c in cells]
    ax.bar(np.arange(len(mean)) + k * width, mean, width, yerr=err, label=name)
  ax.set_xticks(np.arange(len(buckets)) + 0.4 - width / 2)
  ax.set_xticklabels(buckets, fontsize=7)
  ax.set_title(title, fontsize=9)


def _bars(ax, result, metric, title):
  # all predictors, so a predictor keeps its colour in every panel
  _bar_rows(ax, list(result["table"].get(metric, {}).items()), result["buckets"], title)


def write_plots(result: dict, out_dir: str) -> dict[str, str]:
  """psnr.png (PSNR per horizon), drift.png (drift curves), objects.png
  (object presence, error, action following per horizon), frames.png (a
  strip of generated, one-step and emulator frames of the first seed),
  turning.png (a camera world's turning test, model above emulator)."""
  paths = {}
  fig, ax = plt.subplots(1, 2, figsize=(11, 3.5))
  _bars(ax[0], result, "psnr", "PSNR vs the emulator (dB), mean ± std over seeds")
  _bars(ax[1], result, "ssim", "SSIM vs the emulator")
  ax[0].legend(fontsize=7)
  paths["psnr.png"] = _save(fig, out_dir, "psnr.png")

  fig, ax = plt.subplots(1, 3, figsize=(14, 3.5))
  for k, stat in enumerate(("mean_colour", "roughness", "change")):
    for name, curves in result["drift"].items():
      _band(ax[k], curves[stat], name, smooth=5)
    _bucket_edges(ax[k], result)
    ax[k].set_title(f"{stat} per frame (5-frame mean; band: min-max over seeds)", fontsize=8)
    ax[k].set_xscale("symlog", linthresh=12)
    ax[k].set_xlim(0, len(curves[stat][0]) - 1)
    ax[k].set_xlabel("latent frame")
  ax[0].legend(fontsize=7)
  paths["drift.png"] = _save(fig, out_dir, "drift.png")

  if result["object_truth"]:
    metrics = [("ball_present", "ball found (recall)"), ("ball_error", "ball error (px)"),
               ("player_present", "player paddle found"), ("player_error", "player error (px)"),
               ("follow", "paddle follows the action")]
    fig, ax = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.5))
    for a, (metric, title) in zip(ax, metrics):
      _bars(a, result, metric, title)
    ax[0].legend(fontsize=6)
    paths["objects.png"] = _save(fig, out_dir, "objects.png")

  strip = result["strip"]
  n = len(strip["generated"]) - 1
  picks = sorted({i for i in (0, 1, 4, 12, 40, 120, 480, 1440, n) if i <= n})
  rows = [("model", strip["generated"]), ("emulator", strip["real"])]
  if strip.get("one_step") is not None:
    rows.insert(1, ("model 1-step", strip["one_step"]))
  paths["frames.png"] = _strip(rows, picks, out_dir, "frames.png")
  if result.get("turning_strip"):  # a camera world's turning test, first seed
    turn = result["turning_strip"]
    n = len(turn["generated"]) - 1                  # 2 x turn_frames
    picks = sorted({int(i) for i in np.linspace(0, n, 9).round()})
    paths["turning.png"] = _strip([("model", turn["generated"]), ("emulator", turn["real"])],
                                  picks, out_dir, "turning.png",
                                  caption=f"turn right for frames 1-{n // 2}, then left")
  return paths


def _strip(rows, picks, out_dir, name, caption=None):
  """A grid of frames: a row per (label, frames [T, H, W, 3]), a column per
  frame index in `picks` (blank where a video is shorter)."""
  fig, ax = plt.subplots(len(rows), len(picks), figsize=(1.6 * len(picks), 1.8 * len(rows)),
                         squeeze=False)
  for r, (label, frames) in enumerate(rows):
    for c, i in enumerate(picks):
      ax[r, c].axis("off")
      if i < len(frames):
        ax[r, c].imshow(frames[i], interpolation="nearest")
      ax[r, c].set_title(f"{label} {i}", fontsize=7)
  if caption:
    fig.suptitle(caption, fontsize=8)
  return _save(fig, out_dir, name)


def _save(fig, out_dir, name):
  path = os.path.join(out_dir, name)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


def _compare_bars(ax, result, metric, title, baselines=()):
  """Bars per horizon: each arm's open-loop `metric` (mean ± std over seeds),
  then the named baselines'."""
  rows = [(a["name"], a["open_loop"].get(metric)) for a in result["arms"]]
  rows += [(b, result["baselines"][b].get(metric)) for b in baselines]
  _bar_rows(ax, [(n, cells) for n, cells in rows if cells], result["buckets"], title)
  ax.set_xlabel("latent frames (horizon)", fontsize=7)


def write_comparison_plots(result: dict, out_dir: str) -> dict[str, str]:
  """compare_psnr.png, compare_objects.png (with object truth),
  compare_drift.png and compare_frames.png (each arm's first seed beside the
  emulator) of `evaluation.compare.compare`'s result."""
  paths = {}
  fig, ax = plt.subplots(1, 2, figsize=(12, 3.8))
  _compare_bars(ax[0], result, "psnr", "open-loop PSNR vs the emulator (dB)",
                ("hold_start", "copy_previous"))
  _compare_bars(ax[1], result, "ssim", "open-loop SSIM", ("hold_start",))
  ax[0].legend(fontsize=6)
  paths["compare_psnr.png"] = _save(fig, out_dir, "compare_psnr.png")

  if result["object_truth"]:
    metrics = [("ball_present", "ball found (recall)"), ("ball_error", "ball error (px)"),
               ("player_present", "player paddle found"), ("follow", "paddle follows")]
    fig, ax = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.5))
    for a, (metric, title) in zip(ax, metrics):
      _compare_bars(a, result, metric, title)
    ax[0].legend(fontsize=6)
    paths["compare_objects.png"] = _save(fig, out_dir, "compare_objects.png")

  fig, ax = plt.subplots(1, 2, figsize=(11, 3.5))
  for k, stat in enumerate(("roughness", "change")):
    for a in result["arms"]:
      _band(ax[k], a["drift"][stat], a["name"], smooth=5)
    _band(ax[k], result["emulator_drift"][stat], "emulator", smooth=5)
    ax[k].axvline(10 * result["clip_frames"], color="grey", lw=0.5, ls=":")
    ax[k].set_title(f"{stat} per frame (dotted: 10x the training clip)", fontsize=8)
    ax[k].set_xlabel("latent frame")
  ax[0].legend(fontsize=6)
  paths["compare_drift.png"] = _save(fig, out_dir, "compare_drift.png")

  n = len(result["real_strip"]) - 1
  picks = sorted({i for i in (0, 1, 4, result["clip_frames"], 3 * result["clip_frames"],
                              10 * result["clip_frames"], n) if i <= n})
  rows = [(a["name"], a["strip"]) for a in result["arms"]] + [("emulator", result["real_strip"])]
  paths["compare_frames.png"] = _strip(rows, picks, out_dir, "compare_frames.png")
  return paths
