"""A folder of videos -> ArrayRecord clips + whole videos + metadata.json,
in shards that survive an interruption and split over processes.

    prepare_videos("data/mine", src="videos/", size=(64, 64), fps=16, clip_frames=17)

writes into `out_dir` what data/prepare.py writes for a simulated world, so
the same loaders and configs train on it:

* ``clips-GGGGG-of-TTTTT.array_record``: clips of `clip_frames` frames cut
  every `clip_stride` frames from each video;
* ``episodes-GGGGG-of-TTTTT.array_record``: the whole videos (or their
  parts of `max_video_frames` frames: a video is held in memory, at the
  output size, one record at a time);
* ``metadata.json``: the settings, ``counts`` (``videos``, ``video_frames``,
  ``clips``, ``clip_frames``), the files, and ``skipped``: one
  ``{"file", "reason"}`` per video not recorded (empty, unreadable, corrupt,
  shorter than `clip_frames` after resampling).

Record fields: ``video`` uint8 [T, h, w, 3] (worlds/videos.py: resampled to
`fps`, center-cropped and area-resized to `size`), ``fps``, ``world``
("videos"), ``game`` (""), ``file`` (the video's path relative to `src`),
``episode`` (its index in the sorted file list), ``start`` (the record's
first frame in the video), ``text`` (its caption, "" without one) and,
with a `text_encoder`, ``text_embedding`` float32 [n, D]: the caption's n
unpadded token embeddings (at most `text_len`), which the input pipeline
pads to ``data.text_len`` with a mask. No actions or controls.

Shards: the sorted files are dealt to T = `num_shards` shards (file i to
shard i % T) and shard g is recorded by process g % `num_processes`; T is a
multiple of num_processes, so file i is recorded by process i % num_processes.
A shard is written under ``out_dir/.partial`` and moved into `out_dir` when
whole, then its marker ``out_dir/.shards/GGGGG-of-TTTTT.json`` (its counts,
skipped files and the recording's settings) is written. So an interrupted
run leaves only whole shards in `out_dir` (usable as they are), and a rerun
with the same settings skips the shards that have a marker. The process that
finds every shard's marker writes metadata.json. `prepare_videos_in_workers`
runs several local processes so.
"""
from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import shutil
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from aapt_jax.data import records
from aapt_jax.data.prepare import check_output_dir, write_episode
from aapt_jax.data.worlds import videos

WORLD = "videos"
VIDEOS_PER_SHARD = 64   # num_shards=0: about this many videos per shard
MARKERS = ".shards"     # out_dir/.shards/GGGGG-of-TTTTT.json: the finished shards
PARTIAL = ".partial"    # out_dir/.partial: shards being written
METADATA = "metadata.json"


def shard_name(kind: str, shard: int, num_shards: int) -> str:
  """The file name of shard `shard` of `kind` ("clips" or "episodes")."""
  return os.path.basename(records.shard_paths(kind, num_shards)[shard])


def process_shards(num_shards: int, num_processes: int, process_index: int) -> list[int]:
  """The shards process `process_index` records: g with g % num_processes ==
  process_index. ValueError for a process index out of range or a shard
  count that is not a multiple of the process count."""
  if num_processes < 1 or not 0 <= process_index < num_processes:
    raise ValueError(f"--process_index={process_index} must be in [0, --num_processes="
                     f"{num_processes})")
  if num_shards % num_processes:
    raise ValueError(f"--num_shards={num_shards} must be a multiple of --num_processes="
                     f"{num_processes} (each process records whole shards)")
  return list(range(process_index, num_shards, num_processes))


def _read_markers(out_dir: str) -> dict[int, dict]:
  markers = {}
  for path in sorted(glob.glob(os.path.join(out_dir, MARKERS, "*.json"))):
    try:
      with open(path) as f:
        marker = json.load(f)
      if all(os.path.isfile(os.path.join(out_dir, n)) for n in marker["files"].values()):
        markers[int(marker["shard"])] = marker  # else its records were deleted: redo it
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
      continue  # a marker cut short: its shard is recorded again
  return markers


def _write_json(path: str, value: Any) -> None:
  """Writes `value` to `path` atomically (a reader sees the old or the new file)."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=2)
  os.replace(tmp, path)


def _caption_embedding(text_encoder, caption: str, text_len: int) -> np.ndarray:
  """float32 [n, D]: the caption's unpadded token embeddings."""
  emb, mask = text_encoder.encode([caption], text_len)  # [1, L, D], [1, L]
  emb, mask = np.asarray(emb, np.float32)[0], np.asarray(mask, bool)[0]
  return np.ascontiguousarray(emb[mask])


