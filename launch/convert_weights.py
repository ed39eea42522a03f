"""Converts public Wan2.1 transformer weights into a checkpoint to train from.

  python launch/convert_weights.py --from=diffusers \
      --src=Wan2.1-T2V-1.3B-Diffusers/transformer --out=ckpt/wan_1_3b \
      --config=configs/wan2_1_1_3b.py
  python launch/train.py --config=configs/wan2_1_1_3b.py --config.init_from=ckpt/wan_1_3b ...

--src: the folder with config.json and the safetensors (diffusers
`WanTransformer3DModel`, or the original Wan2.1 repository's `WanModel`).
Without --config the checkpoint holds plain Wan (the checkpoint's own config);
with it, the params of that config's model: AAPT's additions (recycled-frame
input columns, action/control embeddings) start so the output is Wan's.
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

flags.DEFINE_enum("from", "diffusers", ["diffusers"],
                  "Source format: 'diffusers' reads diffusers and original Wan2.1 folders.")
flags.DEFINE_string("src", None, "Checkpoint folder (config.json + safetensors).")
flags.DEFINE_string("out", None, "Output checkpoint directory (new or empty).")
config_flags.DEFINE_config_file("config", None, "Target config (default: plain Wan).",
                                lock_config=False)
FLAGS = flags.FLAGS


def main(_):
  logging.set_verbosity(logging.WARNING)
  from aapt_jax.cli import fail
  try:
    if not FLAGS.src or not FLAGS.out:
      raise ValueError("--src and --out are required (see --help)")
    from aapt_jax.convert.adapt import adapt_to
    from aapt_jax.convert.wan import load_transformer
    from aapt_jax.convert.write import check_output_dir, write_generator_checkpoint
    check_output_dir(FLAGS.out)
    source_config, plain = load_transformer(FLAGS.src, progress=True)
    target = FLAGS.config if FLAGS.config is not None else source_config
    params, report = adapt_to(plain, target, source_config)
    out = write_generator_checkpoint(FLAGS.out, target, params)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    fail("convert_weights", e)
  print(report.summary())
  print(f"wrote {out}\nnext: python launch/train.py --config=<config> "
        f"--config.init_from={out} --workdir=<run dir>")


if __name__ == "__main__":
  app.run(main)
