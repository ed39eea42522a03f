"""TFDS datasets, RLDS episodes in particular, as recorded episodes (no TensorFlow).

    episodes = TfdsEpisodes("my_robot_data", data_dir="~/tensorflow_datasets",
                            split="train", size=64)
    ep = episodes.episode(0)  # {"video": uint8 [T, 64, 64, 3], "controls": [T, A], "text": ...}

A dataset, not a simulator: it is not in the worlds' REGISTRY (nothing can be
played or replayed); `prepare_tfds.prepare_tfds` records it like a world's
episodes. The dataset must be prepared in `data_dir` in a random-access
format (ArrayRecord: ``tfds build --file_format=array_record``); it is read
through the builder's ``as_data_source`` (what `tfds.data_source` returns),
the builder made from the dataset's files alone (its code need not be
importable), and never downloaded.

Feature paths name features by their keys joined with "/". A path through a
``tfds.features.Dataset`` (RLDS's ``steps``) is read step by step: frame i is
step i. Without one the path must name a per-frame sequence (a ``Sequence``
feature, a feature under a ``Sequence`` of dicts, or a ``Tensor`` whose
first axis is time). The defaults are RLDS's (Open X-Embodiment):

* video ``steps/observation/image`` (``RLDS_VIDEO``): per frame an ``Image``
  (uint8; gray, RGB or RGBA) or a uint8 ``Tensor`` [H, W, C]; frames are
  center-cropped to the aspect of `size` and area-resized
  (`image_utils.center_crop_resize`), gray ones repeated to RGB, alpha dropped;
* action ``steps/action`` (``RLDS_ACTION``; "" = none): an integer, bool or
  ``ClassLabel`` scalar per frame becomes an action id (``actions`` int32 [T];
  ``num_actions`` = the ClassLabel's classes, else the largest id + 1);
  anything numeric else -- a float scalar, a vector [A], or a dict of those,
  concatenated in the dataset's key order -- becomes ``controls`` float32
  [T, A] (``control_dim`` A, ``control_names`` "key/index");
* caption ``steps/language_instruction`` (``RLDS_CAPTION``) when the dataset
  has it (None = that default if present; "" = none): a ``Text`` feature per
  step (the episode's caption is its first non-empty step's) or per episode.

Alignment: RLDS step t holds the observation seen before action t is taken,
so action t shows in frame t + 1, while the records want ``actions[i]`` to
be the action whose effect frame i shows. With ``action_shift=1`` (the
default) ``actions[i]`` is the dataset's action i - 1 and ``actions[0]`` is
0 (id 0, or zero controls: nothing recorded produced the first frame); the
last step's action is dropped. ``action_shift=0`` keeps them as they are.

What tfds does without TensorFlow (tensorflow-datasets 4.9.10; tests/test_tfds_world.py
builds and reads each of these unless said otherwise):

* it builds ArrayRecord datasets of ``Tensor``, ``ClassLabel``, ``Text``,
  ``FeaturesDict``, ``Sequence`` and ``Dataset`` (RLDS ``steps``) features,
  and of ``Image`` features given encoded PNG bytes per image (JPEG bytes,
  PIL images and image files take the same path in tfds' source, not
  tested); an ``Image`` given as a numpy array needs TF (tf.image.encode_png);
* it reads all of these through `tfds.data_source`. ``Image`` features at
  the top level or in ``steps`` are read with ``tfds.decode.SkipDecoding()``
  -- all of them, so a robot dataset's unused cameras cost no decoding --
  and the chosen one's PNG/JPEG bytes are decoded here with Pillow
  (`decode_frame`; JPEG tested on its own). An ``Image`` inside a
  ``Sequence`` cannot be skipped (tfds' numpy path has no batched
  SkipDecoding): tfds decodes those itself, with Pillow (OpenCV if installed);
* it cannot make a ``Video`` feature (``tfds.features.Video`` calls
  ``tf.dtypes``), so a dataset with one cannot be opened here (a clear
  --tfds_name error), nor read TFRecord files (no random access; Open
  X-Embodiment is TFRecord on GCS): those must be converted to ArrayRecord
  once with TensorFlow (``tfds convert_format``).
"""
from __future__ import annotations

import dataclasses
import io
import os
from typing import Any

import numpy as np

from aapt_jax.image_utils import center_crop_resize

RLDS_VIDEO = "steps/observation/image"
RLDS_ACTION = "steps/action"
RLDS_CAPTION = "steps/language_instruction"


