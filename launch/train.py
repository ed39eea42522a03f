"""Trains a stage; a rerun with the same --workdir resumes from its latest checkpoint.

  python launch/train.py --config=configs/atari.py --workdir=runs/atari \
      --config.train.steps=100

Multi-host: the same command on every host, with --coordinator_address=HOST:PORT
--num_processes=N --process_id=I (or config.distributed.initialize=True to let
JAX detect the cluster, e.g. a TPU pod). Under `srun` with several tasks the
processes find each other from SLURM's environment (aapt_jax/slurm.py; flags
win over it, config.distributed.from_slurm=False ignores it); launchers for
SLURM and TPU pods: launch/cluster/. SIGTERM saves a checkpoint and exits 0.
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

config_flags.DEFINE_config_file("config", "configs/atari.py", "Config file.", lock_config=False)
flags.DEFINE_string("workdir", "runs/atari", "Run directory (checkpoints, TensorBoard, data).")
flags.DEFINE_string("coordinator_address", None, "jax.distributed coordinator HOST:PORT.")
flags.DEFINE_integer("num_processes", None, "jax.distributed: number of processes.")
flags.DEFINE_integer("process_id", None, "jax.distributed: this process's id.")
flags.DEFINE_integer("profile_steps", None, "Trace this many steps with the JAX profiler "
                     "into <workdir>/<stage>/tb (sets config.train.profile_steps).")
FLAGS = flags.FLAGS


def main(_):
  from aapt_jax.cli import fail, log_training_info
  log_training_info()  # the trainer's messages (absl logging, process 0)
  config = FLAGS.config
  if FLAGS.profile_steps is not None:
    config.train.profile_steps = FLAGS.profile_steps
  d = config.distributed
  if FLAGS.coordinator_address is not None:
    d.coordinator_address = FLAGS.coordinator_address
  if FLAGS.num_processes is not None:
    d.num_processes = FLAGS.num_processes
  if FLAGS.process_id is not None:
    d.process_id = FLAGS.process_id
  explicit = any(f is not None for f in (FLAGS.coordinator_address, FLAGS.num_processes,
                                         FLAGS.process_id))
  try:
    from aapt_jax import parallel, slurm
    from aapt_jax.pipeline import train
    from aapt_jax.training.metrics import NonFiniteLossError
    from_slurm = None
    if d.from_slurm and not explicit:
      from_slurm = slurm.distributed_config(os.environ, d.heartbeat_timeout_s or None)
    if from_slurm is not None:
      logging.info("jax.distributed from SLURM's environment: process %d of %d, "
                   "coordinator %s", from_slurm.process_id, from_slurm.num_processes,
                   from_slurm.coordinator_address)
      parallel.initialize_distributed(from_slurm)
    elif explicit or d.initialize:
      if d.coordinator_address and (d.num_processes < 1 or not
                                    0 <= d.process_id < d.num_processes):
        raise ValueError(f"--process_id={d.process_id} must be in [0, --num_processes="
                         f"{d.num_processes})")
      parallel.initialize_distributed(parallel.DistributedConfig(
          coordinator_address=d.coordinator_address or None,
          num_processes=d.num_processes, process_id=d.process_id,
          heartbeat_timeout_s=d.heartbeat_timeout_s or None))
    summaries = train(config, FLAGS.workdir)
    if summaries[-1].get("video"):
      print(f"sample video: {summaries[-1]['video']}")
    if config.stage != "vae" and any(s.get("checkpoint") for s in summaries):
      print(f"next: python launch/generate.py --checkpoint={FLAGS.workdir} --frames=48 "
            "--out=sample.mp4")
      print(f"play: python launch/play.py --checkpoint={FLAGS.workdir}  (then open the "
            "printed address in a browser)")
  except NonFiniteLossError as e:
    fail("train", e, code=1)
  except (ValueError, OSError) as e:  # FileNotFoundError is an OSError
    fail("train", e)


if __name__ == "__main__":
  app.run(main)
