"""How much of a Pong recording shows the ball in play, per recording policy.

  python benchmarks/policy_rallies.py [--seeds=0,1,2] [--frames=1000]

Records each seed with each policy (`--policy` of launch/prepare_data.py:
sticky_random, the default, and rally) and prints, from the emulator's RAM
(aapt_jax/evaluation/rallies.py), per policy the mean +- spread over seeds
of: ball visible (share of frames with the ball on the screen), returns (the
player's paddle sending the ball back), rallies (serve to point), mean rally
(returns per rally), points won and lost; and the rally policy's ratio to
sticky-random.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

POLICIES = ("sticky_random", "rally")
COLUMNS = ("ball_visible", "returns", "rallies", "mean_rally", "points_won", "points_lost")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--frames", type=int, default=1000)
  args = p.parse_args(argv)
  from aapt_jax.data.worlds import atari, policies
  from aapt_jax.evaluation.rallies import episode_rams, pong_rallies
  world = atari.AtariWorld("Pong", size=16)   # the RAM does not depend on the frame size
  seeds = [int(s) for s in args.seeds.split(",")]
  stats = {}
  for name in POLICIES:
    runs = []
    for seed in seeds:
      ep = world.record_episode(seed, policies.make_policy(name, world, seed=seed),
                                max_frames=args.frames)
      runs.append(pong_rallies(episode_rams(world, ep.actions, seed), ep.rewards))
    stats[name] = {k: np.array([r[k] for r in runs], float) for k in COLUMNS + ("frames",)}
  print(f"Pong, {len(seeds)} seeds x up to {args.frames} frames (frame skip 4); "
        "mean +- std over seeds")
  print("| policy | frames | " + " | ".join(COLUMNS) + " |")
  print("|---" * (len(COLUMNS) + 2) + "|")
  for name in POLICIES:
    s = stats[name]
    cells = [f"{s[k].mean():.2f} +- {s[k].std():.2f}" for k in COLUMNS]
    print(f"| {name} | {s['frames'].mean():.0f} | " + " | ".join(cells) + " |")
  ratio = [f"{stats['rally'][k].mean() / base:.2f}x" if base else "-"
           for k in COLUMNS for base in [stats["sticky_random"][k].mean()]]
  print("| rally / sticky_random | | " + " | ".join(ratio) + " |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
