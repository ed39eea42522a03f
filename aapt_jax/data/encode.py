"""Pixel records -> VAE-latent records: what a VAE-latent DiT trains on.

    encode_records("data/pong_pixels", "data/pong", vae_checkpoint="runs/vae")

reads the ``clips-*`` and ``episodes-*`` of a prepared pixel dataset
(data/prepare.py) and writes the same files under `out_dir` with ``latents``
(float32 ``[T', h, w, z]``, the encoder's raw mean: the trainer normalises
them with ``vae.latents_mean/latents_std``) in place of ``video``, plus
``temporal_factor`` r and ``actions`` per latent frame, and a metadata.json
that adds the VAE checkpoint and the latents' measured per-channel mean and
std (the values to put in ``vae.latents_mean/latents_std``; for a Wan2.1 VAE
folder also ``vae_latents_mean/std``, its own, which a Wan DiT expects); its
``counts`` and ``skipped`` add the latent records' to the pixel dataset's.

* A record of T video frames keeps its first 1 + k*r frames (k as large as
  fits): the encoder needs T = 1 + k*r, and a frame is never silently
  resampled. Latent frame 0 is video frame 0; latent frame j >= 1 covers
  video frames 1 + r(j-1) .. rj.
* Actions per latent frame: latent frame j >= 1 takes the action of its first
  video frame, actions[1 + r(j-1)] -- what generation does, holding one
  action for a latent frame's r video frames. ``controls`` likewise.
* The encoder is causal, so an episode is encoded padded at the end to a
  length bucket (one compile per bucket, not per episode length) and the
  padding's latents dropped: exactly the unpadded encoding.
* ``sink_latents`` ``[T', h, w, z]``: latent frame j's last video frame (r·j)
  encoded alone, as a one-frame video. Inference starts from one image so
  encoded; a training clip cropped at latent j takes it as its latent 0 (the
  sink) instead of latent j, which encodes r frames (data/pipeline.py
  crop_clip). For j = 0 it is latent 0 itself.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from aapt_jax.data import records
from aapt_jax.loading import is_wan_vae_folder, load_trained_vae
from aapt_jax.data.prepare import check_output_dir

EPISODE_BUCKET = 128  # latent frames: episodes are padded to a multiple of this
IMAGE_BATCH = 32      # one-frame videos encoded per call (sink_latents)


def latent_actions(actions: np.ndarray, r: int) -> np.ndarray:
  """Actions per video frame [T] (T = 1 + k*r) -> per latent frame [1 + k]
  (controls [T, A] -> [1 + k, A] alike; the dtype is kept)."""
  return np.concatenate([actions[:1], actions[1::r]])


def _trimmed(num_frames: int, r: int) -> int:
  return 1 + (num_frames - 1) // r * r


class _ChannelStats:
  def __init__(self):
    self.n, self.s, self.ss = 0, 0.0, 0.0

  def add(self, latents: np.ndarray) -> None:
    x = latents.reshape(-1, latents.shape[-1]).astype(np.float64)
    self.n, self.s, self.ss = self.n + len(x), self.s + x.sum(0), self.ss + np.square(x).sum(0)

  def result(self) -> tuple[list[float], list[float]]:
    mean = self.s / max(self.n, 1)
    std = np.sqrt(np.maximum(self.ss / max(self.n, 1) - mean ** 2, 1e-12))
    return [round(float(m), 4) for m in mean], [round(float(s), 4) for s in std]


def encode_records(src_dir: str, out_dir: str, *, vae_checkpoint: str, batch_size: int = 8,
                   overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
  """Encodes a pixel dataset's clips and episodes; returns the summary (also
  written to `out_dir`/metadata.json)."""
  src_meta_path = os.path.join(src_dir, "metadata.json")
  if not os.path.isfile(src_meta_path):
    raise FileNotFoundError(f"{src_dir} is not a prepared dataset (no metadata.json); make one "
                            "with launch/prepare_data.py")
  with open(src_meta_path) as f:
    src_meta = json.load(f)
  config, vae, params = load_trained_vae(vae_checkpoint, src_meta.get("size"))
  r, frame_size = vae.spec.temporal_factor, tuple(vae.spec.frame_size)
  if tuple(src_meta.get("size", frame_size)) != frame_size:
    raise ValueError(f"{src_dir} holds {tuple(src_meta['size'])} frames but the VAE of "
                     f"{vae_checkpoint} encodes {frame_size} frames")
  if os.path.abspath(src_dir) == os.path.abspath(out_dir):
    raise ValueError("the latent records need another directory than the pixel ones")
  check_output_dir(out_dir, overwrite)

  @jax.jit
  def encode(p, video):  # uint8 [B, 1 + k*r, H, W, 3] -> raw mean latents [B, 1 + k, h, w, z]
    mean, _ = vae.apply({"params": p}, video.astype(jnp.float32) / 127.5 - 1.0, method="encode")
    return mean

  def encode_images(frames):  # uint8 [N, H, W, 3] -> [N, h, w, z], each frame alone
    n = len(frames)
    size = -(-n // IMAGE_BATCH) * IMAGE_BATCH  # one compiled shape
    padded = np.concatenate([frames, np.repeat(frames[-1:], size - n, 0)])[:, None]
    return np.concatenate([np.asarray(encode(params, jnp.asarray(padded[i:i + IMAGE_BATCH])))
                           for i in range(0, size, IMAGE_BATCH)])[:n, 0]

  stats = _ChannelStats()
  counts = {"clips": 0, "clip_latent_frames": 0, "episodes": 0, "episode_latent_frames": 0}
  skipped: list[str | dict[str, str]] = []  # {"file", "reason"} for a video folder's records
  out_files = {}

  def to_latent_record(example, latents):
    out = {k: v for k, v in example.items() if k not in ("video", "actions", "controls")}
    video = example["video"][:_trimmed(len(example["video"]), r)]
    out.update(latents=np.asarray(latents, np.float32), temporal_factor=r,
               sink_latents=encode_images(video[::r]).astype(np.float32))
    for key in ("actions", "controls"):
      if key in example:
        out[key] = latent_actions(example[key][:_trimmed(len(example["video"]), r)], r)
    return out

  for kind in ("clips", "episodes"):
    paths = records.resolve_paths(os.path.join(src_dir, f"{kind}-*{records.SUFFIX}"))
    source = records.RecordSource(paths)
    bar = tqdm(total=len(source), unit=kind[:-1], disable=not progress, desc=f"encode {kind}")
    with records.RecordWriter(os.path.join(out_dir, kind), len(paths)) as writer:
      pending: list[dict] = []

      def flush():
        video = np.stack([e["video"][:_trimmed(len(e["video"]), r)] for e in pending])
        n = len(pending)
        if n < batch_size:  # one compiled shape for clips
          video = np.concatenate([video, np.repeat(video[-1:], batch_size - n, 0)])
        latents = np.asarray(encode(params, jnp.asarray(video)))[:n]
        for e, lat in zip(pending, latents):
          writer.write(to_latent_record(e, lat), source=f"clip {e.get('episode')}:{e.get('start')}")
          stats.add(lat)
        counts["clips"] += n
        counts["clip_latent_frames"] += n * latents.shape[1]
        pending.clear()

      for i in range(len(source)):
        example = source[i]
        if "video" not in example or len(example["video"]) < 1 + r:
          reason = f"fewer than 1 + r = {1 + r} video frames"
          skipped.append({"file": example["file"], "reason": f"{kind}[{i}]: {reason}"}
                         if "file" in example else f"{kind}[{i}]: {reason}")
        elif kind == "clips":
          if pending and len(example["video"]) != len(pending[0]["video"]):
            flush()
          pending.append(example)
          if len(pending) == batch_size:
            flush()
        else:
          video = example["video"][:_trimmed(len(example["video"]), r)]
          t = 1 + (len(video) - 1) // r
          bucket = -(-t // EPISODE_BUCKET) * EPISODE_BUCKET
          padded = np.concatenate([video, np.repeat(video[-1:], (bucket - t) * r, 0)])
          latents = np.asarray(encode(params, jnp.asarray(padded[None])))[0, :t]
          writer.write(to_latent_record(example, latents), source=f"{kind}[{i}]")
          counts["episodes"] += 1
          counts["episode_latent_frames"] += t
        bar.update(1)
      if pending:
        flush()
      out_files[kind] = [os.path.basename(p) for p in writer.paths]
    bar.close()

  mean, std = stats.result()
  summary = dict(src_meta, record_kind="latents", pixel_source=os.path.abspath(src_dir),
                 vae_checkpoint=os.path.abspath(vae_checkpoint), temporal_factor=r,
                 latent_size=list(vae.spec.latent_size), z_dim=vae.spec.z_dim,
                 latents_mean=mean, latents_std=std,
                 counts={**src_meta.get("counts", {}), **counts}, files=out_files,
                 skipped=src_meta.get("skipped", []) + skipped)
  if is_wan_vae_folder(vae_checkpoint):  # a Wan DiT was trained with the VAE's own statistics
    summary.update(vae_latents_mean=list(config.vae.latents_mean),
                   vae_latents_std=list(config.vae.latents_std))
  with open(os.path.join(out_dir, "metadata.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary


def format_summary(summary: dict[str, Any], out_dir: str) -> str:
  c = summary["counts"]
  if "vae_latents_mean" in summary:  # a Wan VAE: keep the statistics its DiT knows
    stats = ("the Wan VAE's own latent statistics (what Wan's DiT was trained with; "
             "configs/base.py's defaults are Wan2.1's):", summary["vae_latents_mean"],
             summary["vae_latents_std"])
  else:
    stats = ("the measured latent statistics:", summary["latents_mean"],
             summary["latents_std"])
  return (f"encoded {c['clips']} clips ({c['clip_latent_frames']} latent frames) and "
          f"{c['episodes']} episodes ({c['episode_latent_frames']} latent frames) with the VAE "
          f"of {summary['vae_checkpoint']} (r = {summary['temporal_factor']}) into {out_dir}; "
          f"skipped {len(summary['skipped'])}.\n"
          f"train on them with --config.data.path={out_dir} "
          f"--config.vae.checkpoint={summary['vae_checkpoint']} and {stats[0]}\n"
          f"  --config.vae.latents_mean=\"{tuple(stats[1])}\" "
          f"--config.vae.latents_std=\"{tuple(stats[2])}\"")
