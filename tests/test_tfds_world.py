"""TFDS/RLDS datasets as records: tiny datasets built here with TFDS builders of
our own (ArrayRecord, no download, no TensorFlow), recorded and compared with
what was generated, then trained on."""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")

from aapt_jax.data import records  # noqa: E402
from aapt_jax.data.prepare_tfds import prepare_tfds  # noqa: E402
from aapt_jax.data.worlds import tfds_world  # noqa: E402
from aapt_jax.image_utils import center_crop_resize  # noqa: E402
from helpers import ROOT, config_path  # noqa: E402

F = tfds.features
H, W = 12, 20          # generated frames: not square, so the crop matters
SIZE = 16              # recorded frames
LENGTHS = (9, 11, 4)   # frames per episode; the last is shorter than one clip


def png(frame):
  buf = io.BytesIO()
  Image.fromarray(frame).save(buf, format="PNG")
  return buf.getvalue()


def generated(seed, action_dim=None):
  """The episodes a builder writes: (frames [T, H, W, 3], actions, caption)."""
  rng = np.random.default_rng(seed)
  out = []
  for k, t in enumerate(LENGTHS):
    frames = rng.integers(0, 256, (t, H, W, 3), dtype=np.uint8)
    if action_dim is None:
      actions = rng.integers(0, 6, t).astype(np.int64)
    else:
      actions = rng.standard_normal((t, action_dim)).astype(np.float32)
    out.append((frames, actions, f"task {k}"))
  return out


class AaptTfdsIds(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """RLDS-shaped: steps of a uint8 Tensor image, an integer action and a
  language instruction."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=F.FeaturesDict({
        "steps": F.Dataset({
            "observation": {"image": F.Tensor(shape=(H, W, 3), dtype=np.uint8),
                            "state": F.Tensor(shape=(2,), dtype=np.float32)},
            "action": F.Tensor(shape=(), dtype=np.int64),
            "language_instruction": F.Text(),
            "is_first": F.Tensor(shape=(), dtype=np.bool_),
        }),
        "episode_metadata": {"file_path": F.Text()},
    }))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for k, (frames, actions, caption) in enumerate(generated(0)):
      yield k, {"steps": [{"observation": {"image": f, "state": np.zeros(2, np.float32)},
                           "action": a, "language_instruction": caption,
                           "is_first": i == 0}
                          for i, (f, a) in enumerate(zip(frames, actions))],
                "episode_metadata": {"file_path": f"ep{k}"}}


def action_dict(a, i, t):
  """An RT-1-like action of several parts."""
  return {"world_vector": a, "gripper": np.float32(2 * a[0]), "terminate": np.int32(i == t - 1)}


class AaptTfdsControls(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """RLDS-shaped, Open X-Embodiment-like: steps of an encoded PNG Image (and
  a wrist camera left unread), a float action vector; the caption per
  episode."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=F.FeaturesDict({
        "steps": F.Dataset({
            "observation": {"image": F.Image(shape=(H, W, 3), encoding_format="png"),
                            "wrist_image": F.Image(shape=(H, W, 3), encoding_format="png")},
            "action": F.Tensor(shape=(3,), dtype=np.float32),
            "action_dict": {"world_vector": F.Tensor(shape=(3,), dtype=np.float32),
                            "gripper": F.Tensor(shape=(), dtype=np.float32),
                            "terminate": F.Tensor(shape=(), dtype=np.int32)},
        }),
        "episode_metadata": {"instruction": F.Text()},
    }))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for k, (frames, actions, caption) in enumerate(generated(1, action_dim=3)):
      yield k, {"steps": [{"observation": {"image": png(f), "wrist_image": png(255 - f)},
                           "action": a, "action_dict": action_dict(a, i, len(frames))}
                          for i, (f, a) in enumerate(zip(frames, actions))],
                "episode_metadata": {"instruction": caption}}


class AaptTfdsVideo(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Not RLDS: per episode a Sequence of PNG images (what tfds decodes
  itself) and a Sequence of ClassLabel actions."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=F.FeaturesDict({
        "frames": F.Sequence(F.Image(shape=(H, W, 3), encoding_format="png")),
        "moves": F.Sequence(F.ClassLabel(names=["stay", "left", "right", "up", "down",
                                                "fire"])),
        "label": F.Tensor(shape=(), dtype=np.int64),
    }))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for k, (frames, actions, _) in enumerate(generated(2)):
      yield k, {"frames": [png(f) for f in frames], "moves": actions, "label": k}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tfds"))
  for cls in (AaptTfdsIds, AaptTfdsControls, AaptTfdsVideo):
    cls(data_dir=d, file_format="array_record").download_and_prepare()
  return d