def _tfds():
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:  # pragma: no cover - tensorflow-datasets is in install_requires
    raise ImportError("the tfds world needs tensorflow-datasets: "
                      "pip install tensorflow-datasets") from e
  return tfds


@dataclasses.dataclass(frozen=True)
class Field:
  """Where one feature path leads. `steps` are the keys from an episode to
  its Dataset of steps (None: the path has none), `keys` the keys from the
  episode -- or from one step -- to the value, `feature` the feature the
  path names and `frame` the feature of one frame's value (None: one value
  per episode)."""
  path: str
  steps: tuple[str, ...] | None
  keys: tuple[str, ...]
  feature: Any
  frame: Any


def _describe(feature) -> str:
  F = _tfds().features
  if isinstance(feature, F.Image):
    return f"Image{tuple(feature.shape)} {np.dtype(feature.np_dtype).name}"
  if isinstance(feature, F.ClassLabel):
    return f"ClassLabel({feature.num_classes} classes)"
  if isinstance(feature, F.Text):
    return "Text"
  if isinstance(feature, F.Sequence):
    return f"Sequence of {_describe(feature.feature)}"
  if isinstance(feature, F.Tensor):
    return f"Tensor{tuple(feature.shape)} {np.dtype(feature.np_dtype).name}"
  return type(feature).__name__


def feature_paths(features, prefix: str = "") -> list[str]:
  """"path: description" of every leaf feature of a FeaturesDict, through
  Datasets and Sequences of dicts."""
  F = _tfds().features
  if isinstance(features, F.Sequence) and isinstance(features.feature, F.FeaturesDict):
    features = features.feature
  if not isinstance(features, F.FeaturesDict):
    return [f"{prefix}: {_describe(features)}"]
  out = []
  for key in features.keys():
    out += feature_paths(features[key], f"{prefix}/{key}" if prefix else key)
  return out


def resolve(features, path: str, flag: str, dataset: str) -> Field:
  """The `Field` of `path` in `features`; ValueError naming `--flag` and
  listing the dataset's feature paths when there is no such feature."""
  F = _tfds().features
  parts = tuple(p for p in path.split("/") if p)
  feature, steps, stacked = features, None, False
  for i, key in enumerate(parts):
    if isinstance(feature, F.Dataset):
      if steps is not None:
        raise ValueError(f"--{flag}={path!r}: a Dataset inside a Dataset is not supported")
      steps, feature = parts[:i], feature.feature
    elif isinstance(feature, F.Sequence) and isinstance(feature.feature, F.FeaturesDict):
      stacked, feature = True, feature.feature
    if not isinstance(feature, F.FeaturesDict) or key not in feature.keys():
      listing = "\n  ".join(feature_paths(features))
      raise ValueError(f"--{flag}={path!r}: {dataset} has no such feature; its features "
                       f"are:\n  {listing}")
    feature = feature[key]
  if not parts:
    raise ValueError(f"--{flag}: empty feature path")
  if steps is not None:
    return Field(path, steps, parts[len(steps):], feature, feature)
  if stacked:
    return Field(path, None, parts, feature, feature)
  if isinstance(feature, F.Sequence) and not isinstance(feature, F.Dataset):
    return Field(path, None, parts, feature, feature.feature)
  if (type(feature) is F.Tensor and len(feature.shape) >= 1):  # time on the first axis
    frame = F.Tensor(shape=tuple(feature.shape[1:]), dtype=feature.np_dtype)
    return Field(path, None, parts, feature, frame)
  return Field(path, None, parts, feature, None)


def _is_image(feature) -> bool:
  """An Image feature or a uint8 Tensor [H, W] / [H, W, 1|3|4] of uint8."""
  F = _tfds().features
  shape = tuple(getattr(feature, "shape", ()) or ())
  if isinstance(feature, F.Image):
    return np.dtype(feature.np_dtype) == np.uint8 and shape[-1] in (None, 1, 3, 4)
  return (type(feature) is F.Tensor and np.dtype(feature.np_dtype) == np.uint8 and
          (len(shape) == 2 or (len(shape) == 3 and shape[-1] in (None, 1, 3, 4))))


