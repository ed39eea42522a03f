"""Data preparation: worlds -> ArrayRecord clips + whole episodes + metadata.

`prepare_world(out_dir, world="atari", game=...)` writes into `out_dir`:

* ``clips-NNNNN-of-MMMMM.array_record``: fixed-length clips of
  `clip_frames` frames (cut every `clip_stride` frames from each episode),
  fields ``video, fps, world, game, episode, start, seed`` and the
  episode's conditions: ``actions`` int32 ``[T]`` (a world of discrete
  actions) or ``controls`` float32 ``[T, A]`` (a camera world), with the
  camera's ``poses`` float32 ``[T, 5]`` where the world has them;
* ``episodes-NNNNN-of-MMMMM.array_record``: the whole episodes (same fields,
  ``start = 0``) -- later stages roll out longer than any clip and take their
  action sequences (and, via ``seed``, exact emulator replays) from them;
* ``metadata.json``: world, game, num_actions, action_names, control_dim (and
  control_names), size, frame_skip, fps, the recording policy, counts, the
  files, and everything skipped with the reason.

A bad item never stops the run silently: it is skipped, counted, and
reported with its reason in the summary and in metadata.json.
"""
from __future__ import annotations

import glob
import json
import os
import tempfile
from collections.abc import Collection
from typing import Any

from tqdm import tqdm

from aapt_jax.data import records
from aapt_jax.data import worlds
from aapt_jax.data.worlds import policies

WORLDS = worlds.NAMES


def check_output_dir(out_dir: str, overwrite: bool = False,
                     keep: Collection[str] = ()) -> None:
  """Creates `out_dir` and checks it is writable and holds no earlier records
  (unless `overwrite`, which deletes them) other than the file names in
  `keep` (those of a run being resumed); ValueError otherwise."""
  if not out_dir:
    raise ValueError("--out: an output directory is required")
  try:
    os.makedirs(out_dir, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".write_test", dir=out_dir)  # unique: processes
    os.close(fd)                                                      # may share out_dir
    os.remove(probe)
  except OSError as e:
    raise ValueError(f"cannot write to output directory {out_dir!r}: "
                     f"{e.strerror or e}") from None
  old = sorted(glob.glob(os.path.join(out_dir, "clips-*" + records.SUFFIX)) +
               glob.glob(os.path.join(out_dir, "episodes-*" + records.SUFFIX)))
  if not overwrite:
    old = [p for p in old if os.path.basename(p) not in keep]
  if old and not overwrite:
    raise ValueError(f"{out_dir!r} already holds records ({os.path.basename(old[0])}"
                     f", ...); pass --overwrite or choose another --out")
  for p in old:
    os.remove(p)


def clip_starts(num_frames: int, clip_frames: int, stride: int) -> list[int]:
  """Start indices of the full clips of an episode of `num_frames` frames."""
  return list(range(0, num_frames - clip_frames + 1, stride))


PER_FRAME_FIELDS = ("video", "actions", "controls", "poses")


def write_episode(clips_writer: records.RecordWriter, episodes_writer: records.RecordWriter,
                  episode: dict[str, Any], *, clip_frames: int, clip_stride: int,
                  label: str, offset: int = 0) -> tuple[dict[str, int], list[str]]:
  """Writes one whole episode to `episodes_writer` and its clips to `clips_writer`.

  `episode` is the episode's record: its per-frame fields (`PER_FRAME_FIELDS`,
  each [T, ...]) and per-episode values (fps, world, text, ...). A clip is
  the record with the per-frame fields cut to `clip_frames` frames from
  every start s of `clip_starts(T, clip_frames, clip_stride)` and ``start``
  set to `offset` + s (`offset`, the episode's own ``start``: its first
  frame in a longer recording it is a part of). Returns the counts written
  ({"episodes", "episode_frames", "clips", "clip_frames"}) and a reason,
  starting with `label`, for each record not written (too few frames for a
  clip, or a record the writer rejected).
  """
  T = len(episode["video"])
  counts = {"episodes": 0, "episode_frames": 0, "clips": 0, "clip_frames": 0}
  problems: list[str] = []

  def write(writer, kind, start, stop, where):
    example = {k: v[start:stop] if k in PER_FRAME_FIELDS else v for k, v in episode.items()}
    example["start"] = offset + start
    try:
      writer.write(example, source=where)
      counts[kind + "s"] += 1
      counts[kind + "_frames"] += stop - start
    except ValueError as e:
      problems.append(f"{where}: {e}")

  write(episodes_writer, "episode", 0, T, label)
  starts = clip_starts(T, clip_frames, clip_stride)
  if not starts:
    problems.append(f"{label}: {T} frames < clip_frames={clip_frames}, no clips")
  for s in starts:
    write(clips_writer, "clip", s, s + clip_frames, f"{label} clip at frame {s}")
  return counts, problems


def prepare_atari(out_dir: str, **kwargs) -> dict[str, Any]:
  """`prepare_world` of the Atari world."""
  return prepare_world(out_dir, world="atari", **kwargs)


