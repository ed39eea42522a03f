"""The example schema and ArrayRecord write/read (no TensorFlow).

One example = one clip (or one whole episode), a flat ``dict``:

==================  =========================================  ==========
field               value                                      required
==================  =========================================  ==========
``video``           uint8 ``[T, H, W, 3]``                      one of
``latents``         float16 (or float32) ``[T', h, w, C]``      these two
``fps``             float > 0, video frames per second          yes
``actions``         int32 ``[T']``: one action id per latent     no
                    frame; ``actions[i]`` is the action whose
                    effect frame i shows
``controls``        float32 ``[T', A]``                          no
``text``            str: the clip's caption                     no
``text_embedding``  float32/float16 ``[L, D]``: the caption's L  no
                    (unpadded) token embeddings
``temporal_factor`` int r >= 1: video frames per latent frame    no (1)
                    after the first (``T = 1 + (T' - 1) * r``)
``sink_latents``    float ``[T', h, w, C]``: latent frame j's    no
                    last video frame (r·j) encoded alone as an
                    image: a clip starting at latent j starts
                    from it, as inference starts from an image
``world``, ``game`` str metadata                                no
``episode``         int episode id                              no
``start``           int index of the clip's first frame in its   no
                    episode
``seed``            int seed the episode was recorded with       no
``file``            str the source video's path (relative to     no
                    the recorded folder; data/prepare_videos.py)
==================  =========================================  ==========

When only ``video`` is present, ``T' = 1 + (T - 1) / temporal_factor`` (with
the default ``temporal_factor=1``, one action per video frame, which is what
the pixel-space model uses). Other keys are allowed if their values are
numpy arrays, str, int, float or bool.

Serialisation (``FORMAT``): each record is one msgpack map. Scalars (str,
int, float, bool) are stored as themselves; a numpy array is stored as the map
``{"__ndarray__": True, "dtype": <numpy dtype.str, e.g. "|u1", "<f2">,
"shape": [...], "data": <C-order raw bytes>}``. The map also holds
``"__format__": "aapt-record-v1"``. Files are ArrayRecord written with
``group_size:1`` (one record per chunk, so random access reads only that
record; zstd-compressed) -- grain's random-access requirement.
"""
from __future__ import annotations

import bisect
import glob
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgpack
import numpy as np
from array_record.python import array_record_module

FORMAT = "aapt-record-v1"
WRITER_OPTIONS = "group_size:1"  # zstd:3 compression is ArrayRecord's default
READER_OPTIONS = "readahead_buffer_size:0"  # random access
SUFFIX = ".array_record"

_ND = "__ndarray__"
_FMT = "__format__"
_SCALAR_TYPES = (str, int, float, bool)
_METADATA_TYPES = {"world": str, "game": str, "text": str, "episode": int,
                   "start": int, "seed": int, "temporal_factor": int, "file": str}


# ----------------------------------------------------------------------------
# Serialisation.


def _encode_value(key: str, value: Any) -> Any:
  if isinstance(value, np.ndarray):
    if value.dtype.hasobject:
      raise ValueError(f"field {key!r}: object arrays cannot be serialised")
    value = np.ascontiguousarray(value)
    return {_ND: True, "dtype": value.dtype.str, "shape": list(value.shape),
            "data": value.tobytes()}
  if isinstance(value, np.generic):  # numpy scalar -> Python scalar
    return value.item()
  if isinstance(value, _SCALAR_TYPES):
    return value
  raise ValueError(
      f"field {key!r}: cannot serialise {type(value).__name__}; use a numpy "
      "array, str, int, float or bool")


def serialize_example(example: Mapping[str, Any]) -> bytes:
  """Encodes one example dict to bytes (see the module docstring)."""
  if _FMT in example:
    raise ValueError(f"field name {_FMT!r} is reserved")
  payload = {_FMT: FORMAT}
  for key, value in example.items():
    if not isinstance(key, str):
      raise ValueError(f"field names must be str, got {key!r}")
    payload[key] = _encode_value(key, value)
  return msgpack.packb(payload, use_bin_type=True)


