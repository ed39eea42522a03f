"""A folder of video files as a world to record: the files, their captions,
and their frames at a fixed rate and size.

    files = list_videos("clips/")                 # ["a.mp4", "sub/b.webm", ...]
    captions = read_captions("clips/", files)     # {"a.mp4": "a red car", ...}
    for frame in read_frames("clips/a.mp4", fps=16, size=(64, 64)): ...

Not a simulator (it is not in `worlds.REGISTRY`: nothing can be played or
replayed); data/prepare_videos.py records it into the same clips + episodes
records a simulated world gives, without actions.

Conventions:

* Files: the extensions of `VIDEO_EXTENSIONS` (any case) anywhere under the
  folder, as paths relative to it with "/" separators, sorted; hidden files
  and folders (".name") are left out.
* Captions: a sidecar ``NAME.txt`` beside ``NAME.mp4`` (its whole text,
  stripped), else the ``caption`` of the line of ``captions.jsonl`` (in the
  folder's root, one ``{"file": ..., "caption": ...}`` per line) whose
  ``file`` is the video's relative path or, when no line names that path, its
  base name. A video without either gets "".
* Frames: decoded one at a time with PyAV (a file is never held in memory
  whole). Output frame k shows the source frame on screen at time k / fps
  (the last one whose presentation time is <= k / fps, counted from the
  first frame): a faster source drops frames, a slower one repeats them, by
  timestamps. The video ends with the last source frame's display interval
  (1 / the stream's average rate). Each kept frame is center-cropped to the
  target aspect ratio, then area-resized (image_utils.center_crop_resize) to `size`.
* A file that cannot be read raises `UnreadableVideo` (a ValueError) with the
  reason: empty, not a video container, no video stream, a decode error.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence

import av
import numpy as np

from aapt_jax.image_utils import center_crop_resize

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv")
CAPTIONS_FILE = "captions.jsonl"


class UnreadableVideo(ValueError):
  """A video file that cannot be decoded; the message is the reason."""


def list_videos(src: str) -> list[str]:
  """The video files under `src` (see the module docstring), sorted relative
  paths; FileNotFoundError if `src` is not a directory."""
  if not os.path.isdir(src):
    raise FileNotFoundError(f"--src={src!r} is not a directory of videos")
  found = []
  for root, dirs, names in os.walk(src):
    dirs[:] = [d for d in dirs if not d.startswith(".")]
    for name in names:
      if not name.startswith(".") and name.lower().endswith(VIDEO_EXTENSIONS):
        found.append(os.path.relpath(os.path.join(root, name), src).replace(os.sep, "/"))
  return sorted(found)


def read_captions(src: str, files: Sequence[str]) -> dict[str, str]:
  """{file: caption} for every file in `files` (relative to `src`; see the
  module docstring). ValueError naming the line for a malformed captions.jsonl."""
  by_path, by_name = {}, {}
  jsonl = os.path.join(src, CAPTIONS_FILE)
  if os.path.isfile(jsonl):
    with open(jsonl, encoding="utf-8") as f:
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          entry = json.loads(line)
          file, caption = entry["file"], entry["caption"]
          if not isinstance(file, str) or not isinstance(caption, str):
            raise TypeError("'file' and 'caption' must be strings")
        except (ValueError, KeyError, TypeError) as e:
          raise ValueError(f"{jsonl} line {n}: expected {{\"file\": ..., \"caption\": ...}} "
                           f"({type(e).__name__}: {e})") from None
        by_path[file.replace(os.sep, "/").lstrip("./")] = caption.strip()
        by_name.setdefault(os.path.basename(file), caption.strip())
  out = {}
  for file in files:
    sidecar = os.path.join(src, os.path.splitext(file)[0] + ".txt")
    if os.path.isfile(sidecar):
      with open(sidecar, encoding="utf-8", errors="replace") as f:
        out[file] = f.read().strip()
    else:
      out[file] = by_path.get(file, by_name.get(os.path.basename(file), ""))
  return out


def read_frames(path: str, *, fps: float, size: tuple[int, int]) -> Iterator[np.ndarray]:
  """The frames of the video at `path` resampled to `fps` and cropped and
  resized to `size` (module docstring), uint8 [h, w, 3] each, one at a time.
  Raises UnreadableVideo (with the reason) for a file that cannot be read."""
  if fps <= 0:
    raise ValueError(f"fps must be > 0, got {fps}")
  try:
    if os.path.getsize(path) == 0:
      raise UnreadableVideo("empty file (0 bytes)")
    container = av.open(path)
  except UnreadableVideo:
    raise
  except (av.FFmpegError, OSError) as e:
    raise UnreadableVideo(f"cannot open: {e.strerror or e}") from None
  with container:
    if not container.streams.video:
      raise UnreadableVideo("no video stream (not a video, or cut short)")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    rate = stream.average_rate or stream.guessed_rate
    frame_duration = float(1 / rate) if rate else 0.0
    step = 1.0 / fps
    eps = 1e-6 * step
    k, t0, t_prev, held, held_pixels, count = 0, None, 0.0, None, None, 0

    def pixels():  # the held frame, converted once however often it is repeated
      nonlocal held_pixels
      if held_pixels is None:
        held_pixels = center_crop_resize(held.to_ndarray(format="rgb24"), size)
      return held_pixels

    try:
      for frame in container.decode(stream):
        t = frame.time if frame.time is not None else count * frame_duration
        count += 1
        t0 = t if t0 is None else t0
        t = max(t - t0, t_prev)  # timestamps never go back
        while held is not None and k * step < t - eps:
          yield pixels()
          k += 1
        held, held_pixels, t_prev = frame, None, t
    except av.FFmpegError as e:
      raise UnreadableVideo(f"decode error after {count} frames: {e.strerror or e}") from None
    if held is None:
      raise UnreadableVideo("no frames could be decoded")
    end = t_prev + frame_duration
    while k * step < end - eps or k == 0:
      yield pixels()
      k += 1
