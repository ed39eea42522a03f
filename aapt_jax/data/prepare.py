"""Data preparation: worlds and datasets -> ArrayRecord clips + whole episodes + metadata.

`prepare_world(out_dir, world="atari", game=...)` (a simulator) and
`prepare_tfds(out_dir, name=...)` (a TFDS dataset, RLDS episodes in
particular; `worlds.tfds_world`) write into `out_dir`, both through
`record_episodes`:

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
  control_names), size, frame_skip (a simulator), fps, counts, the files, and
  everything skipped with the reason; a TFDS dataset adds ``tfds`` (name,
  version, split, the feature paths read) and ``action_kind`` ("ids",
  "controls" or None).

A bad item never stops the run silently: it is skipped, counted, and
reported with its reason in the summary and in metadata.json.
"""
from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm

from aapt_jax.data import records
from aapt_jax.data import worlds
from aapt_jax.data.worlds.policies import default_policy

WORLDS = worlds.NAMES
FRAME_FIELDS = ("video", "actions", "controls", "poses")  # cut with each clip


def check_output_dir(out_dir: str, overwrite: bool = False) -> None:
  """Creates `out_dir` and checks it is writable and holds no earlier records
  (unless `overwrite`, which deletes them); ValueError otherwise."""
  if not out_dir:
    raise ValueError("--out: an output directory is required")
  try:
    os.makedirs(out_dir, exist_ok=True)
    probe = os.path.join(out_dir, ".write_test")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise ValueError(f"cannot write to output directory {out_dir!r}: "
                     f"{e.strerror or e}") from None
  old = sorted(glob.glob(os.path.join(out_dir, "clips-*" + records.SUFFIX)) +
               glob.glob(os.path.join(out_dir, "episodes-*" + records.SUFFIX)))
  if old and not overwrite:
    raise ValueError(f"{out_dir!r} already holds records ({os.path.basename(old[0])}"
                     f", ...); pass --overwrite or choose another --out")
  for p in old:
    os.remove(p)


def check_positive(**values: int) -> None:
  """ValueError naming the flag of the first value below 1."""
  for name, value in values.items():
    if int(value) < 1:
      raise ValueError(f"--{name} must be >= 1, got {value}")


def clip_starts(num_frames: int, clip_frames: int, stride: int) -> list[int]:
  """Start indices of the full clips of an episode of `num_frames` frames."""
  return list(range(0, num_frames - clip_frames + 1, stride))


def prepare_atari(out_dir: str, **kwargs) -> dict[str, Any]:
  """`prepare_world` of the Atari world."""
  return prepare_world(out_dir, world="atari", **kwargs)


