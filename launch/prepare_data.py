"""Makes training records from a world or a folder of videos.

  python launch/prepare_data.py --world=atari --game=Pong --episodes=8 \
      --frames_per_episode=1000 --clip_frames=16 --size=64 --out=data/pong
  python launch/prepare_data.py --game=Pong --policy=rally --episodes=8 \
      --frames_per_episode=1000 --out=data/pong_rallies   # keeps the ball in play
  python launch/prepare_data.py --world=doom --episodes=8 \
      --frames_per_episode=1000 --out=data/doom     # controls, not actions
  python launch/prepare_data.py --world=tfds --tfds_name=bridge \
      --tfds_data_dir=~/tensorflow_datasets --tfds_split='train[:1000]' --out=data/bridge
  python launch/prepare_data.py --world=videos --src=my_videos/ --size=480x832 \
      --fps=16 --clip_frames=81 --text_encoder=Wan2.1-T2V-1.3B-Diffusers \
      --vae_checkpoint=Wan2.1-T2V-1.3B-Diffusers/vae --out=data/mine

writes DIR/clips-*.array_record, DIR/episodes-*.array_record (whole
episodes, or whole videos) and DIR/metadata.json (see aapt_jax/data/prepare.py
and aapt_jax/data/prepare_videos.py). With --vae_checkpoint=RUN (a stage-"vae"
run or export, or a diffusers Wan2.1 VAE folder) the pixel records go to
DIR/pixels and DIR gets the same records in that VAE's latents
(aapt_jax/data/encode.py), the form a VAE-latent config trains on.

--world=videos records every mp4/webm/mov/mkv under --src with its caption
(NAME.txt beside it, or --src/captions.jsonl), skipping (and listing) the
files it cannot use; --text_encoder=DIR adds each caption's umT5 embeddings.
An interrupted run keeps its finished shards and the same command resumes;
--num_processes=N --process_index=I records every N-th shard on N machines
(or N local processes) into one shared --out.

--world=tfds records a TFDS dataset prepared in ArrayRecord, RLDS episodes by
default (steps/observation/image, steps/action, steps/language_instruction),
without TensorFlow (aapt_jax/data/prepare_tfds.py, data/worlds/tfds_world.py).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _frame_size(text: str) -> int | tuple[int, int]:
  """--size: "64" (square) or "480x832" (height x width)."""
  try:
    if "x" in text:
      h, w = (int(v) for v in text.lower().split("x"))
      return (h, w)
    return int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}") from None


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--world", default="atari",
                 help="a world in aapt_jax.data.worlds (atari, doom), videos: a folder, "
                      "or tfds: a TFDS dataset")
  p.add_argument("--game", default="",
                 help="the world's game, e.g. Pong, Breakout (atari), freedoom2 (doom); "
                      "empty = the world's default (Pong, freedoom2)")
  p.add_argument("--episodes", type=int, default=8)
  p.add_argument("--frames_per_episode", type=int, default=0,
                 help="cap on frames per episode; 0 = play until game over")
  p.add_argument("--clip_frames", type=int, default=16)
  p.add_argument("--clip_stride", type=int, default=0, help="0 = clip_frames")
  p.add_argument("--size", type=_frame_size, default=64,
                 help="frame size: N (square) or HxW (videos)")
  p.add_argument("--frame_skip", type=int, default=0,
                 help="emulator frames per recorded frame; 0 = the world's default "
                      "(atari 4, doom 2)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--policy", default="",
                 help="who plays while recording: '' = the world's own (sticky_random; "
                      "doom: explorer), sticky_random, rally (Pong: keeps the ball in "
                      "play, so the data shows rallies), explorer")
  p.add_argument("--repeat_prob", type=float, default=0.75,
                 help="sticky_random (and rally between its returns): probability of "
                      "keeping the previous action")
  p.add_argument("--num_shards", type=int, default=0,
                 help="files per kind; 0 = 1 for a simulated world, for videos the earlier "
                      "run's count or about one per 64 videos")
  p.add_argument("--overwrite", action="store_true",
                 help="delete records already in --out")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--vae_checkpoint", default="",
                 help="a stage-'vae' run or export, or a diffusers Wan2.1 VAE folder: also "
                      "write the records in its latents")
  videos = p.add_argument_group("--world=videos")
  videos.add_argument("--src", default="", help="the folder of videos (searched recursively)")
  videos.add_argument("--fps", type=float, default=16.0,
                      help="frames per second the videos are resampled to")
  videos.add_argument("--max_video_frames", type=int, default=0,
                      help="record a longer video in parts of this many frames (bounds the "
                           "memory one video takes); 0 = whole videos")
  videos.add_argument("--text_encoder", default="",
                      help="a umT5 folder (aapt_jax.convert.umt5): store each caption's "
                           "embeddings per clip")
  videos.add_argument("--text_len", type=int, default=512,
                      help="caption tokens kept (the encoder's max_length)")
  videos.add_argument("--num_processes", type=int, default=1,
                      help="machines (or jobs) sharing the recording into one --out")
  videos.add_argument("--process_index", type=int, default=0, help="this one's index")
  videos.add_argument("--workers", type=int, default=1,
                      help="local processes this machine records with (each loads its own "
                           "--text_encoder)")
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
  if args.world == "videos":
    return _videos(args)

  try:
    from aapt_jax.data import prepare
    if args.world not in prepare.WORLDS:
      raise ValueError(f"--world={args.world!r} is not supported; choose from "
                       f"{', '.join(prepare.WORLDS + ('videos', 'tfds'))}")
    if not isinstance(args.size, int):
      raise ValueError(f"--size={args.size[0]}x{args.size[1]}: a simulated world records "
                       "square frames; pass one number")
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
        repeat_prob=args.repeat_prob, policy=args.policy, num_shards=args.num_shards or 1,
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
    return _encode(pixels_dir, args, overwrite=args.overwrite)
  return 0


def _videos(args) -> int:
  """--world=videos: records the folder (resuming), then encodes it when asked."""
  pixels_dir = os.path.join(args.out, "pixels") if args.vae_checkpoint else args.out
  try:
    from aapt_jax.data import prepare, prepare_videos
    if not args.src:
      raise ValueError("--world=videos needs --src=DIR, the folder of videos")
    size = (args.size, args.size) if isinstance(args.size, int) else args.size
    if args.vae_checkpoint:
      from aapt_jax.loading import load_trained_vae
      _, vae, _ = load_trained_vae(args.vae_checkpoint, size)  # fails before recording
      if tuple(vae.spec.frame_size) != tuple(size):
        h, w = vae.spec.frame_size
        raise ValueError(f"--size={size[0]}x{size[1]}, but the VAE of {args.vae_checkpoint} "
                         f"encodes {h}x{w} frames: pass --size={h}x{w}")
      if not args.overwrite and not os.path.isdir(os.path.join(pixels_dir,
                                                               prepare_videos.MARKERS)):
        prepare.check_output_dir(args.out)  # a new run: --out holds no other records
    options = dict(src=args.src, size=size, fps=args.fps, clip_frames=args.clip_frames,
                   clip_stride=args.clip_stride or None, max_video_frames=args.max_video_frames,
                   num_shards=args.num_shards, num_processes=args.num_processes,
                   process_index=args.process_index, text_len=args.text_len,
                   overwrite=args.overwrite, progress=True)
    if args.workers > 1:
      summary = prepare_videos.prepare_videos_in_workers(
          pixels_dir, workers=args.workers, text_encoder_dir=args.text_encoder, **options)
    else:
      encoder = None
      if args.text_encoder:
        from aapt_jax.convert.umt5 import TextEncoder  # lazily: only a text run needs it
        encoder = TextEncoder.load(args.text_encoder)
      summary = prepare_videos.prepare_videos(
          pixels_dir, text_encoder=encoder, text_encoder_name=os.path.abspath(
              args.text_encoder) if args.text_encoder else "", **options)
  except (ValueError, OSError, ImportError) as e:
    print(f"prepare_data: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"prepare_data: interrupted; the finished shards in {pixels_dir} are usable, "
          "and rerunning the same command records the rest", file=sys.stderr)
    return 130
  print(prepare_videos.format_summary(summary, pixels_dir))
  if not args.vae_checkpoint:
    return 0
  if not summary["complete"]:
    print("the latents are encoded once every shard is recorded: then rerun this command "
          "with --num_processes=1")
    return 0
  if args.num_processes > 1:
    print("every shard is recorded: encode the latents once, by rerunning this command "
          "with --num_processes=1 (on one machine)")
    return 0
  try:
    with open(os.path.join(args.out, "metadata.json")) as f:
      done = json.load(f)
    if not args.overwrite and (done.get("pixel_source"), done.get("vae_checkpoint")) == (
        os.path.abspath(pixels_dir), os.path.abspath(args.vae_checkpoint)):
      print(f"{args.out} already holds these videos in the latents of {args.vae_checkpoint}")
      return 0
  except (OSError, ValueError):
    pass
  # the latents in --out derive from the pixels: an interrupted encoding starts again
  return _encode(pixels_dir, args, overwrite=True)


def _encode(pixels_dir: str, args, overwrite: bool) -> int:
  from aapt_jax.data import encode
  try:
    latent_summary = encode.encode_records(pixels_dir, args.out,
                                           vae_checkpoint=args.vae_checkpoint,
                                           overwrite=overwrite)
  except (ValueError, OSError) as e:
    print(f"prepare_data: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("prepare_data: interrupted while encoding; rerun the same command to encode "
          "again", file=sys.stderr)
    return 130
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
        num_shards=args.num_shards or 1, overwrite=args.overwrite, progress=True)
  except (ValueError, OSError, ImportError) as e:
    print(f"prepare_data: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("prepare_data: interrupted; the output directory is incomplete", file=sys.stderr)
    return 130
  print(prepare.format_summary(summary, pixels_dir))
  if args.vae_checkpoint:
    return _encode(pixels_dir, args, overwrite=args.overwrite)
  return 0


if __name__ == "__main__":
  sys.exit(main())