def prepare_world(out_dir: str, *, world: str = "atari", game: str, episodes: int = 8,
                  frames_per_episode: int | None = None, clip_frames: int = 16,
                  clip_stride: int | None = None, size: int = 64,
                  frame_skip: int = 4, seed: int = 0, repeat_prob: float = 0.75,
                  policy: str = "", num_shards: int = 1, overwrite: bool = False,
                  progress: bool = True) -> dict[str, Any]:
  """Records `episodes` episodes of `game` in the `world` (a name in
  `aapt_jax.data.worlds`) and writes clips, episodes and metadata.json to
  `out_dir`; returns the summary (also in metadata.json).

  `frames_per_episode` caps each episode (None/0: until game over); episode
  k is played from seed `seed + k` by the recording policy `policy`
  (`policies.make_policy`, seeded with `seed + k`): "" the world's own
  (sticky-random keeping its previous action with probability `repeat_prob`,
  or the camera explorer for a camera world), "sticky_random", "rally" (Pong:
  keeps the ball in play) or "explorer"; metadata.json names it.
  """
  for name, value, low in (("episodes", episodes, 1), ("clip_frames", clip_frames, 1),
                           ("size", size, 1), ("frame_skip", frame_skip, 1),
                           ("num_shards", num_shards, 1)):
    if int(value) < low:
      raise ValueError(f"--{name} must be >= {low}, got {value}")
  clip_stride = clip_stride or clip_frames
  if clip_stride < 1:
    raise ValueError(f"--clip_stride must be >= 1, got {clip_stride}")
  name = world
  world = worlds.make_world(name, game, size=size, frame_skip=frame_skip)  # checks game
  policy = policies.policy_name(policy, game=world.game, control_dim=world.control_dim)
  check_output_dir(out_dir, overwrite)

  base = {"world": name, "game": world.game, "fps": float(world.fps)}
  skipped: list[str] = []
  counts = {"episodes": 0, "episode_frames": 0, "clips": 0, "clip_frames": 0}
  bar = tqdm(total=episodes, unit="episode", disable=not progress,
             desc=f"{name}/{world.game}")
  with records.RecordWriter(os.path.join(out_dir, "clips"), num_shards) as clips_w, \
       records.RecordWriter(os.path.join(out_dir, "episodes"), num_shards) as eps_w:
    for k in range(episodes):
      ep_seed = seed + k
      try:
        player = policies.make_policy(policy, world, seed=ep_seed, repeat_prob=repeat_prob)
        ep = world.record_episode(ep_seed, player, max_frames=frames_per_episode or None)
      except (RuntimeError, ValueError) as e:
        skipped.append(f"episode {k} (seed {ep_seed}): emulator error: {e}")
        bar.update(1)
        continue
      example = dict(base, video=ep.frames, episode=k, start=0, seed=ep_seed)
      for key in PER_FRAME_FIELDS[1:]:
        if getattr(ep, key, None) is not None:
          example[key] = getattr(ep, key)
      written, problems = write_episode(clips_w, eps_w, example, clip_frames=clip_frames,
                                        clip_stride=clip_stride, label=f"episode {k}")
      for key, n in written.items():
        counts[key] += n
      skipped.extend(problems)
      bar.update(1)
      bar.set_postfix(frames=counts["episode_frames"], clips=counts["clips"])
  bar.close()

  summary = {
      "world": name, "game": world.game, "rom_id": getattr(world, "rom_id", None),
      "num_actions": world.num_actions, "action_names": world.action_names,
      "control_dim": world.control_dim,
      **({"control_names": world.control_names} if world.control_dim else {}),
      "size": list(world.size), "frame_skip": world.frame_skip, "fps": world.fps,
      "clip_frames": clip_frames, "clip_stride": clip_stride, "seed": seed,
      "policy": policy, "repeat_prob": repeat_prob,
      "frames_per_episode": frames_per_episode or None,
  }
  return write_metadata(out_dir, summary, counts, skipped, clips_w, eps_w)


def write_metadata(out_dir: str, settings: dict[str, Any], counts: dict[str, int],
                   skipped: list, clips_w, eps_w) -> dict[str, Any]:
  """Writes `out_dir`/metadata.json: the recording's `settings`, then the
  record format, `counts`, the clip and episode files `clips_w`/`eps_w`
  wrote, and `skipped`; returns that summary."""
  summary = {
      **settings,
      "record_format": records.FORMAT, "counts": counts,
      "files": {"clips": [os.path.basename(p) for p in clips_w.paths],
                "episodes": [os.path.basename(p) for p in eps_w.paths]},
      "skipped": skipped,
  }
  with open(os.path.join(out_dir, "metadata.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary


def format_summary(summary: dict[str, Any], out_dir: str) -> str:
  c = summary["counts"]
  lines = [
      f"{summary['world']}/{summary['game']}: wrote {c['clips']} clips "
      f"({c['clip_frames']} frames) to {os.path.join(out_dir, 'clips-*')} and "
      f"{c['episodes']} episodes ({c['episode_frames']} frames) to "
      f"{os.path.join(out_dir, 'episodes-*')}; metadata.json written.",
      f"skipped {len(summary['skipped'])} item(s)" +
      (":" if summary["skipped"] else "."),
  ]
  lines += [f"  - {s}" for s in summary["skipped"]]
  return "\n".join(lines)
