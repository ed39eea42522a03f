"""Data: records (schema + ArrayRecord I/O), the grain pipeline, worlds and
data preparation.

Modules (imported explicitly, so `records` and `worlds` load without JAX):
  records   example schema, serialisation, `write_records`, `RecordSource`
  pipeline  grain `make_dataset`, `make_iterator`, `make_global_batch`,
            `pixels_to_latents` / `latents_to_pixels`
  prepare_tfds  `prepare_tfds`: a TFDS dataset (RLDS episodes) -> the records
            `prepare` makes, without TensorFlow
  prepare   `prepare_world`: a world -> clips + episodes + metadata.json
  prepare_videos  `prepare_videos`: a folder of videos -> the same, in resumable
            shards split over processes, with captions (and text embeddings)
  encode    `encode_records`: pixel records -> a VAE's latent records
  worlds    simulators producing (frames, actions), by name: `worlds.make_world`;
            worlds/videos.py reads a folder of video files
"""