def prepare_videos(out_dir: str, *, src: str, size: int | tuple[int, int] = 64,
                   fps: float = 16.0, clip_frames: int = 16, clip_stride: int | None = None,
                   max_video_frames: int = 0, num_shards: int = 0, num_processes: int = 1,
                   process_index: int = 0, text_encoder=None, text_encoder_name: str = "",
                   text_len: int = 512, overwrite: bool = False,
                   progress: bool = True) -> dict[str, Any]:
  """Records this process's shards of the videos under `src` into `out_dir`
  (module docstring); returns the summary: metadata.json's content when
  every shard is finished (``complete`` True), else this process's view so
  far (``complete`` False, ``pending_shards``: the shards still missing).

  `max_video_frames` > 0 bounds the memory a long video takes: it is
  recorded in consecutive parts of that many frames (each an ``episodes``
  record whose ``start`` is its first frame in the video, with the clips
  that fit in it); a last part shorter than `clip_frames` is left out.
  `num_shards` 0 = the shard count of an earlier run into `out_dir`, else
  about one shard per `VIDEOS_PER_SHARD` videos (a multiple of
  `num_processes`). `text_encoder`: an object with ``encode(captions,
  max_length) -> (emb [N, L, D], mask [N, L])`` (aapt_jax.convert.umt5's
  TextEncoder), named `text_encoder_name` in the metadata; None = captions as
  text only. `overwrite` deletes the records, markers and metadata already
  in `out_dir` first (with several processes: only in a run before they
  start); otherwise records other than this recording's refuse, as does a
  marker of other settings.
  """
  h, w = (size, size) if isinstance(size, int) else tuple(size)
  for name, value, low in (("size", min(h, w), 1), ("clip_frames", clip_frames, 1),
                           ("num_shards", num_shards, 0), ("text_len", text_len, 1)):
    if int(value) < low:
      raise ValueError(f"--{name} must be >= {low}, got {value}")
  if not fps > 0:
    raise ValueError(f"--fps must be > 0, got {fps}")
  clip_stride = clip_stride or clip_frames
  if clip_stride < 1:
    raise ValueError(f"--clip_stride must be >= 1, got {clip_stride}")
  if max_video_frames and max_video_frames < clip_frames:
    raise ValueError(f"--max_video_frames={max_video_frames} must be 0 (whole videos) or >= "
                     f"--clip_frames={clip_frames}")
  files = videos.list_videos(src)
  if not files:
    raise FileNotFoundError(f"--src={src!r} holds no videos "
                            f"({', '.join(videos.VIDEO_EXTENSIONS)})")
  captions = videos.read_captions(src, files)

  if overwrite:
    clear_output(out_dir)
  markers = _read_markers(out_dir)
  if not num_shards:
    earlier = {m["settings"]["num_shards"] for m in markers.values()}
    num_shards = earlier.pop() if len(earlier) == 1 else num_processes * max(
        1, math.ceil(len(files) / (num_processes * VIDEOS_PER_SHARD)))
  mine = process_shards(num_shards, num_processes, process_index)
  settings = {"files_sha256": hashlib.sha256("\n".join(files).encode()).hexdigest(),
              "size": [h, w], "fps": float(fps), "clip_frames": int(clip_frames),
              "clip_stride": int(clip_stride), "max_video_frames": int(max_video_frames),
              "num_shards": int(num_shards),
              "text_encoder": text_encoder_name if text_encoder is not None else "",
              "text_len": int(text_len) if text_encoder is not None else 0}
  for marker in markers.values():
    if marker.get("settings") != settings:
      changed = [k if k != "files_sha256" else "the list of videos"
                 for k in settings if marker.get("settings", {}).get(k) != settings[k]]
      raise ValueError(f"{out_dir!r} holds shards recorded with other settings (changed: "
                       f"{', '.join(changed)}); pass --overwrite or choose another --out")
  ours = {shard_name(kind, g, num_shards) for g in range(num_shards)
          for kind in ("clips", "episodes")}
  check_output_dir(out_dir, keep=ours)
  os.makedirs(os.path.join(out_dir, MARKERS), exist_ok=True)
  os.makedirs(os.path.join(out_dir, PARTIAL), exist_ok=True)

  todo = [g for g in mine if g not in markers]
  bar = tqdm(total=sum(len(range(g, len(files), num_shards)) for g in todo), unit="video",
             disable=not progress, desc=f"videos {os.path.basename(os.path.abspath(src))}")
  embeddings: dict[str, np.ndarray] = {}  # caption -> embedding (captions repeat)
  for g in todo:
    counts = {"videos": 0, "video_frames": 0, "clips": 0, "clip_frames": 0}
    skipped: list[dict[str, str]] = []
    names = {kind: shard_name(kind, g, num_shards) for kind in ("clips", "episodes")}
    partial = {kind: os.path.join(out_dir, PARTIAL, n) for kind, n in names.items()}
    with records.RecordWriter(partial["clips"]) as clips_w, \
         records.RecordWriter(partial["episodes"]) as episodes_w:
      for i in range(g, len(files), num_shards):
        _record_video(clips_w, episodes_w, src, files[i], i, captions[files[i]], counts,
                      skipped, size=(h, w), fps=fps, clip_frames=clip_frames,
                      clip_stride=clip_stride, max_video_frames=max_video_frames,
                      text_encoder=text_encoder, text_len=text_len, embeddings=embeddings)
        bar.update(1)
        bar.set_postfix(shard=f"{g + 1}/{num_shards}", clips=counts["clips"],
                        skipped=len(skipped))
    for kind in ("clips", "episodes"):
      os.replace(partial[kind], os.path.join(out_dir, names[kind]))
    markers[g] = {"shard": g, "settings": settings, "counts": counts, "skipped": skipped,
                  "files": names}
    _write_json(os.path.join(out_dir, MARKERS, f"{g:05d}-of-{num_shards:05d}.json"), markers[g])
  bar.close()

  return _summarize(out_dir, src, settings)