def deserialize_example(data: bytes, source: str = "<bytes>") -> dict[str, Any]:
  """Decodes bytes written by `serialize_example`; arrays are writable copies."""
  try:
    payload = msgpack.unpackb(data, raw=False)
  except Exception as e:  # msgpack raises several exception types
    raise ValueError(f"{source}: not a valid record ({e})") from None
  if not isinstance(payload, dict) or payload.get(_FMT) != FORMAT:
    raise ValueError(f"{source}: not an {FORMAT} record")
  out = {}
  for key, value in payload.items():
    if key == _FMT:
      continue
    if isinstance(value, dict) and value.get(_ND):
      try:
        arr = np.frombuffer(value["data"], dtype=np.dtype(value["dtype"]))
        out[key] = arr.reshape(value["shape"]).copy()
      except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{source}: field {key!r} is corrupt ({e})") from None
    else:
      out[key] = value
  return out


# ----------------------------------------------------------------------------
# Validation.


def _fail(source: str, field: str, message: str):
  raise ValueError(f"{source}: field {field!r}: {message}")


def _check_array(example, source, field, dtypes, ndim):
  value = example[field]
  if not isinstance(value, np.ndarray):
    _fail(source, field, f"expected a numpy array, got {type(value).__name__}")
  if value.dtype not in dtypes:
    names = " or ".join(np.dtype(d).name for d in dtypes)
    _fail(source, field, f"dtype {value.dtype.name}, expected {names}")
  if value.ndim != ndim:
    _fail(source, field, f"shape {value.shape} has ndim {value.ndim}, "
          f"expected {ndim}")
  return value


def num_latent_frames(example: Mapping[str, Any]) -> int:
  """T': the number of latent frames (and of actions) of an example."""
  if "latents" in example:
    return int(example["latents"].shape[0])
  r = int(example.get("temporal_factor", 1))
  return 1 + (int(example["video"].shape[0]) - 1) // r


