"""Data preparation: a TFDS dataset (RLDS episodes in particular) -> the
records a world's episodes make (data/prepare.py), without TensorFlow.

    prepare_tfds("data/bridge", name="bridge", data_dir="~/tensorflow_datasets",
                 split="train[:1000]", size=64, clip_frames=16, fps=5.0)

writes ``clips-*`` and ``episodes-*`` (each episode of the split whole, and
cut into clips, by `prepare.write_episode`) and ``metadata.json``: the
world's fields (world "tfds", game = the dataset's name, num_actions,
action_names, control_dim, control_names, size, fps, counts, files,
skipped) plus ``tfds`` (name, version, data_dir, split and the feature paths
read) and ``action_kind``: "ids" (the actions became action ids),
"controls" (float vectors) or None. How features are read, converted and
aligned: `worlds.tfds_world`.
"""
from __future__ import annotations

import os
from typing import Any

from tqdm import tqdm

from aapt_jax.data import records
from aapt_jax.data.prepare import check_output_dir, write_episode, write_metadata
from aapt_jax.data.worlds import tfds_world


def prepare_tfds(out_dir: str, *, name: str, data_dir: str = "", split: str = "train",
                 video: str | None = None, action: str | None = None,
                 caption: str | None = None, action_shift: int = 1,
                 frames_per_episode: int | None = None, clip_frames: int = 16,
                 clip_stride: int | None = None, size: int | tuple[int, int] = 64,
                 fps: float = 10.0,
                 num_shards: int = 1, overwrite: bool = False,
                 progress: bool = True) -> dict[str, Any]:
  """Records every episode of the TFDS dataset `name`'s `split` (tfds'
  slicing picks fewer: "train[:100]") in `out_dir`; returns the summary (also
  in metadata.json).

  `video`, `action`, `caption` are feature paths (None: RLDS's
  ``steps/observation/image``, ``steps/action`` and, where the dataset has
  it, ``steps/language_instruction``; "" for action or caption: none). Frames
  are `size` x `size`, or (h, w) for a tuple. Episode
  k of the split is record field ``episode`` k. Frames are kept as the
  dataset has them (at most `frames_per_episode` per episode; no
  resampling): `fps` is their rate, recorded in every example. Every error a
  user can cause is a ValueError naming its flag, raised before anything is
  written; an episode that cannot be read is skipped with its reason.
  """
  hw = (size, size) if isinstance(size, int) else tuple(size)   # square, or (h, w)
  for flag, value in (("clip_frames", clip_frames), ("size", min(hw)),
                      ("num_shards", num_shards), ("clip_stride", clip_stride or 1)):
    if int(value) < 1:
      raise ValueError(f"--{flag} must be >= 1, got {value}")
  clip_stride = clip_stride or clip_frames
  if not fps > 0:
    raise ValueError(f"--tfds_fps must be > 0, got {fps}")
  if not name:
    raise ValueError("--tfds_name: name the dataset, e.g. --tfds_name=bridge")
  reader = tfds_world.TfdsEpisodes(
      name, data_dir=data_dir, split=split,
      video=tfds_world.RLDS_VIDEO if video is None else video,
      action=tfds_world.RLDS_ACTION if action is None else action, caption=caption,
      size=hw, action_shift=action_shift, max_frames=frames_per_episode or None)
  check_output_dir(out_dir, overwrite)

  base = {"world": "tfds", "game": name, "fps": float(fps)}
  skipped: list[str] = []
  counts = {"episodes": 0, "episode_frames": 0, "clips": 0, "clip_frames": 0}
  bar = tqdm(total=len(reader), unit="episode", disable=not progress, desc=f"tfds/{name}")
  with records.RecordWriter(os.path.join(out_dir, "clips"), num_shards) as clips_w, \
       records.RecordWriter(os.path.join(out_dir, "episodes"), num_shards) as eps_w:
    for k in range(len(reader)):
      try:
        episode = dict(base, **reader.episode(k), episode=k, start=0)
      except ValueError as e:
        skipped.append(f"episode {k}: {e}")
      else:
        written, problems = write_episode(clips_w, eps_w, episode, clip_frames=clip_frames,
                                          clip_stride=clip_stride, label=f"episode {k}")
        for key, n in written.items():
          counts[key] += n
        skipped.extend(problems)
      bar.update(1)
      bar.set_postfix(frames=counts["episode_frames"], clips=counts["clips"])
  bar.close()

  num_actions, action_names = reader.names()
  summary = {
      "world": "tfds", "game": name, "tfds": reader.describe(),
      "action_kind": reader.action_kind, "num_actions": num_actions,
      "action_names": action_names, "control_dim": reader.control_dim,
      **({"control_names": reader.control_names} if reader.control_dim else {}),
      "size": list(hw), "fps": float(fps), "clip_frames": clip_frames,
      "clip_stride": clip_stride, "frames_per_episode": frames_per_episode or None,
  }
  return write_metadata(out_dir, summary, counts, skipped, clips_w, eps_w)
