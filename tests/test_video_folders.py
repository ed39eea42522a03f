"""A folder of videos -> records (launch/prepare_data.py --world=videos):
frames resampled by timestamps and center-cropped, captions, skipped files,
resume after an interruption, the split over processes, text embeddings,
and a tiny config training on the Wan-VAE latents of a recorded folder."""
import json
import os
import re
import sys
import types
import zlib

import av
import numpy as np
import pytest

from aapt_jax import load_config
from aapt_jax.data import prepare_videos as pv
from aapt_jax.data import records
from aapt_jax.data.worlds import videos
from aapt_jax.image_utils import center_crop_resize
from helpers import ROOT, config_path, load_benchmark

WAN_VAE = os.path.join(ROOT, "tests", "fixtures", "wan_vae")  # 8x spatial, 4x temporal
D_MODEL = 12  # the fake text encoder's width = configs/tiny.py model.text_dim
GOOD = {"a.mp4": (20, 10, 32, 48, "mpeg4"),      # frames, fps, H, W, codec: landscape
        "sub/b.mkv": (50, 25, 48, 32, "libx264"),  # portrait, faster
        "c.mov": (30, 15, 32, 32, "mpeg4")}      # square, no caption
CAPTIONS = {"a.mp4": "a red car", "sub/b.mkv": "a cat on a mat", "c.mov": ""}
BAD = {"broken.mp4": "cut short|cannot open|decode error", "garbage.mkv": "cannot open",
       "empty.mp4": "empty file", "short.mp4": "too short"}  # file: its reason (a regex)


