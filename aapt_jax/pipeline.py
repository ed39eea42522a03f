"""stage="pipeline": the stages in order (diffusion -> consistency ->
adversarial), each from the one before, then a sample video: `train(config,
workdir)`, what launch/train.py runs. The sample step is inference's, so it
lives here and not in the training package."""
from __future__ import annotations

import os
from typing import Any

from aapt_jax.parallel import is_main_process
from aapt_jax.training.metrics import log, write_summary
from aapt_jax.training.trainer import SUMMARY, Trainer
from aapt_jax.training.validation import check_config

PIPELINE = ("diffusion", "consistency", "adversarial")


def stage_config(config, stage: str):
  """A copy of a pipeline config for one of its stages (its steps from
  `pipeline.<stage>_steps`, 0 = train.steps)."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.stage = stage
    steps = int(config.pipeline[f"{stage}_steps"])
    if steps:
      c.train.steps = steps
  return c


def train(config, workdir: str) -> list[dict[str, Any]]:
  """Runs `config.stage`; `pipeline` runs diffusion -> consistency ->
  adversarial in `workdir` (each resuming or skipping when already done,
  each starting from the one before) and then writes `<workdir>/sample.mp4`.
  Returns the stages' summaries (each `Trainer.run`'s, then the sample's),
  also written to `<workdir>/summary.json` as {"stages": [...]}."""
  summaries = _run(config, workdir)
  write_summary(os.path.join(os.path.abspath(workdir), SUMMARY), {"stages": summaries})
  return summaries


def _run(config, workdir: str) -> list[dict[str, Any]]:
  if config.stage != "pipeline":
    return [Trainer(config, workdir).run()]
  configs = [stage_config(config, s) for s in PIPELINE]
  for c in configs:  # every stage's config is checked before the first one trains
    check_config(c)
  summaries = []
  for c in configs:
    log(f"pipeline: stage {c.stage} ({c.train.steps} steps)")
    summaries.append(Trainer(c, workdir).run())
    if summaries[-1]["preempted"]:  # SIGTERM ends the run; a rerun resumes this stage
      log(f"pipeline: stopped during stage {c.stage}; rerun the same command to resume")
      return summaries
    for later in configs:  # later stages reuse the data the first one resolved
      with later.unlocked():
        later.data.path = c.data.path
  if is_main_process() and config.pipeline.sample_frames:
    from aapt_jax.inference.video import generate_video
    out = os.path.join(os.path.abspath(workdir), "sample.mp4")
    path, stats = generate_video(configs[-1], checkpoint=workdir,
                                 frames=int(config.pipeline.sample_frames),
                                 seed=config.train.seed, out=out)
    from aapt_jax.inference.quality import describe
    log(f"pipeline: sample video {path}: {stats['video_frames']} frames at "
        f"{stats['frames_per_s']} frames/s (mean pixel {stats['mean_pixel']}, "
        f"std {stats['std_pixel']})\n{describe(stats)}")
    summaries.append({"stage": "sample", "video": path, **stats})
  return summaries
