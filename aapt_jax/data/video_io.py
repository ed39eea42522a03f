"""Reading and writing video files with PyAV (H.264 in mp4)."""
from __future__ import annotations

import os
from collections.abc import Iterable

import av
import numpy as np


class VideoWriter:
  """Writes uint8 [H, W, 3] frames to an H.264 mp4, frame by frame (constant memory)."""

  def __init__(self, path: str, fps: float, size: tuple[int, int], crf: int = 18):
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
      raise FileNotFoundError(f"cannot write {path}: directory {parent} does not exist")
    self.path = path
    self.height, self.width = size
    if self.height % 2 or self.width % 2:
      raise ValueError(f"H.264 needs even frame sizes, got {size}")
    self._container = av.open(path, mode="w")
    self._stream = self._container.add_stream("libx264", rate=int(round(fps)))
    self._stream.width, self._stream.height = self.width, self.height
    self._stream.pix_fmt = "yuv420p"
    self._stream.options = {"crf": str(crf)}
    self.frames_written = 0

  def write(self, frame: np.ndarray) -> None:
    frame = np.asarray(frame)
    if frame.shape != (self.height, self.width, 3) or frame.dtype != np.uint8:
      raise ValueError(f"frame must be uint8 [{self.height}, {self.width}, 3], "
                       f"got {frame.dtype} {frame.shape}")
    for packet in self._stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
      self._container.mux(packet)
    self.frames_written += 1

  def close(self) -> None:
    for packet in self._stream.encode():
      self._container.mux(packet)
    self._container.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def write_video(path: str, frames: Iterable[np.ndarray], fps: float) -> int:
  """Writes all frames; returns how many."""
  frames = iter(frames)
  first = np.asarray(next(frames))
  with VideoWriter(path, fps, first.shape[:2]) as w:
    w.write(first)
    for f in frames:
      w.write(f)
    return w.frames_written


def read_video(path: str) -> np.ndarray:
  """All frames of a video file as uint8 [T, H, W, 3]."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"video not found: {path}")
  with av.open(path) as container:
    return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
