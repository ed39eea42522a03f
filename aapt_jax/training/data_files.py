"""Which record files a run trains on: `resolve_data` (data.path, or a small
dataset of `data.world` recorded automatically into `<workdir>/data`) and
`episode_files` (stage 3's long episodes)."""
from __future__ import annotations

import json
import os

import jax

from aapt_jax.data import records
from aapt_jax.parallel import barrier, is_main_process
from aapt_jax.training.metrics import log


def record_files(path: str) -> list[str]:
  """The training files under data.path: a directory's clips-* files (what
  prepare_data writes; episodes-* are for later stages), else all its records."""
  if os.path.isdir(path) and any(f.startswith("clips-") and f.endswith(records.SUFFIX)
                                 for f in os.listdir(path)):
    return records.resolve_paths(os.path.join(path, "clips-*" + records.SUFFIX))
  return records.resolve_paths(path)


def episode_files(config, clip_files: list[str]) -> list[str]:
  """Where stage 3 draws rollout start frames and actions: the long episodes
  (episodes-* next to the clips, as prepare_data writes them), else the clips."""
  path = config.data.path
  if os.path.isdir(path) and any(f.startswith("episodes-") and f.endswith(records.SUFFIX)
                                 for f in os.listdir(path)):
    return records.resolve_paths(os.path.join(path, "episodes-*" + records.SUFFIX))
  return clip_files


def check_recorded_policy(config, out_dir: str) -> None:
  """ValueError when the finished recording in `out_dir` was played by
  another policy than `config.data.policy` asks for (metadata.json without
  one: the world's own, the only policy there was)."""
  from aapt_jax.data.worlds import policies
  with open(os.path.join(out_dir, "metadata.json")) as f:
    meta = json.load(f)
  where = dict(game=meta["game"], control_dim=meta.get("control_dim", 0))
  asked = policies.policy_name(config.data.policy, **where)
  recorded = meta.get("policy") or policies.policy_name("", **where)
  if asked != recorded:
    raise ValueError(
        f"config field data.policy={config.data.policy!r} asks for the {asked!r} policy, "
        f"but {out_dir} holds data recorded by {recorded!r}: delete {out_dir} to record "
        f"again (or use another --workdir), or set data.policy={recorded!r}")


def prepare_world_data(config, out_dir: str) -> None:
  """Records a small dataset of `config.data.world` into `out_dir` (process 0;
  the others wait) unless a finished one (metadata.json) is there, played by
  the policy `config.data.policy` (ValueError when the finished one was not)."""
  from aapt_jax.data import prepare
  world = config.data.world
  if world not in prepare.WORLDS:
    raise ValueError(f"config field data.world={world!r} is not supported; choose from "
                     f"{', '.join(prepare.WORLDS)} or set data.path")
  done = os.path.exists(os.path.join(out_dir, "metadata.json"))
  if done:
    check_recorded_policy(config, out_dir)
  if is_main_process() and not done:
    clip = 2 * config.train.clip_frames
    episodes, frames = int(config.data.record_episodes), int(config.data.record_frames)
    log(f"data.path is empty: recording {episodes} episodes x "
        f"{frames} frames of {world}/{config.data.game} "
        f"(policy {config.data.policy or 'the world default'}) at "
        f"{config.data.frame_size}x{config.data.frame_size} into {out_dir} "
        f"(clips of {clip} frames); set data.path to use other data")
    summary = prepare.prepare_world(
        out_dir, world=world, game=config.data.game, episodes=episodes,
        frames_per_episode=frames, clip_frames=clip,
        clip_stride=config.train.clip_frames, size=config.data.frame_size,
        frame_skip=config.data.frame_skip, seed=config.train.seed,
        policy=config.data.policy, overwrite=True, progress=True)
    log(prepare.format_summary(summary, out_dir))
  if jax.process_count() > 1:
    barrier("aapt_jax:prepare_world_data")
    if not os.path.exists(os.path.join(out_dir, "metadata.json")):
      raise FileNotFoundError(
          f"process {jax.process_index()} cannot see the data process 0 prepared in "
          f"{out_dir}; use a --workdir all hosts share, or set data.path")


def resolve_data(config, workdir: str) -> list[str]:
  """The record files to train on; prepares world data when asked to."""
  path = config.data.path
  if not path:
    if not config.data.world:
      raise ValueError(
          "config field data.path is empty: set --config.data.path=DIR (ArrayRecord "
          "files from launch/prepare_data.py), or set data.world (e.g. 'atari') to "
          "record a small dataset automatically")
    path = os.path.join(os.path.abspath(workdir), "data")
    prepare_world_data(config, path)
    with config.unlocked():
      config.data.path = path
  if not os.path.exists(path) and not any(c in path for c in "*?["):
    raise FileNotFoundError(f"config field data.path={path!r} does not exist; "
                            "point it at a directory of ArrayRecord files "
                            "(launch/prepare_data.py writes one)")
  try:
    return record_files(path)
  except FileNotFoundError:
    raise FileNotFoundError(f"config field data.path={path!r} holds no ArrayRecord "
                            f"files (*{records.SUFFIX})") from None