def make_video(path, frames, fps, height, width, codec):
  """Frame i: grey level 20 + 4i in the centered square, pure red outside it
  (what a center crop to a square removes)."""
  if codec not in av.codecs_available:
    codec = "mpeg4"
  os.makedirs(os.path.dirname(path), exist_ok=True)
  m = min(height, width)
  y0, x0 = (height - m) // 2, (width - m) // 2
  with av.open(path, "w") as container:
    stream = container.add_stream(codec, rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.bit_rate = 20_000_000
    if codec == "libx264":
      stream.options = {"crf": "0"}
    for i in range(frames):
      a = np.zeros((height, width, 3), np.uint8)
      a[..., 0] = 255
      a[y0:y0 + m, x0:x0 + m] = 20 + 4 * i
      for packet in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  src = tmp_path_factory.mktemp("videos")
  for name, spec in GOOD.items():
    make_video(str(src / name), *spec)
  make_video(str(src / "short.mp4"), 3, 10, 32, 32, "mpeg4")
  data = (src / "a.mp4").read_bytes()
  (src / "broken.mp4").write_bytes(data[: len(data) // 2])  # the index (moov) is at the end
  (src / "garbage.mkv").write_bytes(np.random.default_rng(0).bytes(3000))
  (src / "empty.mp4").write_bytes(b"")
  (src / "notes.md").write_text("not a video")
  (src / "a.txt").write_text("a red car\n")  # the sidecar wins over captions.jsonl
  (src / "captions.jsonl").write_text(
      json.dumps({"file": "a.mp4", "caption": "loses to the sidecar"}) + "\n\n" +
      json.dumps({"file": "b.mkv", "caption": "a cat on a mat"}) + "\n")  # by base name
  return str(src)


class FakeTextEncoder:
  """aapt_jax.convert.umt5.TextEncoder's interface: tokens are the words and
  an end token, a token's embedding a fixed random vector plus its position;
  right-padded, the padding filled with 99 (which must never be stored)."""
  d_model = D_MODEL

  @classmethod
  def load(cls, directory):
    assert os.path.isdir(directory), directory
    return cls()

  def encode(self, captions, max_length):
    emb = np.full((len(captions), max_length, D_MODEL), 99.0, np.float32)
    mask = np.zeros((len(captions), max_length), bool)
    for n, caption in enumerate(captions):
      for j, token in enumerate((caption.split() + ["</s>"])[:max_length]):
        rng = np.random.default_rng(zlib.crc32(token.encode()))
        emb[n, j], mask[n, j] = rng.standard_normal(D_MODEL) + j, True
    return emb, mask


def expected_embedding(caption, text_len=8):
  emb, mask = FakeTextEncoder().encode([caption], text_len)
  return emb[0][mask[0]]


def record(out, **kwargs):
  options = dict(src=kwargs.pop("src"), size=16, fps=5.0, clip_frames=4, num_shards=3,
                 text_encoder=FakeTextEncoder(), text_encoder_name="fake", text_len=8,
                 progress=False)
  options.update(kwargs)
  return pv.prepare_videos(str(out), **options)


def all_records(out):
  """{file name: [record bytes]} of every shard in `out`."""
  return {os.path.basename(p): [records.RecordSource(p).read_bytes(i)
                                for i in range(len(records.RecordSource(p)))]
          for p in records.resolve_paths(os.path.join(out, "*" + records.SUFFIX))}


@pytest.fixture(scope="module")
def recorded(folder, tmp_path_factory):
  out = tmp_path_factory.mktemp("recorded")
  return str(out), record(out, src=folder)


def test_frames_are_resampled_by_timestamps_and_center_cropped(folder):
  for name, (frames, fps, *_) in GOOD.items():
    got = np.stack(list(videos.read_frames(os.path.join(folder, name), fps=5, size=(16, 16))))
    assert got.shape == (frames * 5 // fps, 16, 16, 3)  # 2 s at 5 fps
    level = (got.astype(np.float32).mean((1, 2, 3)) - 20) / 4   # the source frame shown
    np.testing.assert_allclose(level, np.arange(10) * fps / 5, atol=0.6)
    # the red outside the centered square is cropped away (codecs blur chroma a little)
    assert np.abs(got[..., 0].astype(int) - got[..., 1]).mean() < 8, name
  up = np.stack(list(videos.read_frames(os.path.join(folder, "a.mp4"), fps=20, size=(8, 12))))
  assert up.shape == (40, 8, 12, 3)                   # 10 fps -> 20 fps: each frame twice
  np.testing.assert_array_equal(up[0::2], up[1::2])
  assert not np.array_equal(up[0], up[2])


def test_center_crop_then_area_resize_by_hand():
  frame = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)   # 4 x 6 -> 2 x 2
  square = frame[:, 1:5].astype(np.float64)                        # the centered 4 x 4
  by_hand = square.reshape(2, 2, 2, 2, 3).mean((1, 3))             # 2 x 2 pixel blocks
  np.testing.assert_array_equal(center_crop_resize(frame, (2, 2)), np.rint(by_hand))
  tall = frame.transpose(1, 0, 2)                                  # 6 x 4 -> rows 1..4
  np.testing.assert_array_equal(center_crop_resize(tall, (2, 2)),
                                np.rint(by_hand.transpose(1, 0, 2)))


def test_captions_sidecar_then_jsonl_then_empty(folder):
  files = videos.list_videos(folder)
  assert files == sorted(list(GOOD) + list(BAD))       # notes.md and the .txt are no videos
  captions = videos.read_captions(folder, files)
  assert {f: captions[f] for f in GOOD} == CAPTIONS
  bad = os.path.join(folder, "..", "bad_captions")
  os.makedirs(bad, exist_ok=True)
  with open(os.path.join(bad, "captions.jsonl"), "w") as f:
    f.write('{"file": "x.mp4"}\n')
  with pytest.raises(ValueError, match="line 1"):
    videos.read_captions(bad, ["x.mp4"])


def test_records_metadata_and_skipped_files(recorded):
  out, summary = recorded
  meta = json.load(open(os.path.join(out, "metadata.json")))
  assert meta == summary and meta["complete"]
  # 3 good videos of 10 frames at 5 fps: 2 clips of 4 frames each
  assert meta["counts"] == {"videos": 3, "video_frames": 30, "clips": 6, "clip_frames": 24}
  assert [s["file"] for s in meta["skipped"]] == sorted(BAD)
  for s in meta["skipped"]:
    assert re.search(BAD[s["file"]], s["reason"]), s
  assert (meta["size"], meta["fps"], meta["text_dim"], meta["num_shards"]) == \
      ([16, 16], 5.0, D_MODEL, 3)
  assert not os.path.exists(os.path.join(out, pv.PARTIAL))
  clips = records.RecordSource(os.path.join(out, "clips-*" + records.SUFFIX), validate=True)
  episodes = records.RecordSource(os.path.join(out, "episodes-*" + records.SUFFIX))
  assert sorted(e["file"] for e in episodes) == sorted(GOOD)
  for r in list(clips) + list(episodes):
    assert r["video"].shape[1:] == (16, 16, 3) and r["fps"] == 5.0 and r["world"] == "videos"
    assert r["text"] == CAPTIONS[r["file"]]
    np.testing.assert_array_equal(r["text_embedding"], expected_embedding(r["text"]))
  starts = sorted((c["file"], c["start"]) for c in clips)
  assert starts == sorted((f, s) for f in GOOD for s in (0, 4))
  for c in clips:  # a clip is its video's frames start..start + 4
    video = next(e for e in episodes if e["file"] == c["file"])["video"]
    np.testing.assert_array_equal(c["video"], video[c["start"]:c["start"] + 4])
  text = pv.format_summary(summary, out)
  assert "wrote 6 clips" in text and all(f"- {name}: " in text for name in BAD)


def test_long_videos_are_recorded_in_parts(folder, recorded, tmp_path):
  """max_video_frames=6: a video of 10 frames -> parts of 6 and 4 frames at
  starts 0 and 6, each with the one clip of 4 frames that fits in it."""
  out = tmp_path / "parts"
  summary = record(out, src=folder, max_video_frames=6)
  assert summary["counts"] == {"videos": 3, "video_frames": 30, "clips": 6, "clip_frames": 24}
  whole = {e["file"]: e["video"]
           for e in records.RecordSource(os.path.join(recorded[0], "episodes-*"))}
  parts = records.RecordSource(str(out / "episodes-*"))
  assert sorted((e["file"], e["start"], len(e["video"])) for e in parts) == \
      sorted((f, s, n) for f in GOOD for s, n in ((0, 6), (6, 4)))
  for r in list(parts) + list(records.RecordSource(str(out / "clips-*"))):
    np.testing.assert_array_equal(r["video"], whole[r["file"]][r["start"]:][:len(r["video"])])
  with pytest.raises(ValueError, match="max_video_frames"):
    record(tmp_path / "x", src=folder, max_video_frames=3)


def test_an_interrupted_run_resumes_to_the_uninterrupted_records(folder, recorded, tmp_path,
                                                                 monkeypatch):
  out = tmp_path / "resumed"
  real, calls = videos.read_frames, []

  def interrupted(*args, **kwargs):  # Ctrl-C while reading the 4th video (in shard 1)
    calls.append(args[0])
    if len(calls) == 4:
      raise KeyboardInterrupt
    return real(*args, **kwargs)

  monkeypatch.setattr(videos, "read_frames", interrupted)
  with pytest.raises(KeyboardInterrupt):
    record(out, src=folder)
  monkeypatch.setattr(videos, "read_frames", real)
  # shard 0 (files 0, 3, 6) is finished and usable; shards 1, 2 are not in out
  assert sorted(os.listdir(out / pv.MARKERS)) == ["00000-of-00003.json"]
  assert sorted(f for f in os.listdir(out) if f.endswith(records.SUFFIX)) == \
      ["clips-00000-of-00003.array_record", "episodes-00000-of-00003.array_record"]
  assert len(records.RecordSource(str(out / "clips-00000-of-00003.array_record"))) == 4
  assert not (out / "metadata.json").exists()
  with pytest.raises(ValueError, match="other settings .*fps"):
    record(out, src=folder, fps=6.0)
  summary = record(out, src=folder)
  assert all_records(str(out)) == all_records(recorded[0])
  assert summary == recorded[1]


def test_processes_split_the_files_and_each_is_recorded_once(folder, recorded, tmp_path):
  out = tmp_path / "split"
  for p in range(3):
    summary = record(out, src=folder, num_processes=3, process_index=p)
    assert summary["complete"] == (p == 2)
    if p < 2:
      assert summary["pending_shards"] == list(range(p + 1, 3))
  assert summary == recorded[1] and all_records(str(out)) == all_records(recorded[0])
  files = videos.list_videos(folder)
  for g in range(3):  # process g records shard g: file i from process i % 3
    shard = records.RecordSource(str(out / f"episodes-{g:05d}-of-00003.array_record"))
    assert {e["file"] for e in shard} == {f for i, f in enumerate(files)
                                          if i % 3 == g and f in GOOD}
  with pytest.raises(ValueError, match="multiple of --num_processes"):
    record(tmp_path / "x", src=folder, num_shards=4, num_processes=3)


def test_local_workers_record_what_one_process_records(folder, tmp_path):
  options = dict(src=folder, size=16, fps=5.0, clip_frames=4, num_shards=4, progress=False)
  one = pv.prepare_videos(str(tmp_path / "one"), **options)
  two = pv.prepare_videos_in_workers(str(tmp_path / "two"), workers=2, **options)
  assert one["complete"] and two == one
  assert all_records(str(tmp_path / "two")) == all_records(str(tmp_path / "one"))
  markers = sorted(os.listdir(tmp_path / "two" / pv.MARKERS))
  assert markers == [f"{g:05d}-of-00004.json" for g in range(4)]


def test_foreign_records_are_refused(folder, tmp_path):
  records.write_records(str(tmp_path / "clips-00000-of-00001.array_record"),
                        [{"video": np.zeros((2, 4, 4, 3), np.uint8), "fps": 1.0}])
  with pytest.raises(ValueError, match="already holds records"):
    record(tmp_path, src=folder, num_shards=2)


def _fake_umt5(monkeypatch):
  module = types.ModuleType("aapt_jax.convert.umt5")
  module.TextEncoder = FakeTextEncoder
  monkeypatch.setitem(sys.modules, "aapt_jax.convert.umt5", module)


def test_script_records_a_folder_naming_what_it_skipped(folder, tmp_path, capsys, monkeypatch):
  _fake_umt5(monkeypatch)
  script = load_benchmark("prepare_data", folder="launch")
  args = ["--world=videos", f"--src={folder}", f"--out={tmp_path / 'data'}", "--size=8x12",
          "--fps=5", "--clip_frames=4", f"--text_encoder={tmp_path}", "--text_len=8"]
  assert script.main(args) == 0
  printed = capsys.readouterr().out
  assert "wrote 6 clips" in printed and "skipped 4 video(s)" in printed
  assert "- garbage.mkv: cannot open" in printed and "- empty.mp4: empty file" in printed
  meta = json.load(open(tmp_path / "data" / "metadata.json"))
  assert (meta["size"], meta["text_dim"], meta["text_encoder"]) == ([8, 12], D_MODEL,
                                                                     str(tmp_path))
  assert script.main(args) == 0 and "wrote 6 clips" in capsys.readouterr().out  # all resumed
  # bad input: one line on stderr, no traceback
  for bad, message in ((["--src="], "needs --src"),
                       ([f"--src={tmp_path / 'none'}"], "not a directory"),
                       (["--fps=0"], "--fps must be > 0"),
                       (["--fps=6"], "other settings"),
                       ([f"--out={tmp_path / 'z'}", "--size=30", f"--vae_checkpoint={WAN_VAE}"],
                        "multiples of 8")):
    assert script.main(args + bad) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[-1], err
  assert not (tmp_path / "z" / "pixels").exists()  # the checkpoint is checked first


def test_the_trainer_checks_the_records_text_width():
  from aapt_jax.training.validation import check_example
  config = load_config(config_path("tiny.py"), {"data.space_to_depth": 4,
                                                 "model.latent_channels": 48})
  example = {"video": np.zeros((5, 16, 16, 3), np.uint8), "fps": 5.0,
             "text_embedding": np.zeros((3, D_MODEL), np.float32)}
  check_example(example, config, "clips[0]")  # model.text_dim = 12 = D_MODEL
  example["text_embedding"] = np.zeros((3, 7), np.float32)
  with pytest.raises(ValueError, match="text_embedding.*model.text_dim=12"):
    check_example(example, config, "clips[0]")


@pytest.mark.slow
@pytest.mark.ci
def test_wan_vae_latents_with_text_and_a_tiny_config_trains(folder, tmp_path, capsys,
                                                            monkeypatch):
  """The issue's one command: the folder (with its broken files) -> Wan-VAE
  latents (the tiny fixture VAE: 32x32 frames -> 4x4x4 latents, r = 4) with
  umT5 embeddings (the tiny umT5 fixture of tests/test_umt5.py, d_model 32);
  then configs/tiny.py trains 2 stage-1 steps on them."""
  from aapt_jax.data import encode, pipeline
  from aapt_jax.training.trainer import Trainer
  from aapt_jax.convert.umt5 import TextEncoder
  umt5 = os.path.join(ROOT, "tests", "fixtures", "umt5", "text_encoder")
  monkeypatch.setattr(encode, "EPISODE_BUCKET", 8)  # the same latents, less padding to encode
  script = load_benchmark("prepare_data", folder="launch")
  out = tmp_path / "data"
  args = ["--world=videos", f"--src={folder}", f"--out={out}", "--size=32", "--fps=10",
          "--clip_frames=9", "--clip_stride=4", f"--text_encoder={umt5}", "--text_len=8",
          f"--vae_checkpoint={WAN_VAE}"]
  assert script.main(args) == 0
  printed = capsys.readouterr().out
  assert "skipped 4 video(s)" in printed and "- garbage.mkv: cannot open" in printed
  meta = json.load(open(out / "metadata.json"))
  assert (meta["record_kind"], meta["temporal_factor"], meta["counts"]["videos"]) == \
      ("latents", 4, 3)
  assert meta["counts"]["clips"] == 9 and len(meta["skipped"]) == 4  # 20 frames: 3 clips each
  wan_config = json.load(open(os.path.join(WAN_VAE, "config.json")))
  assert (meta["vae_latents_mean"], meta["vae_latents_std"]) == \
      (wan_config["latents_mean"], wan_config["latents_std"])
  assert "the Wan VAE's own latent statistics" in printed
  clip = records.read_record(records.resolve_paths(str(out / "clips-*"))[0], 0)
  assert clip["latents"].shape == (3, 4, 4, 4) and "video" not in clip
  emb, mask = TextEncoder.load(umt5).encode([clip["text"]], 8)
  assert clip["text"] and mask.sum() > 1
  np.testing.assert_allclose(clip["text_embedding"], emb[0][mask[0]], rtol=1e-5, atol=1e-6)
  assert script.main(args) == 0  # a rerun: everything is there already
  assert "already holds these videos" in capsys.readouterr().out

  config = load_config(config_path("tiny.py"), {
      "data.path": str(out), "data.space_to_depth": 0, "data.text_len": 8,
      "model.text_dim": 32, "model.num_actions": 0, "model.control_dim": 0,
      "train.clip_frames": 3, "train.batch_size": 8, "train.steps": 2,
      "mesh.data": 2, "mesh.fsdp": 4, "mesh.tensor": 1, "train.log_every": 1,
      "vae.latents_mean": (0.0,) * 4, "vae.latents_std": (1.0,) * 4})
  make_dataset, datasets = pipeline.make_dataset, []
  monkeypatch.setattr(pipeline, "make_dataset",
                      lambda *a, **k: datasets.append(make_dataset(*a, **k)) or datasets[-1])
  summary = Trainer(config, str(tmp_path / "run")).run()
  assert summary["step"] == 2 and np.isfinite(summary["final_loss"])
  batch = datasets[0][0]  # the trainer's batches carry the captions' embeddings
  assert batch["text_embedding"].shape == (8, 8, 32) and batch["text_mask"].any()