def clear_output(out_dir: str) -> None:
  """Deletes what a recording left in `out_dir`: records, markers, the
  shards in progress and metadata.json."""
  for path in (os.path.join(out_dir, MARKERS), os.path.join(out_dir, PARTIAL)):
    shutil.rmtree(path, ignore_errors=True)
  for path in (glob.glob(os.path.join(out_dir, "clips-*" + records.SUFFIX)) +
               glob.glob(os.path.join(out_dir, "episodes-*" + records.SUFFIX)) +
               [os.path.join(out_dir, METADATA)]):
    if os.path.exists(path):
      os.remove(path)


def _summarize(out_dir: str, src: str, settings: dict[str, Any]) -> dict[str, Any]:
  """The summary of the shards finished so far (by any process); writes it as
  metadata.json when every shard is."""
  markers = _read_markers(out_dir)
  num_shards = settings["num_shards"]
  summary = {
      "world": WORLD, "game": "", "src": os.path.abspath(src), "num_actions": 0,
      "action_names": [], "control_dim": 0, "size": settings["size"], "fps": settings["fps"],
      "clip_frames": settings["clip_frames"], "clip_stride": settings["clip_stride"],
      "max_video_frames": settings["max_video_frames"] or None, "num_shards": num_shards,
      "text_encoder": settings["text_encoder"] or None,
      "text_len": settings["text_len"] or None, "text_dim": None,
      "record_format": records.FORMAT,
      "counts": {k: sum(m["counts"][k] for m in markers.values())
                 for k in ("videos", "video_frames", "clips", "clip_frames")},
      "files": {kind: [markers[g]["files"][kind] for g in sorted(markers)]
                for kind in ("clips", "episodes")},
      "skipped": [s for g in sorted(markers) for s in markers[g]["skipped"]],
  }
  summary["skipped"].sort(key=lambda s: s["file"])
  pending = [g for g in range(num_shards) if g not in markers]
  if pending:
    return dict(summary, complete=False, pending_shards=pending)
  if settings["text_encoder"]:
    summary["text_dim"] = _text_dim(out_dir, summary["files"]["clips"])
  summary["complete"] = True
  shutil.rmtree(os.path.join(out_dir, PARTIAL), ignore_errors=True)
  _write_json(os.path.join(out_dir, METADATA), summary)
  return summary


def _worker(kwargs: dict[str, Any], text_encoder_dir: str) -> None:
  """One local worker of `prepare_videos_in_workers` (a spawned process)."""
  text_encoder = None
  if text_encoder_dir:
    from aapt_jax.convert.umt5 import TextEncoder  # each worker holds its own
    text_encoder = TextEncoder.load(text_encoder_dir)
  prepare_videos(**kwargs, text_encoder=text_encoder)