def _numeric_leaves(feature, name: str) -> list[tuple[str, Any]] | None:
  """(name, feature) of every leaf of an action feature (a dict of them, in
  key order), when each leaf's value per frame is a number or a vector of
  numbers (bool included); None otherwise."""
  F = _tfds().features
  if isinstance(feature, F.FeaturesDict):
    out = []
    for key in feature.keys():
      leaves = _numeric_leaves(feature[key], f"{name}/{key}" if name else key)
      if leaves is None:
        return None
      out += leaves
    return out
  if not isinstance(feature, F.Tensor) or isinstance(feature, F.Text):
    return None
  dtype, shape = np.dtype(feature.np_dtype), tuple(feature.shape)
  numeric = np.issubdtype(dtype, np.number) or dtype == np.bool_
  if numeric and (shape == () or (len(shape) == 1 and shape[0] is not None)):
    return [(name, feature)]
  return None


def decode_frame(value) -> np.ndarray:
  """One frame as uint8 [H, W, 3]: PNG/JPEG bytes decoded with Pillow, or
  a uint8 array [H, W], [H, W, 1] (repeated to RGB), [H, W, 3] or
  [H, W, 4] (alpha dropped). ValueError for anything else."""
  if isinstance(value, (bytes, np.bytes_)):
    from PIL import Image
    try:
      with Image.open(io.BytesIO(value)) as image:
        return np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
      raise ValueError(f"cannot decode an encoded image ({e})") from None
  frame = np.asarray(value)
  if frame.dtype != np.uint8:
    raise ValueError(f"frame dtype {frame.dtype.name}, expected uint8")
  if frame.ndim == 2:
    frame = frame[..., None]
  if frame.ndim != 3 or frame.shape[-1] not in (1, 3, 4):
    raise ValueError(f"frame shape {frame.shape}, expected [H, W] or [H, W, 1|3|4]")
  if frame.shape[-1] == 1:
    return np.repeat(frame, 3, axis=-1)
  return frame[..., :3]


def _skip_image_decoding(feature):
  """tfds decoders that leave every Image of `feature` (at the top level or
  in a Dataset; tfds cannot skip them inside a Sequence) encoded; None if
  there are none."""
  F = _tfds().features
  if isinstance(feature, F.Image):
    return _tfds().decode.SkipDecoding()
  if isinstance(feature, F.Dataset):
    return _skip_image_decoding(feature.feature)
  if isinstance(feature, F.FeaturesDict):
    tree = {k: _skip_image_decoding(feature[k]) for k in feature.keys()}
    tree = {k: v for k, v in tree.items() if v is not None}
    return tree or None
  return None


def _get(value, keys: tuple[str, ...]):
  for key in keys:
    value = value[key]
  return value


def _frame(value, i: int):
  """Frame i of a per-frame value: of every leaf of a dict of stacked values
  (what a Sequence of dicts decodes to), else value[i]."""
  if isinstance(value, dict):
    return {k: _frame(v, i) for k, v in value.items()}
  return value[i]


def _length(value) -> int:
  if isinstance(value, dict):
    return min(_length(v) for v in value.values())
  return len(value)