def prepare_world(out_dir: str, *, world: str = "atari", game: str, episodes: int = 8,
                  frames_per_episode: int | None = None, clip_frames: int = 16,
                  clip_stride: int | None = None, size: int = 64,
                  frame_skip: int = 4, seed: int = 0, repeat_prob: float = 0.75,
                  num_shards: int = 1, overwrite: bool = False,
                  progress: bool = True) -> dict[str, Any]:
  """Records `episodes` episodes of `game` in the `world` (a name in
  `aapt_jax.data.worlds`) and writes clips, episodes and metadata.json to
  `out_dir`; returns the summary (also in metadata.json).

  `frames_per_episode` caps each episode (None/0: until game over); episode
  k is played from seed `seed + k` by the world's recording policy
  (`policies.default_policy`: sticky-random keeping its previous action with
  probability `repeat_prob`, or the camera explorer for a camera world).
  """
  check_positive(episodes=episodes, clip_frames=clip_frames, size=size,
                 frame_skip=frame_skip, num_shards=num_shards)
  clip_stride = clip_stride or clip_frames
  check_positive(clip_stride=clip_stride)
  name = world
  world = worlds.make_world(name, game, size=size, frame_skip=frame_skip)  # checks game
  check_output_dir(out_dir, overwrite)

  def played():
    for k in range(episodes):
      ep_seed = seed + k
      try:
        policy = default_policy(world, seed=ep_seed, repeat_prob=repeat_prob)
        ep = world.record_episode(ep_seed, policy, max_frames=frames_per_episode or None)
      except (RuntimeError, ValueError) as e:
        yield f"episode {k} (seed {ep_seed})", f"emulator error: {e}"
        continue
      fields = {"video": ep.frames, "episode": k, "seed": ep_seed}
      for key in FRAME_FIELDS[1:]:
        if getattr(ep, key, None) is not None:
          fields[key] = getattr(ep, key)
      yield f"episode {k}", fields

  counts, skipped, files = record_episodes(
      out_dir, played(), base={"world": name, "game": world.game, "fps": float(world.fps)},
      clip_frames=clip_frames, clip_stride=clip_stride, num_shards=num_shards,
      total=episodes, desc=f"{name}/{world.game}", progress=progress)
  summary = {
      "world": name, "game": world.game, "rom_id": getattr(world, "rom_id", None),
      "num_actions": world.num_actions, "action_names": world.action_names,
      "control_dim": world.control_dim,
      **({"control_names": world.control_names} if world.control_dim else {}),
      "size": list(world.size), "frame_skip": world.frame_skip, "fps": world.fps,
      "clip_frames": clip_frames, "clip_stride": clip_stride, "seed": seed,
      "repeat_prob": repeat_prob, "frames_per_episode": frames_per_episode or None,
      "record_format": records.FORMAT, "counts": counts, "files": files,
      "skipped": skipped,
  }
  write_metadata(out_dir, summary)
  return summary


def prepare_tfds(out_dir: str, *, name: str, data_dir: str = "", split: str = "train",
                 video: str | None = None, action: str | None = None,
                 caption: str | None = None, action_shift: int = 1,
                 episodes: int | None = None, frames_per_episode: int | None = None,
                 clip_frames: int = 16, clip_stride: int | None = None, size: int = 64,
                 fps: float = 10.0, num_shards: int = 1, overwrite: bool = False,
                 progress: bool = True) -> dict[str, Any]:
  """Records the episodes of a TFDS dataset's `split` (the first `episodes`;
  None/0: all) like a world's: clips, episodes and metadata.json in
  `out_dir`; returns the summary (also in metadata.json).

  `video`, `action`, `caption` are feature paths (None: RLDS's
  ``steps/observation/image``, ``steps/action`` and, where the dataset has
  it, ``steps/language_instruction``; "" for action or caption: none); see
  `worlds.tfds_world` for how they are read and aligned. Episode k of the
  split is record field ``episode`` k. The dataset's frames are kept as they
  are (at most `frames_per_episode` of each); `fps` is their rate, recorded
  in every example. metadata.json says whether the actions became action ids
  (``action_kind`` "ids", ``num_actions``) or controls (``action_kind``
  "controls", ``control_dim``, ``control_names``).
  """
  from aapt_jax.data.worlds import tfds_world
  check_positive(clip_frames=clip_frames, size=size, num_shards=num_shards)
  clip_stride = clip_stride or clip_frames
  check_positive(clip_stride=clip_stride)
  if episodes is not None and episodes < 0:
    raise ValueError(f"--episodes must be >= 0 (0 = all), got {episodes}")
  if not fps > 0:
    raise ValueError(f"--tfds_fps must be > 0, got {fps}")
  if not name:
    raise ValueError("--tfds_name: name the dataset (e.g. --tfds_name=bridge)")
  reader = tfds_world.TfdsEpisodes(
      name, data_dir=data_dir, split=split,
      video=tfds_world.RLDS_VIDEO if video is None else video,
      action=tfds_world.RLDS_ACTION if action is None else action, caption=caption,
      size=size, action_shift=action_shift, max_frames=frames_per_episode or None)
  check_output_dir(out_dir, overwrite)
  total = min(episodes, len(reader)) if episodes else len(reader)

  def read():
    for k in range(total):
      try:
        fields = reader.episode(k)
      except ValueError as e:
        yield f"episode {k}", str(e)
        continue
      yield f"episode {k}", dict(fields, episode=k)

  counts, skipped, files = record_episodes(
      out_dir, read(), base={"world": "tfds", "game": name, "fps": float(fps)},
      clip_frames=clip_frames, clip_stride=clip_stride, num_shards=num_shards,
      total=total, desc=f"tfds/{name}", progress=progress)
  num_actions, action_names = reader.names()
  summary = {
      "world": "tfds", "game": name, "tfds": reader.describe(),
      "action_kind": reader.action_kind, "num_actions": num_actions,
      "action_names": action_names, "control_dim": reader.control_dim,
      **({"control_names": reader.control_names} if reader.control_dim else {}),
      "size": [size, size], "fps": float(fps), "clip_frames": clip_frames,
      "clip_stride": clip_stride, "frames_per_episode": frames_per_episode or None,
      "record_format": records.FORMAT, "counts": counts, "files": files,
      "skipped": skipped,
  }
  write_metadata(out_dir, summary)
  return summary