def validate_example(example: Mapping[str, Any], source: str = "example") -> None:
  """Raises ValueError naming `source` and the field if `example` is malformed.

  `source` names where the example came from, e.g. "clips.array_record[12]".
  Checks: required fields present; dtypes and ndims; frames not empty; the
  actions/controls length equals the number of latent frames T'; video and
  latents agree on T' for the example's temporal_factor.
  """
  if not isinstance(example, Mapping):
    raise ValueError(f"{source}: expected a dict, got {type(example).__name__}")
  if "video" not in example and "latents" not in example:
    _fail(source, "video", "missing required field (need 'video' or 'latents')")
  if "fps" not in example:
    _fail(source, "fps", "missing required field")
  fps = example["fps"]
  if isinstance(fps, bool) or not isinstance(fps, (int, float, np.number)) or not fps > 0:
    _fail(source, "fps", f"expected a positive float, got {fps!r}")
  for field, kind in _METADATA_TYPES.items():
    if field in example:
      value = example[field]
      ok = (isinstance(value, (int, np.integer)) and not isinstance(value, bool)
            if kind is int else isinstance(value, kind))
      if not ok:
        _fail(source, field, f"expected {kind.__name__}, got {type(value).__name__}")
  r = int(example.get("temporal_factor", 1))
  if r < 1:
    _fail(source, "temporal_factor", f"must be >= 1, got {r}")

  t_latent = None
  if "video" in example:
    video = _check_array(example, source, "video", (np.uint8,), 4)
    if video.shape[-1] != 3:
      _fail(source, "video", f"shape {video.shape}: last axis must be 3 (RGB)")
    if video.shape[0] < 1:
      _fail(source, "video", "has no frames")
    if (video.shape[0] - 1) % r:
      _fail(source, "video", f"{video.shape[0]} frames is not 1 + k * "
            f"temporal_factor ({r})")
    t_latent = 1 + (video.shape[0] - 1) // r
  if "latents" in example:
    latents = _check_array(example, source, "latents", (np.float16, np.float32), 4)
    if latents.shape[0] < 1:
      _fail(source, "latents", "has no frames")
    if t_latent is not None and latents.shape[0] != t_latent:
      _fail(source, "latents", f"{latents.shape[0]} latent frames but video has "
            f"{example['video'].shape[0]} frames (expected {t_latent} latent "
            f"frames for temporal_factor {r})")
    t_latent = latents.shape[0]
  if "sink_latents" in example:
    sink = _check_array(example, source, "sink_latents", (np.float16, np.float32), 4)
    if "latents" not in example or sink.shape != example["latents"].shape:
      _fail(source, "sink_latents", f"shape {sink.shape} must equal the latents' shape "
            f"{getattr(example.get('latents'), 'shape', None)}")
  what = "latents" if "latents" in example else "video"
  if "actions" in example:
    actions = _check_array(example, source, "actions", (np.int32,), 1)
    if actions.shape[0] != t_latent:
      _fail(source, "actions", f"length {actions.shape[0]} != {t_latent} latent "
            f"frames of {what!r}")
    if actions.size and actions.min() < 0:
      _fail(source, "actions", f"negative action id {int(actions.min())}")
  if "controls" in example:
    controls = _check_array(example, source, "controls", (np.float32,), 2)
    if controls.shape[0] != t_latent:
      _fail(source, "controls", f"length {controls.shape[0]} != {t_latent} "
            f"latent frames of {what!r}")
  if "text_embedding" in example:
    _check_array(example, source, "text_embedding", (np.float32, np.float16), 2)
  for key, value in example.items():
    if not isinstance(value, (np.ndarray, np.generic) + _SCALAR_TYPES):
      _fail(source, key, f"unsupported type {type(value).__name__}")


# ----------------------------------------------------------------------------
# Files.


def shard_paths(path: str, num_shards: int = 1) -> list[str]:
  """The files `write_records(path, ..., num_shards)` writes.

  A `path` ending in ".array_record" with num_shards == 1 is used as is;
  otherwise `{path}-00000-of-00004.array_record` style (suffix stripped).
  """
  if num_shards < 1:
    raise ValueError(f"num_shards must be >= 1, got {num_shards}")
  if num_shards == 1 and path.endswith(SUFFIX):
    return [path]
  base = path[: -len(SUFFIX)] if path.endswith(SUFFIX) else path
  return [f"{base}-{i:05d}-of-{num_shards:05d}{SUFFIX}" for i in range(num_shards)]


class RecordWriter:
  """Streams examples to `shard_paths(path, num_shards)`; example k goes to
  shard k % num_shards. Use as a context manager (or call `close`)."""

  def __init__(self, path: str, num_shards: int = 1, *, validate: bool = True,
               options: str = WRITER_OPTIONS):
    self.paths = shard_paths(path, num_shards)
    self.validate = validate
    self.count = 0
    os.makedirs(os.path.dirname(os.path.abspath(self.paths[0])), exist_ok=True)
    self._writers = []
    try:
      for p in self.paths:
        self._writers.append(array_record_module.ArrayRecordWriter(p, options))
    except Exception as e:
      self.close()
      raise ValueError(f"cannot write {p}: {e}") from None

  def write(self, example: Mapping[str, Any], source: str | None = None) -> None:
    """Validates (naming `source`, default "<path> example <k>") and writes."""
    if self.validate:
      validate_example(example, source=source or f"{self.paths[0]} example {self.count}")
    data = serialize_example(example)
    self._writers[self.count % len(self._writers)].write(data)
    self.count += 1

  def close(self) -> None:
    for w in self._writers:
      w.close()
    self._writers = []

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def write_records(path: str, examples: Iterable[Mapping[str, Any]], *,
                  num_shards: int = 1, validate: bool = True,
                  options: str = WRITER_OPTIONS) -> list[str]:
  """Writes examples to ArrayRecord file(s) (see `shard_paths`); returns the
  paths. `examples` may be a generator. With `validate`, a malformed example
  raises ValueError naming its index."""
  with RecordWriter(path, num_shards, validate=validate, options=options) as w:
    for example in examples:
      w.write(example)
  return w.paths


