"""Makes training records from a world.

  python launch/prepare_data.py --world=atari --game=Pong --episodes=8 \
      --frames_per_episode=1000 --clip_frames=16 --size=64 --out=data/pong
  python launch/prepare_data.py --world=doom --episodes=8 \
      --frames_per_episode=1000 --out=data/doom     # controls, not actions
  python launch/prepare_data.py --world=tfds --tfds_name=bridge \
      --tfds_data_dir=~/tensorflow_datasets --tfds_split='train[:1000]' --out=data/bridge

writes DIR/clips-*.array_record, DIR/episodes-*.array_record and
DIR/metadata.json (see aapt_jax/data/prepare.py). With --vae_checkpoint=RUN
(a stage-"vae" run) the pixel records go to DIR/pixels and DIR gets the same
records in that VAE's latents (aapt_jax/data/encode.py), the form a
VAE-latent config trains on.

--world=tfds records a TFDS dataset prepared in ArrayRecord, RLDS episodes by
default (steps/observation/image, steps/action, steps/language_instruction),
without TensorFlow (aapt_jax/data/prepare_tfds.py, data/worlds/tfds_world.py).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--world", default="atari",
                 help="a world in aapt_jax.data.worlds (atari, doom), or tfds: a TFDS dataset")
  p.add_argument("--game", default="",
                 help="the world's game, e.g. Pong, Breakout (atari), freedoom2 (doom); "
                      "empty = the world's default (Pong, freedoom2)")
  p.add_argument("--episodes", type=int, default=8)
  p.add_argument("--frames_per_episode", type=int, default=0,
                 help="cap on frames per episode; 0 = play until game over")
  p.add_argument("--clip_frames", type=int, default=16)
  p.add_argument("--clip_stride", type=int, default=0, help="0 = clip_frames")
  p.add_argument("--size", type=int, default=64, help="square frame size")
  p.add_argument("--frame_skip", type=int, default=0,
                 help="emulator frames per recorded frame; 0 = the world's default "
                      "(atari 4, doom 2)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--repeat_prob", type=float, default=0.75,
                 help="policy: probability of keeping the previous action")
  p.add_argument("--num_shards", type=int, default=1)
  p.add_argument("--overwrite", action="store_true",
                 help="delete records already in --out")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--vae_checkpoint", default="",
                 help="a stage-'vae' run: also write the records in its latents")
  tfds = p.add_argument_group("--world=tfds", "a TFDS dataset prepared in ArrayRecord, read "
                              "without TensorFlow; feature paths join keys with '/'")
  tfds.add_argument("--tfds_name", default="", help="the dataset: name[/config][:version]")
  tfds.add_argument("--tfds_data_dir", default="",
                    help="the directory holding NAME/VERSION/ (default: TFDS_DATA_DIR or "
                         "~/tensorflow_datasets)")
  tfds.add_argument("--tfds_split", default="train",
                    help="the split; slicing picks episodes: train[:100]")
  tfds.add_argument("--tfds_video", default=None,
                    help="per-frame uint8 images (default steps/observation/image)")
  tfds.add_argument("--tfds_action", default=None,
                    help="per-frame actions: integer ids, or float vectors (controls); "
                         "default steps/action; '' = none")
  tfds.add_argument("--tfds_caption", default=None,
                    help="a Text feature, per step or per episode; default "
                         "steps/language_instruction where present; '' = none")
  tfds.add_argument("--tfds_action_shift", type=int, default=1,
                    help="1 (RLDS): step t's action shows in frame t+1; 0: in frame t")
  tfds.add_argument("--tfds_fps", type=float, default=10.0,
                    help="the dataset's frame rate (recorded; frames are not resampled)")
  args = p.parse_args(argv)
  if args.world == "tfds":
    return _tfds(args)

  try:
    from aapt_jax.data import prepare
    if args.world not in prepare.WORLDS:
      raise ValueError(f"--world={args.world!r} is not supported; choose from "
                       f"{', '.join(prepare.WORLDS + ('tfds',))}")
    from aapt_jax.data import worlds
    world_class = worlds.world_class(args.world)
    game = args.game or world_class.DEFAULT_GAME
    frame_skip = args.frame_skip or world_class.DEFAULT_FRAME_SKIP
    pixels_dir = os.path.join(args.out, "pixels") if args.vae_checkpoint else args.out
    if args.vae_checkpoint:
      from aapt_jax.loading import load_trained_vae
      load_trained_vae(args.vae_checkpoint)  # a bad checkpoint fails before any recording
    summary = prepare.prepare_world(
        pixels_dir, world=args.world, game=game, episodes=args.episodes,
        frames_per_episode=args.frames_per_episode or None,
        clip_frames=args.clip_frames, clip_stride=args.clip_stride or None,
        size=args.size, frame_skip=frame_skip, seed=args.seed,
        repeat_prob=args.repeat_prob, num_shards=args.num_shards,
        overwrite=args.overwrite, progress=True)
  except (ValueError, OSError, ImportError) as e:
    print(f"prepare_data: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("prepare_data: interrupted; the output directory is incomplete",
          file=sys.stderr)
    return 130
  print(prepare.format_summary(summary, pixels_dir))
  if args.vae_checkpoint:
    from aapt_jax.data import encode
    try:
      latent_summary = encode.encode_records(pixels_dir, args.out,
                                             vae_checkpoint=args.vae_checkpoint,
                                             overwrite=args.overwrite)
    except (ValueError, OSError) as e:
      print(f"prepare_data: error: {e}", file=sys.stderr)
      return 2
    print(encode.format_summary(latent_summary, args.out))
  return 0


def _tfds(args) -> int:
  """--world=tfds: records the dataset, then encodes it when asked."""
  pixels_dir = os.path.join(args.out, "pixels") if args.vae_checkpoint else args.out
  try:
    from aapt_jax.data import prepare, prepare_tfds
    if args.vae_checkpoint:
      from aapt_jax.loading import load_trained_vae
      load_trained_vae(args.vae_checkpoint)  # a bad checkpoint fails before any recording
    summary = prepare_tfds.prepare_tfds(
        pixels_dir, name=args.tfds_name, data_dir=args.tfds_data_dir, split=args.tfds_split,
        video=args.tfds_video, action=args.tfds_action, caption=args.tfds_caption,
        action_shift=args.tfds_action_shift,
        frames_per_episode=args.frames_per_episode or None, clip_frames=args.clip_frames,
        clip_stride=args.clip_stride or None, size=args.size, fps=args.tfds_fps,
        num_shards=args.num_shards, overwrite=args.overwrite, progress=True)
  except (ValueError, OSError, ImportError) as e:
    print(f"prepare_data: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("prepare_data: interrupted; the output directory is incomplete", file=sys.stderr)
    return 130
  print(prepare.format_summary(summary, pixels_dir))
  if args.vae_checkpoint:
    from aapt_jax.data import encode
    try:
      latent_summary = encode.encode_records(pixels_dir, args.out,
                                             vae_checkpoint=args.vae_checkpoint,
                                             overwrite=args.overwrite)
    except (ValueError, OSError) as e:
      print(f"prepare_data: error: {e}", file=sys.stderr)
      return 2
    print(encode.format_summary(latent_summary, args.out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