def record_episodes(out_dir: str, episodes: Iterable[tuple[str, dict[str, Any] | str]], *,
                    base: dict[str, Any], clip_frames: int, clip_stride: int,
                    num_shards: int = 1, total: int | None = None, desc: str = "",
                    progress: bool = True) -> tuple[dict[str, int], list[str], dict]:
  """Writes every episode of `episodes` whole to `out_dir`/episodes-* and cut
  into clips of `clip_frames` frames every `clip_stride` frames to
  `out_dir`/clips-* (`num_shards` files each; the directory is checked by
  the caller). Returns (counts, skipped, files) for metadata.json.

  `episodes` yields ``(label, fields)``: `fields` holds the per-frame arrays
  ``video`` uint8 [T, H, W, 3] and any of ``actions`` [T], ``controls``
  [T, A], ``poses`` [T, P] (``FRAME_FIELDS``, cut with the clip) and
  scalars (``episode``, ``seed``, ``text``, ...) every clip of the episode
  keeps; or `fields` is a str, the reason the episode `label` was skipped.
  Every example also holds `base` (``world``, ``game``, ``fps``). An example
  the records refuse, or an episode shorter than one clip, is skipped with
  its label and reason.
  """
  skipped: list[str] = []
  counts = {"episodes": 0, "episode_frames": 0, "clips": 0, "clip_frames": 0}
  bar = tqdm(total=total, unit="episode", disable=not progress, desc=desc)
  with records.RecordWriter(os.path.join(out_dir, "clips"), num_shards) as clips_w, \
       records.RecordWriter(os.path.join(out_dir, "episodes"), num_shards) as eps_w:
    for label, fields in episodes:
      if isinstance(fields, str):
        skipped.append(f"{label}: {fields}")
        bar.update(1)
        continue
      T = len(fields["video"])

      def write(writer, kind, start, stop, where):
        """Writes frames start..stop of the episode; counts it or records why not."""
        example = dict(base, start=start)
        for key, value in fields.items():
          example[key] = value[start:stop] if key in FRAME_FIELDS else value
        try:
          writer.write(example, source=where)
          counts[kind + "s"] += 1
          counts[kind + "_frames"] += stop - start
        except ValueError as e:
          skipped.append(f"{where}: {e}")

      write(eps_w, "episode", 0, T, label)
      starts = clip_starts(T, clip_frames, clip_stride)
      if not starts:
        skipped.append(f"{label}: {T} frames < clip_frames={clip_frames}, no clips")
      for s in starts:
        write(clips_w, "clip", s, s + clip_frames, f"{label} clip at frame {s}")
      bar.update(1)
      bar.set_postfix(frames=counts["episode_frames"], clips=counts["clips"])
  bar.close()
  files = {"clips": [os.path.basename(p) for p in clips_w.paths],
           "episodes": [os.path.basename(p) for p in eps_w.paths]}
  return counts, skipped, files


def write_metadata(out_dir: str, summary: dict[str, Any]) -> None:
  with open(os.path.join(out_dir, "metadata.json"), "w") as f:
    json.dump(summary, f, indent=2)


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