def expected_video(frames):
  return center_crop_resize(frames, SIZE)


def shifted(actions):
  return np.concatenate([np.zeros_like(actions[:1]), actions[:-1]])


def read(out, kind):
  return list(records.RecordSource(os.path.join(out, f"{kind}-*.array_record"),
                                   validate=True))


def test_center_crop_resize():
  frames = np.zeros((2, 4, 8, 3), np.uint8)
  frames[:, :, 2:6] = 200                       # the middle 4x4 square
  out = center_crop_resize(frames, 2)
  assert out.shape == (2, 2, 2, 3) and (out == 200).all()
  tall = np.arange(6 * 2 * 3, dtype=np.uint8).reshape(6, 2, 3)
  np.testing.assert_array_equal(center_crop_resize(tall, (1, 1)),
                                tall[2:4].mean((0, 1), keepdims=True).round())


def test_discrete_rlds_records_equal_the_generated_episodes(data_dir, tmp_path):
  out = str(tmp_path / "ids")
  summary = prepare_tfds(out, name="aapt_tfds_ids", data_dir=data_dir,
                                 clip_frames=4, clip_stride=2, size=SIZE, fps=5.0,
                                 progress=False)
  assert json.load(open(os.path.join(out, "metadata.json"))) == json.loads(json.dumps(summary))
  assert summary["action_kind"] == "ids" and summary["control_dim"] == 0
  truth = generated(0)
  assert summary["num_actions"] == max(int(a[:-1].max()) for _, a, _ in truth) + 1
  assert summary["tfds"]["caption"] == "steps/language_instruction"  # the default, present
  # clips every 2 frames: 9 -> 3, 11 -> 4, 4 -> 1
  assert summary["counts"] == {"episodes": 3, "episode_frames": 24, "clips": 8,
                               "clip_frames": 32}
  eps = {e["episode"]: e for e in read(out, "episodes")}
  for k, (frames, actions, caption) in enumerate(truth):
    e = eps[k]
    np.testing.assert_array_equal(e["video"], expected_video(frames))
    np.testing.assert_array_equal(e["actions"], shifted(actions))
    assert e["actions"].dtype == np.int32 and e["actions"][0] == 0
    assert e["text"] == caption and e["fps"] == 5.0 and e["world"] == "tfds"
  clips = read(out, "clips")
  assert len(clips) == 8
  for c in clips:
    e, s = eps[c["episode"]], c["start"]
    np.testing.assert_array_equal(c["video"], e["video"][s:s + 4])
    np.testing.assert_array_equal(c["actions"], e["actions"][s:s + 4])


def test_encoded_image_rlds_records_controls(data_dir, tmp_path):
  out = str(tmp_path / "controls")
  summary = prepare_tfds(out, name="aapt_tfds_controls", data_dir=data_dir,
                                 caption="episode_metadata/instruction", clip_frames=4,
                                 size=SIZE, frames_per_episode=10, progress=False)
  assert summary["action_kind"] == "controls" and summary["num_actions"] == 0
  assert summary["control_dim"] == 3
  assert summary["control_names"] == ["steps/action/0", "steps/action/1", "steps/action/2"]
  assert summary["counts"] == {"episodes": 3, "episode_frames": 9 + 10 + 4,
                               "clips": 2 + 2 + 1, "clip_frames": 20}
  assert summary["skipped"] == []
  eps = {e["episode"]: e for e in read(out, "episodes")}
  for k, (frames, actions, caption) in enumerate(generated(1, action_dim=3)):
    e = eps[k]
    np.testing.assert_array_equal(e["video"], expected_video(frames[:10]))  # PNG: exact
    np.testing.assert_array_equal(e["controls"], shifted(actions)[:10])
    assert e["controls"].dtype == np.float32 and e["text"] == caption


def test_a_dict_action_becomes_its_parts_concatenated(data_dir, tmp_path):
  out = str(tmp_path / "dict")
  summary = prepare_tfds(out, name="aapt_tfds_controls", data_dir=data_dir,
                                 split="train[:1]", action="steps/action_dict", caption="",
                                 clip_frames=4, size=SIZE, progress=False)
  names = summary["control_names"]
  assert summary["control_dim"] == 5 and sorted(names) == [
      "steps/action_dict/gripper", "steps/action_dict/terminate",
      "steps/action_dict/world_vector/0", "steps/action_dict/world_vector/1",
      "steps/action_dict/world_vector/2"]
  frames, actions, _ = generated(1, action_dim=3)[0]
  columns = {"steps/action_dict/gripper": 2 * actions[:, 0],
             "steps/action_dict/terminate": np.arange(len(frames)) == len(frames) - 1}
  columns.update({f"steps/action_dict/world_vector/{j}": actions[:, j] for j in range(3)})
  want = np.stack([columns[n] for n in names], -1).astype(np.float32)   # [T, 5]
  episode = read(out, "episodes")[0]
  np.testing.assert_array_equal(episode["controls"], shifted(want))
  assert "text" not in episode


