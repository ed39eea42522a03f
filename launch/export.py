"""Writes an inference export: the EMA generator (+ the VAE) in bf16, its
config and a start frame; no optimizer state, no discriminator.

  python launch/export.py --checkpoint=runs/atari --out=aapt_jax/assets/atari

--checkpoint: a run directory (its last stage's latest step), a stage or step
directory, or another export. The export loads with
`StreamingSession.load(DIR)`, `launch/generate.py --checkpoint=DIR` and
`launch/play.py --checkpoint=DIR`.

A stage-"vae" run exports as a VAE export (float32 VAE params + config, what
`--vae_checkpoint` and `vae.checkpoint` name; aapt_jax/assets/atari_vae is one):

  python launch/export.py --checkpoint=runs/atari_vae --out=aapt_jax/assets/atari_vae
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

config_flags.DEFINE_config_file("config", None, "Optional: checked against the checkpoint's "
                                "own config (an error if the model differs).", lock_config=False)
flags.DEFINE_string("checkpoint", "", "Run, stage, step or export directory.")
flags.DEFINE_integer("sampler_steps", 0, "Forwards per latent frame the export streams with by "
                     "default, stored in its config (diffusion.sampler_steps); 0 = by its "
                     "stage (16 Euler steps for a stage-1 model, else 1).")
flags.DEFINE_string("workdir", "", "Run directory (used when --checkpoint is empty).")
flags.DEFINE_string("out", "", "Export directory to write.")
flags.DEFINE_integer("seed", 0, "Emulator seed of the stored start frame.")
FLAGS = flags.FLAGS


def _is_vae_run(checkpoint: str) -> bool:
  """True for a stage-"vae" run/stage/step directory or VAE export."""
  from aapt_jax.export import export_stage, is_export
  from aapt_jax.checkpointing import read_config
  from aapt_jax.loading import resolve_step_dir
  if is_export(checkpoint):
    return export_stage(checkpoint) == "vae"
  return read_config(resolve_step_dir(checkpoint)).get("stage") == "vae"


def _export_vae(checkpoint: str) -> None:
  from aapt_jax.export import write_vae_export
  from aapt_jax.loading import load_trained_vae
  config, _, params = load_trained_vae(checkpoint)
  meta = write_vae_export(FLAGS.out, config, params, source=os.path.abspath(checkpoint))
  print(f"export: VAE {os.path.abspath(checkpoint)} -> {os.path.abspath(FLAGS.out)} "
        f"({meta['vae_params']:,} params, float32, {meta['bytes'] / 2**20:.1f} MiB)")
  print(f"encode data with it: python launch/prepare_data.py --vae_checkpoint={FLAGS.out} ...")


def main(_):
  logging.set_verbosity(logging.WARNING)
  from aapt_jax.cli import fail
  from aapt_jax.export import write_export
  from aapt_jax.inference.session import StreamingModel
  checkpoint = FLAGS.checkpoint or FLAGS.workdir
  if not checkpoint or not FLAGS.out:
    fail("export", ValueError("give --checkpoint=DIR (or --workdir=RUN) and --out=DIR"))
  try:
    if _is_vae_run(checkpoint):
      return _export_vae(checkpoint)
    if FLAGS.sampler_steps < 0:
      raise ValueError(f"--sampler_steps must be >= 0, got {FLAGS.sampler_steps}")
    model = StreamingModel.load(checkpoint)
    if FLAGS.config is not None:
      model.check_config(FLAGS.config)
    config = model.config
    if FLAGS.sampler_steps:
      config = config.copy_and_resolve_references()
      config.diffusion.sampler_steps = FLAGS.sampler_steps
    start = model.start_frame if model.world is None else model.default_start_frame(FLAGS.seed)
    meta = write_export(FLAGS.out, config, model.params, start_frame=start,
                        vae_params=model.decoder_params, source=model.source)
  except (ValueError, FileNotFoundError, OSError) as e:
    fail("export", e)
  print(f"export: {model.source} -> {os.path.abspath(FLAGS.out)} "
        f"({meta['generator_params']:,} generator params, {meta['bytes'] / 2**20:.1f} MiB, "
        f"stage {meta['stage']})")
  print(f"play it: python launch/play.py --checkpoint={FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