class TfdsEpisodes:
  """The episodes of one split of a prepared TFDS dataset, as frames,
  actions or controls and a caption (see the module docstring).

  Args:
    name: the dataset ("name", "name/config", "name:1.0.0"), found in
      `data_dir` by its files.
    data_dir: the directory it is prepared in ("" = TFDS_DATA_DIR or
      ~/tensorflow_datasets).
    split: a split, with tfds' slicing ("train", "train[:100]").
    video, action, caption: feature paths ("" = none for action and
      caption; caption None = ``RLDS_CAPTION`` if the dataset has it).
    size: frames are cropped and resized to `size x size` (int) or (h, w).
    action_shift: dataset actions move this many frames later (0 or 1).
    max_frames: cap on the frames read per episode (None: all).

  Every error a user can cause raises ValueError naming the flag
  (--tfds_name, --tfds_split, --tfds_video, --tfds_action, --tfds_caption).
  `episode(i)` raises ValueError for a bad episode (undecodable image,
  lengths that disagree, a negative action id).
  """

  def __init__(self, name: str, *, data_dir: str = "", split: str = "train",
               video: str = RLDS_VIDEO, action: str = RLDS_ACTION,
               caption: str | None = None, size: int | tuple[int, int] = 64,
               action_shift: int = 1, max_frames: int | None = None):
    tfds = _tfds()
    self.name, self.split = name, split
    self.size = (size, size) if isinstance(size, int) else tuple(size)
    if action_shift not in (0, 1):
      raise ValueError(f"--tfds_action_shift must be 0 or 1, got {action_shift}")
    self.action_shift, self.max_frames = int(action_shift), max_frames
    builder = self._builder(name, data_dir)
    self.data_dir = str(builder.data_dir)
    self.version = str(builder.info.version)
    features = builder.info.features
    where = f"dataset {name!r}"
    self.video = resolve(features, video, "tfds_video", where)
    if self.video.frame is None or not _is_image(self.video.frame):
      what = ("one value per episode, not one per frame" if self.video.frame is None
              else _describe(self.video.frame) + " per frame")
      images = [p for p in feature_paths(features)
                if p.split(": ")[1].startswith(("Image", "Sequence of Image"))]
      raise ValueError(f"--tfds_video={video!r}: not a video ({what}); name per-frame "
                       "uint8 images (an Image feature or a uint8 Tensor [H, W, 3])" +
                       (f"; image features of {name}: {', '.join(images)}" if images else ""))
    self.action = resolve(features, action, "tfds_action", where) if action else None
    self._check_action()
    if caption is None:  # the RLDS default, where the dataset has it
      caption = RLDS_CAPTION if any(p.startswith(RLDS_CAPTION + ": ")
                                    for p in feature_paths(features)) else ""
    self.caption = resolve(features, caption, "tfds_caption", where) if caption else None
    if self.caption is not None and not isinstance(self.caption.feature, tfds.features.Text):
      raise ValueError(f"--tfds_caption={caption!r}: {_describe(self.caption.feature)} is "
                       "not a Text feature")
    self.max_action_id = -1
    try:
      self._source = builder.as_data_source(split=split,
                                            decoders=_skip_image_decoding(features))
    except (ValueError, KeyError, AssertionError) as e:
      raise ValueError(f"--tfds_split={split!r}: {e} (splits of {name}: "
                       f"{', '.join(builder.info.splits)})") from None
    except NotImplementedError:
      file_format = getattr(builder.info.file_format, "value", builder.info.file_format)
      raise ValueError(f"--tfds_name={name!r}: {builder.data_dir} holds the dataset as "
                       f"{file_format}, not ArrayRecord: convert it once (tfds "
                       f"convert_format --dataset_version_dir={builder.data_dir} "
                       "--out_file_format=array_record, which needs TensorFlow) or "
                       "build it with --file_format=array_record") from None

  @staticmethod
  def _builder(name: str, data_dir: str):
    """The dataset's builder made from its files alone (never its code, never
    a download); ValueError naming --tfds_name or --tfds_data_dir."""
    tfds = _tfds()
    from tensorflow_datasets.core import read_only_builder
    root = os.path.expanduser(data_dir or os.environ.get("TFDS_DATA_DIR",
                                                         "~/tensorflow_datasets"))
    if not os.path.isdir(root):
      raise ValueError(f"--tfds_data_dir={root!r} is not a directory")
    try:
      return read_only_builder.builder_from_files(name, data_dir=root)
    except tfds.core.registered.DatasetNotFoundError:
      pass
    except ImportError as e:  # a Video feature, e.g., is made with tf.dtypes
      raise ValueError(f"--tfds_name={name!r}: tfds cannot read this dataset's features "
                       f"without TensorFlow ({e}); Video features need it") from None
    except ValueError as e:  # a malformed name or version
      raise ValueError(f"--tfds_name={name!r}: {e}") from None
    found = sorted(os.path.relpath(d, root).replace(os.sep, "/")
                   for d, _, files in os.walk(root) if "dataset_info.json" in files)
    raise ValueError(f"--tfds_name={name!r}: not prepared in --tfds_data_dir={root!r} "
                     f"(prepared there: {', '.join(found) or 'nothing'}); build it with "
                     "`tfds build NAME --data_dir=DIR --file_format=array_record` or "
                     "point --tfds_data_dir at the directory holding NAME/VERSION/")

  def _check_action(self) -> None:
    """Sets action_kind ("ids", "controls" or None), num_actions,
    action_names, control_dim, control_names from the action feature."""
    F = _tfds().features
    self.action_kind, self.num_actions, self.action_names = None, 0, []
    self.control_dim, self.control_names = 0, []
    self._leaves: list[tuple[str, Any]] = []
    a = self.action
    if a is None:
      return
    leaves = _numeric_leaves(a.frame, "") if a.frame is not None else None
    if not leaves:
      what = ("one value per episode" if a.frame is None else _describe(a.frame))
      raise ValueError(f"--tfds_action={a.path!r}: {what} is not an action: name an "
                       "integer id, a float vector or a dict of those per frame, or pass "
                       "--tfds_action='' to record no actions")
    kind = lambda f: np.dtype(f.np_dtype)  # noqa: E731
    if len(leaves) == 1 and not leaves[0][1].shape and (
        np.issubdtype(kind(leaves[0][1]), np.integer) or kind(leaves[0][1]) == np.bool_):
      self.action_kind = "ids"
      if isinstance(a.frame, F.ClassLabel):
        self.num_actions, self.action_names = a.frame.num_classes, list(a.frame.names)
      return
    self.action_kind, self._leaves = "controls", leaves
    for leaf_name, f in leaves:
      base = a.path + (f"/{leaf_name}" if leaf_name else "")
      n = f.shape[0] if f.shape else 1
      self.control_names += [f"{base}/{j}" for j in range(n)] if f.shape else [base]
    self.control_dim = len(self.control_names)

  def __len__(self) -> int:
    return len(self._source)

  def describe(self) -> dict[str, Any]:
    """What was read, for metadata.json."""
    return {"name": self.name, "version": self.version, "data_dir": self.data_dir,
            "split": self.split, "video": self.video.path,
            "action": self.action.path if self.action else "",
            "caption": self.caption.path if self.caption else "",
            "action_shift": self.action_shift}

  def _values(self, episode: dict, field: Field, steps: dict) -> Any:
    if field.steps is None:
      return _get(episode, field.keys)
    if field.steps not in steps:
      source = _get(episode, field.steps)  # tfds' lazily decoded steps
      steps[field.steps] = [source[i] for i in range(len(source))]
    return [_get(step, field.keys) for step in steps[field.steps]]

  def episode(self, index: int) -> dict[str, Any]:
    """Episode `index` of the split: ``video`` uint8 [T, h, w, 3], with
    ``actions`` int32 [T] or ``controls`` float32 [T, A] and ``text`` str
    where those features are named."""
    episode, steps = self._source[index], {}
    frames = self._values(episode, self.video, steps)
    n = len(frames) if self.max_frames is None else min(len(frames), self.max_frames)
    if n < 1:
      raise ValueError("no frames")
    video = np.stack([center_crop_resize(decode_frame(frames[i]), self.size)
                      for i in range(n)])                        # [T, h, w, 3]
    out: dict[str, Any] = {"video": video}
    if self.action is not None:
      values = self._values(episode, self.action, steps)
      if _length(values) < n:
        raise ValueError(f"{_length(values)} actions ({self.action.path}) for {n} frames "
                         f"({self.video.path})")
      out.update(self._actions([_frame(values, i) for i in range(n)]))
    if self.caption is not None:
      text = self._values(episode, self.caption, steps)
      texts = list(text) if isinstance(text, (list, np.ndarray)) else [text]
      texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in texts]
      out["text"] = next((t for t in texts if t), "")
    return out

  def _actions(self, values: list) -> dict[str, np.ndarray]:
    """The frames' actions (one value each), moved `action_shift` frames later."""
    n = len(values)
    if self.action_kind == "ids":
      ids = np.asarray([int(v) for v in values], np.int64)          # [n]
      if ids.size and ids.min() < 0:
        raise ValueError(f"negative action id {int(ids.min())} ({self.action.path})")
      if ids.size and ids.max() >= 2**31:
        raise ValueError(f"action id {int(ids.max())} does not fit int32")
      if self.num_actions and ids.size and ids.max() >= self.num_actions:
        raise ValueError(f"action id {int(ids.max())} >= the ClassLabel's "
                         f"{self.num_actions} classes")
      ids = np.concatenate([np.zeros(self.action_shift, np.int64), ids])[:n]
      self.max_action_id = max(self.max_action_id, int(ids.max()))
      return {"actions": ids.astype(np.int32)}
    rows = []
    for v in values:                                              # one frame's action
      parts = [np.asarray(_get(v, tuple(k.split("/"))) if k else v, np.float32).reshape(-1)
               for k, _ in self._leaves]
      rows.append(np.concatenate(parts))
    controls = np.stack(rows)                                     # [n, A]
    if controls.shape[1] != self.control_dim:
      raise ValueError(f"action of {controls.shape[1]} numbers, expected {self.control_dim}")
    controls = np.concatenate([np.zeros((self.action_shift, self.control_dim), np.float32),
                               controls])[:n]
    return {"controls": controls}

  def names(self) -> tuple[int, list[str]]:
    """(num_actions, action_names) once the episodes are read: a ClassLabel's,
    or the largest id seen + 1 and the ids as names."""
    if self.action_kind != "ids":
      return 0, []
    if self.action_names:
      return self.num_actions, self.action_names
    n = self.max_action_id + 1
    return n, [str(i) for i in range(n)]