def test_episode_level_sequences_without_shift(data_dir, tmp_path):
  out = str(tmp_path / "video")
  summary = prepare_tfds(out, name="aapt_tfds_video", data_dir=data_dir,
                                 split="train[:2]", video="frames", action="moves",
                                 action_shift=0, clip_frames=5, size=(8, 12), progress=False)
  assert summary["num_actions"] == 6 and summary["action_names"][5] == "fire"
  assert summary["size"] == [8, 12]
  assert summary["tfds"]["caption"] == "" and summary["counts"]["episodes"] == 2
  eps = {e["episode"]: e for e in read(out, "episodes")}
  for k, (frames, actions, _) in enumerate(generated(2)[:2]):
    np.testing.assert_array_equal(eps[k]["video"], center_crop_resize(frames, (8, 12)))
    np.testing.assert_array_equal(eps[k]["actions"], actions)
    assert "text" not in eps[k]


def test_decode_frame():
  rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
  np.testing.assert_array_equal(tfds_world.decode_frame(png(rgb)), rgb)
  gray = rgb[..., 0]
  np.testing.assert_array_equal(tfds_world.decode_frame(png(gray)), np.repeat(gray[..., None], 3, -1))
  rgba = np.concatenate([rgb, np.full((5, 7, 1), 9, np.uint8)], -1)
  np.testing.assert_array_equal(tfds_world.decode_frame(png(rgba)), rgb)
  np.testing.assert_array_equal(tfds_world.decode_frame(rgba), rgb)
  smooth = np.stack(list(np.meshgrid(np.arange(16) * 8, np.arange(16) * 4, indexing="ij")) +
                    [np.full((16, 16), 90)], -1).astype(np.uint8)   # JPEG keeps it closely
  buf = io.BytesIO()
  Image.fromarray(smooth).save(buf, format="JPEG", quality=95)
  jpeg = tfds_world.decode_frame(buf.getvalue())
  assert jpeg.shape == smooth.shape and np.abs(jpeg.astype(int) - smooth).mean() < 3
  with pytest.raises(ValueError, match="cannot decode"):
    tfds_world.decode_frame(b"not an image")
  with pytest.raises(ValueError, match="dtype float32"):
    tfds_world.decode_frame(np.zeros((2, 2, 3), np.float32))


@pytest.mark.parametrize("kwargs,message", [
    (dict(name="no_such_dataset"),
     r"--tfds_name='no_such_dataset': not prepared in --tfds_data_dir=.*aapt_tfds_ids/1.0.0"),
    (dict(name="aapt_tfds_ids", video="steps/observation/rgb"),
     r"(?s)--tfds_video='steps/observation/rgb': .* no such feature.*\n"
     r"  steps/observation/image: Tensor\(12, 20, 3\) uint8"),
    (dict(name="aapt_tfds_ids", video="steps/action"), r"--tfds_video='steps/action': not a video"),
    (dict(name="aapt_tfds_ids", video="episode_metadata/file_path"),
     r"--tfds_video=.*one value per episode"),
    (dict(name="aapt_tfds_ids", video="steps/observation/state"),
     r"--tfds_video='steps/observation/state': not a video \(Tensor\(2,\) float32"),
    (dict(name="aapt_tfds_ids", action="steps/language_instruction"),
     r"--tfds_action='steps/language_instruction': Text is not an action.*--tfds_action=''"),
    (dict(name="aapt_tfds_ids", action="steps/act"), r"--tfds_action='steps/act'.*no such"),
    (dict(name="aapt_tfds_ids", caption="steps/action"), r"--tfds_caption=.*not a Text"),
    (dict(name="aapt_tfds_ids", split="test"), r"--tfds_split='test'.*splits of .*: train"),
    (dict(name="aapt_tfds_video"), r"(?s)--tfds_video='steps/observation/image'.*no such.*\n"
                                   r"  frames: Sequence of Image"),
])
def test_user_errors_name_the_flag(data_dir, tmp_path, kwargs, message):
  with pytest.raises(ValueError, match=message):
    prepare_tfds(str(tmp_path / "x"), data_dir=data_dir, progress=False, **kwargs)
  assert not os.path.exists(tmp_path / "x")  # checked before anything is written