def resolve_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
  """Expands a file, a glob pattern, a directory (all its *.array_record) or a
  list of those to a sorted list of files; FileNotFoundError if none."""
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  out = []
  for p in paths:
    p = os.fspath(p)
    if os.path.isdir(p):
      found = sorted(glob.glob(os.path.join(p, "*" + SUFFIX)))
    elif any(c in p for c in "*?["):
      found = sorted(glob.glob(p))
    else:
      found = [p] if os.path.exists(p) else []
    if not found:
      raise FileNotFoundError(f"no ArrayRecord files at {p!r}")
    out.extend(found)
  return out


def read_record(path: str, index: int) -> dict[str, Any]:
  """Reads and decodes record `index` of one file."""
  return RecordSource(path)[index]


class RecordSource:
  """A grain random-access source of decoded examples over one or many files.

  `RecordSource("DIR/clips-*.array_record")[i]` is a dict (see the module
  docstring). Readers are opened lazily per file; the object pickles (for
  grain worker processes) without its open readers.
  """

  def __init__(self, paths, *, validate: bool = False):
    self.paths = resolve_paths(paths)
    self.validate = validate
    counts = []
    for p in self.paths:
      reader = self._open(p)
      try:
        counts.append(reader.num_records())
        reader.close()
      except Exception as e:  # the C++ reader raises RuntimeError
        raise ValueError(f"{p}: not a readable ArrayRecord file ({e})") from None
    self._ends = list(np.cumsum(counts).tolist())
    self._readers = [None] * len(self.paths)
    self._lock = threading.Lock()

  @staticmethod
  def _open(path):
    try:
      return array_record_module.ArrayRecordReader(path, READER_OPTIONS)
    except Exception as e:  # the C++ reader raises RuntimeError/ValueError
      raise ValueError(f"{path}: not a readable ArrayRecord file ({e})") from None

  def __len__(self) -> int:
    return self._ends[-1] if self._ends else 0

  def _locate(self, index: int) -> tuple[int, int]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"record {index} out of range [0, {len(self)})")
    f = bisect.bisect_right(self._ends, index)
    return f, index - (self._ends[f - 1] if f else 0)

  def locate(self, index: int) -> tuple[str, int]:
    """(file, position in that file) of global record `index`."""
    f, pos = self._locate(index)
    return self.paths[f], pos

  def read_bytes(self, index: int) -> bytes:
    f, pos = self._locate(index)
    if self._readers[f] is None:
      with self._lock:
        if self._readers[f] is None:
          self._readers[f] = self._open(self.paths[f])
    try:
      return self._readers[f].read([pos])[0]
    except Exception as e:  # the C++ reader raises RuntimeError
      raise ValueError(f"{self.paths[f]}[{pos}]: cannot read record ({e})") from None

  def __getitem__(self, index: int) -> dict[str, Any]:
    path, pos = self.locate(index)
    source = f"{path}[{pos}]"
    example = deserialize_example(self.read_bytes(index), source=source)
    if self.validate:
      validate_example(example, source=source)
    return example

  def __iter__(self):
    for i in range(len(self)):
      yield self[i]

  def __getstate__(self):
    state = self.__dict__.copy()
    state["_readers"] = [None] * len(self.paths)
    del state["_lock"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def close(self):
    for i, r in enumerate(self._readers):
      if r is not None:
        r.close()
        self._readers[i] = None

  def __repr__(self):
    return f"RecordSource({len(self.paths)} files, {len(self)} records)"
