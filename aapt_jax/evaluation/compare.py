"""Several models evaluated on the same emulator episodes, side by side: the
table that says whether a stage (or a training recipe) helps.

`compare(arms, settings)` runs `suite.evaluate` once per arm (the same seeds,
so every arm and the trivial predictors see the same real frames) and keeps
per arm its open-loop rows, its one-step teacher-forced PSNR, its drift curves,
its forwards and milliseconds per latent frame, and one seed's frames.
`write_comparison(result, out_dir)` writes compare.json, compare.md and
compare_*.png.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence

from aapt_jax.evaluation import metrics, suite
from aapt_jax.evaluation.report import _ROWS, _cell, _json_ready, clip_phrase, drift_cells

# the arms' open-loop rows and the trivial predictors beside them
BASELINES = ("hold_start", "copy_previous")
# the one-step teacher-forced frame's metrics each arm carries ("one_step")
ONE_STEP_METRICS = ("psnr", "change_corr", "change_gain")


@dataclasses.dataclass(frozen=True)
class Arm:
  """One row of the comparison: `checkpoint` (run, stage, step or export
  directory) sampled with `sampler_steps` forwards per latent frame."""
  name: str
  checkpoint: str
  sampler_steps: int = 1
  note: str = ""


def parse_arms(text: Sequence[str]) -> list[Arm]:
  """"name=DIR" or "name=DIR@STEPS" items -> arms (ValueError naming a bad one)."""
  arms = []
  for item in text:
    name, sep, rest = item.partition("=")
    path, at, steps = rest.partition("@")
    if not sep or not name or not path or (at and not steps.isdigit()) or (
        at and int(steps) < 1):
      raise ValueError(f"--arms item {item!r}: expected name=DIR or name=DIR@STEPS "
                       "(STEPS >= 1 forwards per latent frame)")
    arms.append(Arm(name, path, int(steps) if at else 1))
  names = [a.name for a in arms]
  if len(set(names)) != len(names) or not arms:
    raise ValueError(f"--arms needs distinct names, got {names}")
  return arms


def compare(arms: Sequence[Arm], settings: suite.Settings,
            load: Callable[[Arm], object] | None = None) -> dict:
  """Evaluates every arm on the same seeds. `load(arm)` gives its
  StreamingSession (default: StreamingSession.load of its checkpoint)."""
  settings.check()
  if load is None:
    from aapt_jax.inference.session import StreamingSession
    load = lambda arm: StreamingSession.load(arm.checkpoint, sampler_steps=arm.sampler_steps)
  rows, baselines, first = [], {}, None
  for arm in arms:
    print(f"compare: {arm.name} ({arm.checkpoint}, {arm.sampler_steps} forward(s) per frame)")
    r = suite.evaluate(load(arm), settings)
    if first is None:
      first = r
      baselines = {name: {m: r["table"][m][name] for m in r["table"] if name in r["table"][m]}
                   for name in BASELINES}
    elif r["buckets"] != first["buckets"] or r["real_frames"] != first["real_frames"]:
      raise ValueError(f"arm {arm.name}: its episodes or horizons differ from {arms[0].name}'s "
                       f"(another world or game, or another training clip: {r['train_clip_frames']} "
                       f"against {first['train_clip_frames']} frames): arms must share one world; "
                       "--horizon_clip=N cuts every arm's horizons by one clip length")
    rows.append({
        "name": arm.name, "source": r["source"], "note": arm.note,
        "sampler_steps": arm.sampler_steps, "ms_per_frame": r["ms_per_frame"],
        "train_clip_frames": r["train_clip_frames"],
        "open_loop": {m: r["table"][m]["model"] for m in r["table"] if "model" in r["table"][m]},
        "one_step": {m: r["table"][m]["model_1step"] for m in ONE_STEP_METRICS
                     if "model_1step" in r["table"].get(m, {})},
        "drift": r["drift"]["model"], "fvd": {w: s.get("model") for w, s in r["fvd"].items()},
        "turning": {phase: v["generated"] for phase, v in r["turning"].items()},
        "strip": r["strip"]["generated"]})
  return {"game": first["game"], "clip_frames": first["clip_frames"],
          "settings": dataclasses.asdict(settings), "buckets": first["buckets"],
          "real_frames": first["real_frames"], "object_truth": first["object_truth"],
          "arms": rows, "baselines": baselines,
          "emulator_turning": {phase: v["emulator"] for phase, v in first["turning"].items()},
          "emulator_drift": first["drift"]["emulator"], "real_strip": first["strip"]["real"]}


def _one_step_rows(result, key: str, fmt: str) -> list[str]:
  """The arms' one-step teacher-forced cells of `key`: one row per checkpoint
  (its sampler does not change them)."""
  rows, seen = [], set()
  for a in result["arms"]:
    cells = a["one_step"].get(key)
    if cells and a["source"] not in seen:
      seen.add(a["source"])
      rows.append(f"| {a['name']}, one step teacher-forced | "
                  + " | ".join(_cell(c, fmt) for c in cells) + " |")
  return rows


def _long_bucket(result) -> int:
  """The bucket that holds frame 10 x clip (the paper's long horizon), else the last."""
  target = 10 * result["clip_frames"]
  for k, label in enumerate(result["buckets"]):
    lo, hi = (int(v) for v in label.split("-"))
    if lo <= target <= hi:
      return k
  return len(result["buckets"]) - 1


def best_at_long_horizon(result, metric: str = "psnr") -> str:
  """The arm with the highest mean `metric` in the 10x-clip bucket."""
  k = _long_bucket(result)
  scored = [(a["open_loop"][metric][k]["mean"], a["name"]) for a in result["arms"]
            if a["open_loop"].get(metric) and a["open_loop"][metric][k]["mean"] is not None]
  return max(scored)[1] if scored else ""


def reference_arm(result: dict) -> dict | None:
  """The arm others are compared with seed by seed: the one named in
  result["reference"] (default "stage2", else none)."""
  name = result.get("reference", "stage2")
  return next((a for a in result["arms"] if a["name"] == name), None)


def markdown(result: dict, title: str = "Comparison") -> str:
  s = result["settings"]
  lines = [f"# {title}", "",
           f"{result['game']}, open loop against the emulator replaying the same actions; "
           f"seeds {list(s['seeds'])}; {s['frames']} latent frames; {clip_phrase(result)}, "
           f"10x in bucket {result['buckets'][_long_bucket(result)]}. "
           "Cells: mean ± std over seeds of each seed's mean over the horizon's frames. Every "
           "arm rolls out on the same episodes (same start frames, actions and noise seeds).",
           "", "| arm | checkpoint | forwards per frame | ms per frame (this CPU) | note |",
           "|---|---|---|---|---|"]
  for a in result["arms"]:
    lines.append(f"| {a['name']} | `{a['source']}` | {a['sampler_steps']} | "
                 f"{a['ms_per_frame']:.1f} | {a['note']} |")
  header = "| | " + " | ".join(result["buckets"]) + " |"
  rule = "|---" * (len(result["buckets"]) + 1) + "|"
  best = best_at_long_horizon(result)
  if best:
    lines += ["", f"Highest PSNR at 10x the training clip: **{best}**."]
  for key, name, fmt in _ROWS:
    if not any(key in a["open_loop"] for a in result["arms"]):
      continue
    lines += ["", f"## {name}", "", header, rule]
    for a in result["arms"]:
      if key in a["open_loop"]:
        lines.append(f"| {a['name']} | " + " | ".join(_cell(c, fmt) for c in a["open_loop"][key])
                     + " |")
    for base, cells in result["baselines"].items():
      if key in cells and key in ("psnr", "ssim"):
        lines.append(f"| *{base}* | " + " | ".join(_cell(c, fmt) for c in cells[key]) + " |")
    if key == "psnr":
      lines += _one_step_rows(result, key, fmt)
  for key, name, fmt in _ROWS:  # the one-step frame's own rows (change_corr, change_gain)
    if key == "psnr" or key not in ONE_STEP_METRICS or not _one_step_rows(result, key, fmt):
      continue
    lines += ["", f"## {name} (one step, teacher forced)", "", header, rule]
    lines += _one_step_rows(result, key, fmt)
  lines += ["", "## Drift: roughness (adjacent-pixel |difference|, 0-255)", "", header, rule]
  curves = [(a["name"], a["drift"]["roughness"]) for a in result["arms"]]
  curves.append(("*emulator*", result["emulator_drift"]["roughness"]))
  for name, c in curves:
    lines.append(f"| {name} | " + " | ".join(drift_cells(c, result["buckets"])) + " |")
  ref = reference_arm(result)
  if ref is not None:
    lines += ["", f"## PSNR difference to {ref['name']}, seed by seed (dB)", "",
              "Each seed's arm minus its reference on the same episode: mean ± std over "
              "seeds (min to max); the spread of the levels above is mostly how hard each "
              "episode is.", "", header, rule]
    for a in result["arms"]:
      if a is ref:
        continue
      cells = [metrics.paired_difference(x, y)
               for x, y in zip(a["open_loop"]["psnr"], ref["open_loop"]["psnr"])]
      lines.append(f"| {a['name']} | " + " | ".join(
          "–" if c["mean"] is None else
          f"{c['mean']:+.2f} ± {c['std']:.2f} ({c['min']:+.2f} to {c['max']:+.2f})"
          for c in cells) + " |")
  fvd = [(a["name"], a["fvd"]) for a in result["arms"] if a["fvd"]]
  if fvd:
    windows = list(fvd[0][1])
    lines += ["", "## FVD (I3D) of the open-loop clips against the emulator's", "",
              "| arm | " + " | ".join(windows) + " |", "|---" * (len(windows) + 1) + "|"]
    for name, f in fvd:
      lines.append(f"| {name} | " + " | ".join(
          "–" if f.get(w) is None else f"{f[w]:.1f}" for w in windows) + " |")
  if result.get("emulator_turning"):
    lines += ["", "## Turning test (camera world)", "",
              f"Yaw +1 for {s['turn_frames']} frames, then -1 as long, from each seed's start "
              "frame: the share of each phase's frames whose picture moved against the turn, "
              "and the mean shift against it (px per frame).", "",
              "| arm | right: turned | right: px per frame | left: turned | left: px per frame |",
              "|---|---|---|---|---|"]
    for name, turning in ([(a["name"], a["turning"]) for a in result["arms"]]
                          + [("*emulator*", result["emulator_turning"])]):
      lines.append(f"| {name} | " + " | ".join(
          _cell(turning[phase][stat], "{:.2f}") for phase in ("right", "left")
          for stat in ("turned", "px_per_frame")) + " |")
  lines += ["", "Plots: compare_psnr.png, compare_objects.png, compare_drift.png, "
            "compare_frames.png.", ""]
  return "\n".join(lines)


def write_comparison(result: dict, out_dir: str, title: str = "Comparison") -> dict[str, str]:
  """compare.json (without frames), compare.md and the plots; returns {name: path}."""
  from aapt_jax.evaluation import plots
  os.makedirs(out_dir, exist_ok=True)
  paths = {"compare.json": os.path.join(out_dir, "compare.json"),
           "compare.md": os.path.join(out_dir, "compare.md")}
  data = {k: v for k, v in result.items() if k != "real_strip"}
  data["arms"] = [{k: v for k, v in a.items() if k != "strip"} for a in result["arms"]]
  with open(paths["compare.json"], "w") as f:
    json.dump(_json_ready(data), f, indent=1)
  with open(paths["compare.md"], "w") as f:
    f.write(markdown(result, title))
  paths.update(plots.write_comparison_plots(result, out_dir))
  return paths