def test_a_video_feature_needs_tensorflow(data_dir, tmp_path):
  """tfds makes a Video feature with tf.dtypes: a dataset with one (here the
  episode-level dataset with its features.json edited to say Video) cannot be
  read without TensorFlow, and the error says so."""
  import shutil
  try:
    import tensorflow  # noqa: F401
    pytest.skip("TensorFlow is installed")
  except ImportError:
    pass
  shutil.copytree(os.path.join(data_dir, "aapt_tfds_video"), tmp_path / "aapt_tfds_video")
  path = tmp_path / "aapt_tfds_video" / "1.0.0" / "features.json"
  spec = json.loads(path.read_text())
  spec["featuresDict"]["features"]["frames"] = {
      "pythonClassName": "tensorflow_datasets.core.features.video_feature.Video",
      "video": {"shape": {"dimensions": ["-1", str(H), str(W), "3"]}, "dtype": "uint8",
                "encodingFormat": "png"}}
  path.write_text(json.dumps(spec))
  with pytest.raises(ValueError, match="--tfds_name='aapt_tfds_video': .*without TensorFlow"):
    tfds_world.TfdsEpisodes("aapt_tfds_video", data_dir=str(tmp_path), video="frames")


def test_a_tfrecord_dataset_is_a_clear_error(data_dir, tmp_path):
  """TFRecord (how Open X-Embodiment is stored on GCS) has no random access:
  tfds.data_source refuses it (its dataset_info.json edited to say so here)."""
  import shutil
  shutil.copytree(os.path.join(data_dir, "aapt_tfds_ids"), tmp_path / "aapt_tfds_ids")
  path = tmp_path / "aapt_tfds_ids" / "1.0.0" / "dataset_info.json"
  info = json.loads(path.read_text())
  info["fileFormat"] = "tfrecord"
  path.write_text(json.dumps(info))
  with pytest.raises(ValueError, match="--tfds_name='aapt_tfds_ids': .* not ArrayRecord"):
    tfds_world.TfdsEpisodes("aapt_tfds_ids", data_dir=str(tmp_path))


def _run_script(*args):
  return subprocess.run([sys.executable, "launch/prepare_data.py", "--world=tfds", *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_prepare_data_script(data_dir, tmp_path):
  out = str(tmp_path / "script")
  r = _run_script("--tfds_name=aapt_tfds_controls", f"--tfds_data_dir={data_dir}",
                  "--tfds_split=train[:2]", "--clip_frames=8", f"--size={SIZE}", f"--out={out}")
  assert r.returncode == 0, r.stderr
  assert "tfds/aapt_tfds_controls: wrote 2 clips" in r.stdout
  meta = json.load(open(os.path.join(out, "metadata.json")))
  assert meta["counts"]["episodes"] == 2 and meta["action_kind"] == "controls"
  r = _run_script("--tfds_name=aapt_tfds_controls", f"--tfds_data_dir={data_dir}",
                  "--tfds_video=steps/observation/depth", f"--out={tmp_path}/y")
  assert r.returncode == 2 and "Traceback" not in r.stderr
  assert r.stderr.startswith("prepare_data: error: --tfds_video='steps/observation/depth'")


def test_a_tiny_config_trains_on_the_records(data_dir, tmp_path):
  """Stage 1 (diffusion), two steps, on the recorded controls dataset."""
  from aapt_jax import load_config
  from aapt_jax.training.trainer import Trainer
  out = str(tmp_path / "records")
  prepare_tfds(out, name="aapt_tfds_controls", data_dir=data_dir, clip_frames=5,
                       clip_stride=1, size=SIZE, progress=False)
  config = load_config(config_path("tiny.py"), {
      "data.path": out, "data.world": "", "data.frame_size": SIZE,
      "data.space_to_depth": 4, "model.latent_channels": 48, "model.text_dim": 0,
      "model.num_actions": 0, "model.control_dim": 3, "train.steps": 2,
      "train.batch_size": 8, "mesh.data": 2, "mesh.fsdp": 4, "mesh.tensor": 1,
      "checkpoint.every_steps": 2})
  summary = Trainer(config, str(tmp_path / "run")).run()
  assert summary["stage"] == "diffusion" and summary["step"] == 2
  assert np.isfinite(summary["final_loss"])