def prepare_videos_in_workers(out_dir: str, *, workers: int, num_processes: int = 1,
                              process_index: int = 0, text_encoder_dir: str = "",
                              progress: bool = True, **kwargs) -> dict[str, Any]:
  """`prepare_videos` by `workers` local processes: this machine, process
  `process_index` of `num_processes`, runs workers that each record as
  process ``process_index * workers + i`` of ``num_processes * workers``, so
  the shards (and the resume) are those of that many processes. Each worker
  loads the text encoder from `text_encoder_dir` itself ("" = none). Returns
  the summary, as `prepare_videos` does; a worker's error is raised here."""
  import concurrent.futures
  import multiprocessing
  if workers < 1:
    raise ValueError(f"--workers must be >= 1, got {workers}")
  total = num_processes * workers
  if not 0 <= process_index < num_processes:
    raise ValueError(f"--process_index={process_index} must be in [0, --num_processes="
                     f"{num_processes})")
  name = os.path.abspath(text_encoder_dir) if text_encoder_dir else ""
  if kwargs.pop("overwrite", False):
    clear_output(out_dir)  # once, before the workers start
  jobs = [dict(kwargs, out_dir=out_dir, num_processes=total, text_encoder_name=name,
               process_index=process_index * workers + i, progress=progress and i == 0)
          for i in range(workers)]
  context = multiprocessing.get_context("spawn")  # no fork of a threaded parent
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
    futures = [pool.submit(_worker, job, text_encoder_dir) for job in jobs]
    try:
      for future in futures:
        future.result()
    except BaseException:
      pool.shutdown(wait=True, cancel_futures=True)
      raise
  markers = _read_markers(out_dir)  # every worker finished its shards
  return _summarize(out_dir, kwargs["src"], next(iter(markers.values()))["settings"])


def _record_video(clips_w, episodes_w, src: str, file: str, index: int, caption: str,
                  counts: dict[str, int], skipped: list[dict[str, str]], *, size, fps,
                  clip_frames, clip_stride, max_video_frames, text_encoder, text_len,
                  embeddings) -> None:
  """Writes one video (whole, or in parts of `max_video_frames`, and the
  clips of each), adding to `counts`, or adds to `skipped` why it could not
  be used."""
  base = {"fps": float(fps), "world": WORLD, "game": "", "file": file, "episode": index,
          "text": caption}
  offset, part = 0, []

  def write_part():
    nonlocal offset, part
    if text_encoder is not None and "text_embedding" not in base:
      if caption not in embeddings:
        embeddings[caption] = _caption_embedding(text_encoder, caption, text_len)
      base["text_embedding"] = embeddings[caption]
    written, problems = write_episode(
        clips_w, episodes_w, dict(base, video=np.stack(part), start=offset),
        clip_frames=clip_frames, clip_stride=clip_stride, label=file, offset=offset)
    for key in ("clips", "clip_frames"):
      counts[key] += written[key]
    counts["videos"] += written["episodes"] if offset == 0 else 0
    counts["video_frames"] += written["episode_frames"]
    skipped.extend({"file": file, "reason": p} for p in problems)
    offset, part = offset + len(part), []

  try:
    for frame in videos.read_frames(os.path.join(src, file), fps=fps, size=size):
      part.append(frame)
      if len(part) == max_video_frames:
        write_part()
  except Exception as e:  # noqa: BLE001 - one bad file must not stop the run
    reason = str(e) if isinstance(e, videos.UnreadableVideo) else \
        f"cannot decode: {type(e).__name__}: {e}"
    kept = f" (its first {offset} frames are recorded)" if offset else ""
    skipped.append({"file": file, "reason": reason + kept})
    return
  if offset + len(part) < clip_frames:
    skipped.append({"file": file, "reason": f"too short: {offset + len(part)} frames at "
                    f"{fps:g} fps < clip_frames={clip_frames}"})
  elif len(part) >= clip_frames:  # a last part too short for a clip is left out
    write_part()


def _text_dim(out_dir: str, clip_files: Sequence[str]) -> int | None:
  """D of the records' text_embedding (None when no clip was written)."""
  for name in clip_files:
    source = records.RecordSource(os.path.join(out_dir, name))
    if len(source):
      return int(source[0]["text_embedding"].shape[1])
  return None


def format_summary(summary: dict[str, Any], out_dir: str) -> str:
  """The summary printed at the end of a recording: counts, where, and every
  skipped file with its reason."""
  c = summary["counts"]
  lines = [f"videos from {summary['src']}: wrote {c['clips']} clips ({c['clip_frames']} "
           f"frames) to {os.path.join(out_dir, 'clips-*')} and {c['videos']} whole videos "
           f"({c['video_frames']} frames) to {os.path.join(out_dir, 'episodes-*')}"
           + ("; metadata.json written." if summary["complete"] else
              f"; {len(summary['pending_shards'])} of {summary['num_shards']} shards are "
              "still to be recorded (by other processes, or rerun this command): "
              "metadata.json is written when all are."),
           f"skipped {len(summary['skipped'])} video(s)" + (":" if summary["skipped"] else ".")]
  lines += [f"  - {s['file']}: {s['reason']}" for s in summary["skipped"]]
  return "\n".join(lines)
