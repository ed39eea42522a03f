"""The grain input pipeline: records -> per-process batches -> global arrays.

``make_dataset`` builds a deterministic, seeded ``grain.MapDataset``::

    source -> tag record index -> shuffle(seed) -> shard by process
           -> random clip crop (seeded) -> to model inputs
           -> batch(per-process batch size, drop_remainder) -> repeat(num_epochs)

``repeat`` reseeds the upstream shuffle and crops every epoch (grain's
``reseed_each_epoch``), so each epoch has a new order and new crops, yet the
whole stream is a pure function of ``seed``. Shuffling before sharding means
a process sees different records each epoch while the shards of one epoch
stay disjoint and (up to the ``len % process_count`` records dropped to keep
shards equal) cover the data. ``make_iterator`` gives a grain
``DatasetIterator`` whose ``get_state()``/``set_state()`` the checkpoint
saves and restores (a small JSON-able dict per process).

Batches are dicts of numpy arrays: ``latents`` float32 ``[B, T, h, w, C]``,
and when the records have them ``actions`` int32 ``[B, T]``, ``controls``
float32 ``[B, T, A]``, ``text_embedding`` float32 ``[B, L, D]`` with
``text_mask`` bool ``[B, L]`` (when ``text_len`` is set). ``make_global_batch``
turns them into global ``jax.Array``s sharded on the batch axis.

A pixel-space config (``data.space_to_depth`` > 0, the Atari default) reads
video records: `pixels_to_latents` (space-to-depth, lossless) turns uint8
video into its "latents". A VAE-latent config (``data.space_to_depth`` = 0)
reads records that data/encode.py wrote in a trained VAE's latents.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np

from aapt_jax.data import records

_INDEX = "__record_index__"


# ----------------------------------------------------------------------------
# Pixel-space "latents".


def pixels_to_latents(frames: np.ndarray, space_to_depth: int = 4) -> np.ndarray:
  """uint8 ``[..., H, W, 3]`` -> float32 ``[..., H/s, W/s, 3*s*s]`` in [-1, 1].

  Values: ``x / 127.5 - 1``. Channel order: channel ``(dy * s + dx) * 3 + c``
  of latent pixel (i, j) is colour c of pixel ``(i*s + dy, j*s + dx)``
  (i.e. ``[..., h, s, w, s, 3] -> [..., h, w, s(dy), s(dx), 3]`` flattened).
  Lossless: `latents_to_pixels` inverts it exactly.
  """
  frames = np.asarray(frames)
  if frames.dtype != np.uint8:
    raise ValueError(f"pixels_to_latents: frames must be uint8, got {frames.dtype}")
  s = int(space_to_depth)
  *lead, H, W, C = frames.shape
  if s < 1 or H % s or W % s:
    raise ValueError(f"pixels_to_latents: frame size {H}x{W} is not divisible by "
                     f"space_to_depth={s}")
  n = len(lead)
  x = frames.reshape(*lead, H // s, s, W // s, s, C)
  x = x.transpose(*range(n), n, n + 2, n + 1, n + 3, n + 4)
  x = x.reshape(*lead, H // s, W // s, s * s * C)
  return x.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def latents_to_pixels(latents: np.ndarray, space_to_depth: int = 4) -> np.ndarray:
  """Inverse of `pixels_to_latents`: ``[..., h, w, 3*s*s]`` -> uint8
  ``[..., h*s, w*s, 3]`` (values rounded and clipped to [0, 255])."""
  latents = np.asarray(latents, dtype=np.float32)
  s = int(space_to_depth)
  *lead, h, w, Cs = latents.shape
  if s < 1 or Cs % (s * s):
    raise ValueError(f"latents_to_pixels: {Cs} channels is not divisible by "
                     f"space_to_depth**2={s * s}")
  C, n = Cs // (s * s), len(lead)
  x = latents.reshape(*lead, h, w, s, s, C)
  x = x.transpose(*range(n), n, n + 2, n + 1, n + 3, n + 4)
  x = x.reshape(*lead, h * s, w * s, C)
  return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------
# Per-example transforms.


def _where(example: Mapping[str, Any], source: Any) -> str:
  index = example.get(_INDEX)
  if index is None:
    return "record"
  index %= len(source)  # indices count on across epochs
  if hasattr(source, "locate"):
    path, pos = source.locate(index)
    return f"{path}[{pos}]"
  return f"record {index}"


def crop_clip(example: Mapping[str, Any], rng: np.random.Generator,
              clip_frames: int, where: str = "record") -> dict[str, Any]:
  """A random window of `clip_frames` latent frames of `example` (uniform
  start drawn from `rng`), with its actions/controls cut to match.

  With ``sink_latents`` (VAE-latent records, data/encode.py) the window's
  latent 0 is the image latent of its start: the clip begins as inference
  does, from one frame encoded alone, not from a latent of r frames.
  """
  if "latents" in example:
    key = "latents"
  elif int(example.get("temporal_factor", 1)) == 1:
    key = "video"
  else:
    raise ValueError(f"{where}: field 'latents': missing; a video with "
                     f"temporal_factor {example['temporal_factor']} must be "
                     "encoded with the VAE before training")
  frames = example[key]
  T = frames.shape[0]
  if T < clip_frames:
    raise ValueError(f"{where}: field {key!r}: {T} frames < clip_frames="
                     f"{clip_frames}; drop short records or lower clip_frames")
  start = int(rng.integers(0, T - clip_frames + 1))
  out = {key: frames[start:start + clip_frames]}
  if key == "latents" and "sink_latents" in example:
    out[key] = np.concatenate([example["sink_latents"][start:start + 1].astype(frames.dtype),
                               out[key][1:]])
  for k in ("actions", "controls"):
    if k in example:
      v = example[k]
      if v.shape[0] != T:
        raise ValueError(f"{where}: field {k!r}: length {v.shape[0]} != {T} "
                         f"frames of {key!r}")
      out[k] = v[start:start + clip_frames]
  for k in ("text_embedding",):
    if k in example:
      out[k] = example[k]
  return out


def to_model_inputs(example: Mapping[str, Any], *, space_to_depth: int = 4,
                    latent_stats: tuple[Any, Any] | None = None,
                    text_len: int | None = None, pixels: bool = False) -> dict[str, np.ndarray]:
  """A cropped example -> the arrays of one batch row (see module docstring).

  `latent_stats` = (mean, std) per channel normalises stored VAE latents
  (pixel-space latents are already in [-1, 1] and are not normalised).
  `text_len` pads/truncates `text_embedding` to L tokens and adds `text_mask`.
  `pixels` keeps the uint8 ``video`` [T, H, W, 3] as is (the VAE's input).
  """
  if pixels:
    if "video" not in example:
      raise ValueError("the records hold no 'video' field: the VAE trains on pixels")
    return {"video": np.asarray(example["video"], np.uint8)}
  if "latents" in example:
    latents = np.asarray(example["latents"], np.float32)
    if latent_stats is not None:
      mean, std = (np.asarray(v, np.float32) for v in latent_stats)
      latents = (latents - mean) / std
  else:
    latents = pixels_to_latents(example["video"], space_to_depth)
  out = {"latents": latents}
  if "actions" in example:
    out["actions"] = np.asarray(example["actions"], np.int32)
  if "controls" in example:
    out["controls"] = np.asarray(example["controls"], np.float32)
  if text_len is not None and "text_embedding" in example:
    emb = np.asarray(example["text_embedding"], np.float32)[:text_len]
    padded = np.zeros((text_len, emb.shape[1]), np.float32)
    padded[: emb.shape[0]] = emb
    out["text_embedding"] = padded
    out["text_mask"] = np.arange(text_len) < emb.shape[0]
  return out


# ----------------------------------------------------------------------------
# Datasets.


def shard_for_process(ds: grain.MapDataset, process_index: int,
                      process_count: int) -> grain.MapDataset:
  """Records ``process_index, process_index + n, ...`` of `ds`, after dropping
  the last ``len(ds) % n`` so every process has the same number."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  usable = (len(ds) // process_count) * process_count
  if usable == 0:
    raise ValueError(f"{len(ds)} records cannot be split over {process_count} "
                     "processes")
  return ds[:usable][process_index::process_count]


def per_process_batch_size(global_batch_size: int,
                           process_count: int | None = None) -> int:
  """`global_batch_size / process_count`, ValueError if it does not divide."""
  n = jax.process_count() if process_count is None else process_count
  if global_batch_size % n:
    raise ValueError(f"train.batch_size={global_batch_size} is not divisible by "
                     f"the {n} processes; use a multiple of {n}")
  return global_batch_size // n


def make_dataset(source: Any, *, clip_frames: int, batch_size: int, seed: int = 0,
                 shuffle: bool = True, num_epochs: int | None = None,
                 process_index: int | None = None, process_count: int | None = None,
                 space_to_depth: int = 4, latent_stats: tuple[Any, Any] | None = None,
                 text_len: int | None = None, pixels: bool = False) -> grain.MapDataset:
  """The training dataset of per-process batches (see module docstring).

  Args:
    source: a `records.RecordSource`, a path/glob/directory/list of ArrayRecord
      files, or any random-access sequence of example dicts.
    clip_frames: latent frames T per training clip.
    batch_size: the *per-process* batch size B (`per_process_batch_size`).
    seed: seeds the shuffle and the crops.
    num_epochs: None repeats forever.
    process_index, process_count: default `jax.process_index()/count()`.
    pixels: batches of uint8 ``video`` [B, T, H, W, 3] (stage "vae").
  """
  if clip_frames < 1 or batch_size < 1:
    raise ValueError(f"clip_frames ({clip_frames}) and batch_size ({batch_size}) "
                     "must be >= 1")
  if isinstance(source, (str, bytes)) or (
      isinstance(source, Sequence) and source and isinstance(source[0], str)):
    source = records.RecordSource(source)
  if len(source) == 0:
    raise ValueError("the data source is empty")
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  seed = int(seed) % 2**32

  ds = grain.MapDataset.source(source)
  ds = ds.map_with_index(lambda i, ex: {**ex, _INDEX: i})
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = shard_for_process(ds, pi, pc)

  def crop(example, rng):
    return crop_clip(example, rng, clip_frames, where=_where(example, source))

  ds = ds.random_map(crop, seed=(seed + 0x9E3779B9) % 2**32)
  ds = ds.map(lambda ex: to_model_inputs(ex, space_to_depth=space_to_depth,
                                         latent_stats=latent_stats,
                                         text_len=text_len, pixels=pixels))
  if len(ds) < batch_size:
    raise ValueError(f"{len(ds)} records per process < batch_size={batch_size}")
  ds = ds.batch(batch_size, drop_remainder=True)
  return ds.repeat(num_epochs)


def make_adversarial_dataset(clip_source: Any, episode_source: Any, *, segment_frames: int,
                             rollout_frames: int, batch_size: int, seed: int = 0,
                             process_index: int | None = None,
                             process_count: int | None = None, space_to_depth: int = 4,
                             latent_stats: tuple[Any, Any] | None = None,
                             text_len: int | None = None,
                             rollout_targets: bool = False) -> grain.MapDataset:
  """Stage 3's per-process batches: `make_dataset`'s real clips of
  `segment_frames` (what each fake segment is paired with) plus, per row, a
  rollout drawn from a long episode: ``rollout_first`` ``[B, h, w, C]`` (a real
  start frame) and the episode's conditions of the `rollout_frames` frames
  from it, as the real clips carry theirs: ``rollout_actions`` ``[B, L]``,
  ``rollout_controls`` ``[B, L, A]`` (when the episodes have them),
  ``rollout_text_embedding`` ``[B, text_len, D]`` and ``rollout_text_mask``
  ``[B, text_len]`` (with `text_len`; one per sample, for all its frames).
  With `rollout_targets`, also the window's real frames ``rollout_latents``
  ``[B, L, h, w, C]``: what the world made under the same conditions from the
  same start (`adversarial.rollout_mse_weight`).

  The episode and its window are drawn from the row's own seeded rng, so the
  stream stays a pure function of `seed` and one grain iterator state.
  """
  if rollout_frames < 2:
    raise ValueError(f"rollout_frames must be >= 2, got {rollout_frames}")
  if isinstance(episode_source, (str, bytes)) or (
      isinstance(episode_source, Sequence) and episode_source
      and isinstance(episode_source[0], str)):
    episode_source = records.RecordSource(episode_source)
  if len(episode_source) == 0:
    raise ValueError("the episode source (rollout start frames and actions) is empty")
  clips = make_dataset(clip_source, clip_frames=segment_frames, batch_size=1, seed=seed,
                       process_index=process_index, process_count=process_count,
                       space_to_depth=space_to_depth, latent_stats=latent_stats,
                       text_len=text_len, num_epochs=1)
  clips = clips.map(lambda b: {k: v[0] for k, v in b.items()})  # unbatch

  def add_rollout(row, rng):
    j = int(rng.integers(len(episode_source)))
    episode = episode_source[j]
    window = crop_clip(episode, rng, rollout_frames, where=_where(episode, episode_source))
    inputs = to_model_inputs({k: v if rollout_targets or k not in ("latents", "video")
                              else v[:1] for k, v in window.items()},
                             space_to_depth=space_to_depth, latent_stats=latent_stats,
                             text_len=text_len)
    out = {**row, "rollout_first": inputs["latents"][0]}
    if rollout_targets:
      out["rollout_latents"] = inputs["latents"]
    for key in ("actions", "controls", "text_embedding", "text_mask"):
      if key in inputs:
        out["rollout_" + key] = inputs[key]
    return out

  ds = clips.random_map(add_rollout, seed=(int(seed) + 0x7F4A7C15) % 2**32)
  if len(ds) < batch_size:
    raise ValueError(f"{len(ds)} records per process < batch_size={batch_size}")
  return ds.batch(batch_size, drop_remainder=True).repeat(None)


def make_iterator(ds: grain.MapDataset, *, num_threads: int = 2,
                  prefetch_buffer_size: int = 4) -> grain.DatasetIterator:
  """A checkpointable iterator (`get_state()` / `set_state(state)`)."""
  options = grain.ReadOptions(num_threads=num_threads,
                              prefetch_buffer_size=prefetch_buffer_size)
  return iter(ds.to_iter_dataset(options))


# ----------------------------------------------------------------------------
# Global arrays.


def make_global_batch(batch: Mapping[str, np.ndarray],
                      sharding: jax.sharding.Sharding | Mapping[str, jax.sharding.Sharding],
                      ) -> dict[str, jax.Array]:
  """Per-process numpy batch -> global `jax.Array`s (batch axis sharded).

  Each process passes its own rows; the global batch is the processes' rows
  in process order, of leading size `B * process_count`.
  """
  out = {}
  for key, value in batch.items():
    sh = sharding[key] if isinstance(sharding, Mapping) else sharding
    out[key] = jax.make_array_from_process_local_data(sh, np.asarray(value))
  return out
