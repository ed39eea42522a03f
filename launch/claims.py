"""The paper's claims at toy scale, trained and measured against the emulator.

  python launch/claims.py --workdir=runs/claims --out=docs/claims

Trains (resumably: rerun the same command after a stop) stage 1 and stage 2
once in <workdir>/base, then stage 3 arms from that same stage-2 checkpoint,
each with the same compute (latent-frame passes, stages.adversarial_frame_passes):
  stage3           student forcing, a rollout of several training clips judged
                   in overlapping segments (AAPT);
  stage3_one_clip  student forcing, a rollout of one training clip (claim b);
  stage3_teacher   teacher forcing: G's one-step frames of real clips (claim a);
then compares, on the same emulator episodes at 10x the training clip
(evaluation/compare.py): stage 1 at 16 Euler steps and at 1 (claim c: the
same time per frame as stage 3), stage 2, and the stage-3 arms.
Writes <out>/compare.md, compare.json and compare_*.png (RESULTS.md).
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

config_flags.DEFINE_config_file("config", "configs/atari.py:claims", "Base config (stage 3's "
                                "settings are the AAPT arm's).", lock_config=False)
flags.DEFINE_string("workdir", "runs/claims", "Run directory of all arms.")
flags.DEFINE_string("out", "claims_report", "Folder for compare.md, compare.json and plots.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Evaluation seeds.")
flags.DEFINE_integer("frames", 0, "Latent frames per evaluation rollout (0 = 10x the "
                     "training clip).")
flags.DEFINE_list("arms", ["stage3", "stage3_one_clip", "stage3_teacher"],
                  "Stage-3 arms to train and compare.")
FLAGS = flags.FLAGS

# stage-3 arms: config overrides on top of the base config's adversarial settings
ARMS = {
    "stage3": {},
    "stage3_one_clip": {"rollout_frames": "clip", "segment_frames": "clip",
                        "segment_overlap": 0},
    "stage3_teacher": {"forcing": "teacher", "segment_frames": "clip"},
}
NOTES = {
    "stage1_16": "stage 1, 16 Euler steps per frame",
    "stage1_1": "stage 1, 1 step per frame (stage 3's time per frame)",
    "stage2": "stage 2 (consistency), 1 step",
    "stage3": "AAPT: student forcing, long rollout in overlapping segments",
    "stage3_one_clip": "student forcing, a rollout of one training clip",
    "stage3_teacher": "teacher forcing (real previous frames)",
}


def arm_config(base, name: str):
  """The stage-3 config of arm `name`: its overrides, and train.steps scaled so
  that every arm spends the AAPT arm's compute."""
  from aapt_jax.training.stages import adversarial_frame_passes
  if name not in ARMS:
    raise ValueError(f"--arms: unknown arm {name!r}; choose from {', '.join(ARMS)}")
  c = base.copy_and_resolve_references()
  with c.unlocked():
    c.stage = "adversarial"
    for key, value in ARMS[name].items():
      c.adversarial[key] = c.train.clip_frames if value == "clip" else value
    budget = adversarial_frame_passes(base) * int(base.pipeline.adversarial_steps)
    c.train.steps = max(1, round(budget / adversarial_frame_passes(c)))
  return c


def main(_):
  from aapt_jax.cli import fail, log_training_info, whole_numbers
  log_training_info()
  from aapt_jax.evaluation.compare import Arm, compare, write_comparison
  from aapt_jax.evaluation.suite import Settings
  from aapt_jax.pipeline import stage_config
  from aapt_jax.training.trainer import Trainer
  from aapt_jax.training.validation import check_config
  config = FLAGS.config
  work = os.path.abspath(FLAGS.workdir)
  base_dir = os.path.join(work, "base")
  try:
    seeds = whole_numbers(FLAGS.seeds, "--seeds")  # before hours of training
    stages = [stage_config(config, s) for s in ("diffusion", "consistency")]
    arms = {name: arm_config(config, name) for name in FLAGS.arms}
    for c in stages + list(arms.values()):
      check_config(c)
    for c in stages:
      logging.info("claims: base %s (%d steps)", c.stage, c.train.steps)
      if Trainer(c, base_dir).run()["preempted"]:
        return
      for later in stages + list(arms.values()):  # reuse the data the first stage resolved
        with later.unlocked():
          later.data.path = c.data.path
    for name, c in arms.items():
      with c.unlocked():
        c.init_from = os.path.join(base_dir, "consistency")
        c.disc_init_from = os.path.join(base_dir, "diffusion")
      logging.info("claims: %s (%d steps)", name, c.train.steps)
      if Trainer(c, os.path.join(work, name)).run()["preempted"]:
        return
    clip = int(config.train.clip_frames)
    settings = Settings(seeds=seeds,
                        frames=FLAGS.frames or 10 * clip,
                        teacher_forced_frames=min(4 * clip, FLAGS.frames or 10 * clip),
                        fvd=False)
    rows = [Arm("stage1_16", os.path.join(base_dir, "diffusion"), 16),
            Arm("stage1_1", os.path.join(base_dir, "diffusion"), 1),
            Arm("stage2", os.path.join(base_dir, "consistency"), 1)]
    rows += [Arm(name, os.path.join(work, name, "adversarial"), 1) for name in arms]
    rows = [Arm(a.name, a.checkpoint, a.sampler_steps,
                NOTES[a.name] + (f"; {arms[a.name].train.steps} steps" if a.name in arms
                                 else "")) for a in rows]
    result = compare(rows, settings)
  except (ValueError, OSError) as e:
    fail("claims", e)
  paths = write_comparison(result, FLAGS.out, title="AAPT's claims at toy scale")
  print(f"claims: wrote {', '.join(sorted(paths.values()))}")


if __name__ == "__main__":
  app.run(main)
