"""Records (schema, ArrayRecord round trip, validation) and the grain pipeline."""
import pickle

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from aapt_jax import parallel
from aapt_jax.data import pipeline, records


def _example(i, T=12, size=8, **extra):
  rng = np.random.default_rng(i)
  ex = {
      "video": rng.integers(0, 256, (T, size, size, 3), dtype=np.uint8),
      # actions[t] = 100 * record id + t: identifies the record and the crop.
      "actions": (100 * i + np.arange(T)).astype(np.int32),
      "fps": 15.0, "world": "atari", "game": "Pong", "episode": i, "start": 0,
  }
  ex.update(extra)
  return ex


def _assert_same(a, b):
  assert set(a) == set(b)
  for k in a:
    if isinstance(a[k], np.ndarray):
      assert a[k].dtype == b[k].dtype, k
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    else:
      assert a[k] == b[k] and type(a[k]) is type(b[k]), k


# ----------------------------------------------------------------------------
# Records.


def test_records_round_trip_sharded(tmp_path):
  rng = np.random.default_rng(0)
  examples = [_example(i) for i in range(4)]
  examples.append({  # a latent-space example with every optional field
      "latents": rng.standard_normal((5, 4, 4, 16)).astype(np.float16),
      "actions": np.arange(5, dtype=np.int32),
      "controls": rng.standard_normal((5, 3)).astype(np.float32),
      "text": "a red car, ünïcode", "text_embedding":
      rng.standard_normal((7, 6)).astype(np.float32),
      "fps": 24.0, "episode": 4, "seed": 123, "temporal_factor": 4,
  })
  paths = records.write_records(str(tmp_path / "clips"), examples, num_shards=2)
  assert [p.rsplit("/", 1)[1] for p in paths] == [
      "clips-00000-of-00002.array_record", "clips-00001-of-00002.array_record"]
  src = records.RecordSource(str(tmp_path / "clips-*.array_record"), validate=True)
  assert len(src) == 5
  got = {ex["episode"]: ex for ex in src}
  for ex in examples:
    _assert_same(ex, got[ex["episode"]])
  # Round robin: shard 0 holds examples 0, 2, 4; global index 3 is shard 1's first.
  assert src.locate(3) == (paths[1], 0)
  _assert_same(records.read_record(paths[1], 1), examples[3])
  # Decoded arrays are writable copies; the source pickles (grain workers).
  got[0]["video"][0, 0, 0, 0] = 1
  src2 = pickle.loads(pickle.dumps(src))
  _assert_same(src2[0], src[0])


def test_records_single_file_and_directory(tmp_path):
  path = str(tmp_path / "one.array_record")
  assert records.write_records(path, [_example(0)]) == [path]
  _assert_same(records.RecordSource(str(tmp_path))[0], _example(0))
  with pytest.raises(FileNotFoundError, match="no ArrayRecord files"):
    records.RecordSource(str(tmp_path / "missing-*.array_record"))


_BAD = [
    ("video", lambda e: e.update(video=e["video"].astype(np.float32)), "dtype float32"),
    ("video", lambda e: e.update(video=e["video"][0]), "ndim 3"),
    ("video", lambda e: e.update(video=e["video"][..., :1]), "last axis must be 3"),
    ("video", lambda e: e.pop("video"), "missing required field"),
    ("fps", lambda e: e.pop("fps"), "missing required field"),
    ("fps", lambda e: e.update(fps=-1.0), "positive"),
    ("actions", lambda e: e.update(actions=e["actions"][:-1]), "length 11 != 12"),
    ("actions", lambda e: e.update(actions=e["actions"].astype(np.int64)), "dtype int64"),
    ("controls", lambda e: e.update(controls=np.zeros((12,), np.float32)), "ndim 1"),
    ("controls", lambda e: e.update(controls=np.zeros((11, 2), np.float32)), "length 11"),
    ("latents", lambda e: e.update(latents=np.zeros((11, 2, 2, 4), np.float16)),
     "11 latent frames but video has 12"),
    ("latents", lambda e: e.update(latents=np.zeros((12, 2, 2, 4), np.uint8)), "dtype uint8"),
    ("text_embedding", lambda e: e.update(text_embedding=np.zeros(4, np.float32)), "ndim 1"),
    ("episode", lambda e: e.update(episode="3"), "expected int"),
    ("text", lambda e: e.update(text=3), "expected str"),
]


@pytest.mark.parametrize("field,corrupt,message", _BAD)
def test_validate_example_names_field_and_source(field, corrupt, message):
  records.validate_example(_example(0), source="f.array_record[7]")  # good one
  ex = _example(0)
  corrupt(ex)
  with pytest.raises(ValueError) as info:
    records.validate_example(ex, source="f.array_record[7]")
  text = str(info.value)
  assert "f.array_record[7]" in text and repr(field) in text and message in text, text


def test_validate_temporal_factor():
  ex = _example(0, T=9, temporal_factor=4)
  ex["actions"] = np.zeros(3, np.int32)  # 1 + (9 - 1) / 4 latent frames
  records.validate_example(ex)
  ex["video"] = ex["video"][:8]
  with pytest.raises(ValueError, match="'video'.*not 1 \\+ k"):
    records.validate_example(ex)


def test_write_records_rejects_bad_example_by_index(tmp_path):
  bad = _example(1)
  bad["actions"] = bad["actions"][:3]
  with pytest.raises(ValueError, match=r"example 1: field 'actions'"):
    records.write_records(str(tmp_path / "x"), [_example(0), bad])


def test_corrupt_records_name_the_source(tmp_path):
  with pytest.raises(ValueError, match="bad.bin: not a valid record"):
    records.deserialize_example(b"\xc1garbage", source="bad.bin")
  not_ar = tmp_path / "junk.array_record"
  not_ar.write_bytes(b"not an array record file at all" * 10)
  with pytest.raises(ValueError, match="junk.array_record"):
    records.RecordSource(str(not_ar))


# ----------------------------------------------------------------------------
# Pixel-space latents.


def test_pixels_to_latents_exact_round_trip_and_layout():
  frames = np.arange(2 * 8 * 8 * 3 * 3, dtype=np.int64).reshape(6, 8, 8, 3) % 256
  frames = frames.astype(np.uint8)
  frames[0] = np.arange(256).repeat(3)[: 8 * 8 * 3].reshape(8, 8, 3)  # extremes
  frames[1, 0, 0] = 255
  frames[1, 0, 1] = 0
  lat = pipeline.pixels_to_latents(frames, space_to_depth=4)
  assert lat.shape == (6, 2, 2, 48) and lat.dtype == np.float32
  assert lat.min() >= -1.0 and lat.max() <= 1.0
  # Channel (dy * s + dx) * 3 + c of latent pixel (i, j) = pixel (4i+dy, 4j+dx, c).
  t, i, j, dy, dx, c = 3, 1, 0, 2, 3, 1
  assert lat[t, i, j, (dy * 4 + dx) * 3 + c] == np.float32(
      frames[t, 4 * i + dy, 4 * j + dx, c] / 127.5 - 1.0)
  np.testing.assert_array_equal(pipeline.latents_to_pixels(lat, 4), frames)
  every = np.arange(256, dtype=np.uint8).reshape(1, 4, 64, 1).repeat(3, -1)
  np.testing.assert_array_equal(
      pipeline.latents_to_pixels(pipeline.pixels_to_latents(every, 2), 2), every)
  batched = np.stack([frames, frames[::-1]])  # leading dims [B, T]
  np.testing.assert_array_equal(pipeline.pixels_to_latents(batched)[1], lat[::-1])
  with pytest.raises(ValueError, match="not divisible"):
    pipeline.pixels_to_latents(frames[:, :6], 4)


# ----------------------------------------------------------------------------
# The grain pipeline.


def _dataset(examples, **kw):
  args = dict(clip_frames=5, batch_size=2, seed=0, process_index=0,
              process_count=1, space_to_depth=4)
  args.update(kw)
  return pipeline.make_dataset(examples, **args)


def _take(ds_or_it, n):
  it = iter(ds_or_it)
  return [next(it) for _ in range(n)]


def test_batches_shapes_and_crops_match_source():
  examples = [_example(i) for i in range(6)]
  batch = _take(_dataset(examples), 1)[0]
  assert set(batch) == {"latents", "actions"}
  assert batch["latents"].shape == (2, 5, 2, 2, 48)
  assert batch["latents"].dtype == np.float32 and batch["actions"].dtype == np.int32
  for b in range(2):
    rec, start = divmod(int(batch["actions"][b, 0]), 100)
    np.testing.assert_array_equal(batch["actions"][b], 100 * rec + start + np.arange(5))
    np.testing.assert_array_equal(  # the frames are the crop of the same record
        pipeline.latents_to_pixels(batch["latents"][b]),
        examples[rec]["video"][start:start + 5])


def test_pipeline_deterministic_per_seed_and_differs_across_seeds():
  examples = [_example(i) for i in range(8)]
  a = _take(_dataset(examples, seed=1), 8)
  b = _take(_dataset(examples, seed=1), 8)
  c = _take(_dataset(examples, seed=2), 8)
  for x, y in zip(a, b):
    _assert_same(x, y)
  ids = lambda bs: [a for x in bs for a in x["actions"][:, 0].tolist()]
  assert ids(a) != ids(c)
  # Every epoch (4 batches of 2) is a permutation of the 8 records, and epochs
  # are reshuffled and re-cropped.
  epochs = [[i // 100 for i in ids(a)[k:k + 8]] for k in (0, 8)]
  assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(8))
  assert ids(a)[:8] != ids(a)[8:]


def test_finite_epochs_and_no_shuffle():
  examples = [_example(i) for i in range(5)]
  batches = list(_dataset(examples, num_epochs=2, shuffle=False))
  assert len(batches) == 4  # 2 per epoch, remainder dropped
  assert [int(x) // 100 for b in batches for x in b["actions"][:, 0]] == [0, 1, 2, 3] * 2


def test_process_shards_are_disjoint_and_cover_the_data():
  examples = [_example(i) for i in range(10)]
  seen = []
  for pi in range(3):
    batches = list(_dataset(examples, batch_size=1, num_epochs=1, seed=3,
                            process_index=pi, process_count=3))
    assert len(batches) == 3  # 10 // 3 records each; all processes step equally
    seen.append({int(b["actions"][0, 0]) // 100 for b in batches})
  assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
  assert len(seen[0] | seen[1] | seen[2]) == 9
  with pytest.raises(ValueError, match="process_index 3"):
    _dataset(examples, process_index=3, process_count=3)


def test_iterator_state_restore_continues_identically():
  examples = [_example(i) for i in range(7)]
  ds = _dataset(examples, seed=5)
  it = pipeline.make_iterator(ds)
  _take(it, 4)  # crosses an epoch boundary (3 batches per epoch)
  state = it.get_state()
  expected = _take(it, 5)
  fresh = pipeline.make_iterator(_dataset(examples, seed=5))
  fresh.set_state(state)
  for x, y in zip(_take(fresh, 5), expected):
    _assert_same(x, y)
  ahead = pipeline.make_iterator(_dataset(examples, seed=5))
  assert not np.array_equal(next(ahead)["actions"], expected[0]["actions"])


def test_short_record_error_names_file_and_field(tmp_path):
  records.write_records(str(tmp_path / "clips"), [_example(0), _example(1, T=3)])
  ds = pipeline.make_dataset(str(tmp_path / "clips-*.array_record"), clip_frames=5,
                             batch_size=1, shuffle=False, process_index=0,
                             process_count=1)
  it = iter(ds)
  assert next(it)["latents"].shape == (1, 5, 2, 2, 48)
  with pytest.raises(ValueError, match=r"clips-00000-of-00001.array_record\[1\]: "
                     r"field 'video': 3 frames < clip_frames=5"):
    next(it)


def test_latent_records_normalised_and_text_padded():
  rng = np.random.default_rng(0)
  ex = {"latents": rng.standard_normal((6, 2, 2, 4)).astype(np.float16),
        "text_embedding": np.ones((3, 8), np.float16), "fps": 24.0}
  mean, std = np.full(4, 0.5, np.float32), np.full(4, 2.0, np.float32)
  batch = _take(_dataset([ex, ex], clip_frames=6, latent_stats=(mean, std),
                         text_len=5), 1)[0]
  np.testing.assert_allclose(batch["latents"][0],
                             (ex["latents"].astype(np.float32) - 0.5) / 2.0)
  assert batch["text_embedding"].shape == (2, 5, 8)
  np.testing.assert_array_equal(batch["text_mask"][0], [1, 1, 1, 0, 0])
  assert batch["text_embedding"][0, 3:].sum() == 0


def test_global_batch_from_process_local_data():
  assert jax.device_count() == 8
  batch = _take(_dataset([_example(i) for i in range(16)], batch_size=8), 1)[0]
  mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
  sharding = parallel.batch_sharding(mesh)
  assert sharding.spec == P(("data", "fsdp"))
  out = pipeline.make_global_batch(batch, sharding)
  for key, local in batch.items():
    arr = out[key]
    assert isinstance(arr, jax.Array) and arr.shape == local.shape  # 1 process
    assert arr.sharding == sharding
    shards = arr.addressable_shards
    assert len(shards) == 8 and all(s.data.shape[0] == 1 for s in shards)
    np.testing.assert_array_equal(np.asarray(arr), local)
  # A dict of shardings: replicate actions, shard latents on 'data' only.
  mixed = {"latents": NamedSharding(mesh, P("data")),
           "actions": NamedSharding(mesh, P())}
  out = pipeline.make_global_batch(batch, mixed)
  assert out["latents"].addressable_shards[0].data.shape[0] == 2
  assert out["actions"].addressable_shards[0].data.shape == batch["actions"].shape


def test_per_process_batch_size():
  assert pipeline.per_process_batch_size(32, 4) == 8
  with pytest.raises(ValueError, match="not divisible"):
    pipeline.per_process_batch_size(30, 4)


def test_adversarial_batches_pair_real_segments_with_episode_rollouts():
  """Stage 3's batches: real clips of S frames, and per row a rollout start
  frame and the L recorded actions that follow it in one episode."""
  from aapt_jax.data.pipeline import make_adversarial_dataset
  S, L = 3, 5
  clips = [{"latents": np.full((6, 2, 2, 4), 100 + i, np.float32),
            "actions": np.arange(6, dtype=np.int32)} for i in range(4)]
  # episode e, frame f: latents all equal 1000 e + f, action (e + f) % 7
  episodes = [{"latents": (1000 * e + np.arange(20, dtype=np.float32))[:, None, None, None]
               * np.ones((1, 2, 2, 4), np.float32),
               "actions": ((e + np.arange(20)) % 7).astype(np.int32)} for e in range(3)]
  ds = make_adversarial_dataset(clips, episodes, segment_frames=S, rollout_frames=L,
                                batch_size=2, seed=0, process_index=0, process_count=1)
  seen = set()
  for batch in (ds[i] for i in range(6)):
    assert batch["latents"].shape == (2, S, 2, 2, 4)
    assert batch["rollout_first"].shape == (2, 2, 2, 4)
    assert batch["rollout_actions"].shape == (2, L)
    assert set(np.unique(batch["latents"])) <= {100.0, 101.0, 102.0, 103.0}
    for first, actions in zip(batch["rollout_first"], batch["rollout_actions"]):
      code = int(first[0, 0, 0])
      e, f = divmod(code, 1000)
      assert np.all(first == code) and f + L <= 20
      np.testing.assert_array_equal(actions, (e + f + np.arange(L)) % 7)
      seen.add(code)
  assert len(seen) > 3  # windows really vary
  again = make_adversarial_dataset(clips, episodes, segment_frames=S, rollout_frames=L,
                                   batch_size=2, seed=0, process_index=0, process_count=1)
  np.testing.assert_array_equal(again[3]["rollout_first"], ds[3]["rollout_first"])
  assert "rollout_latents" not in ds[0]
  # rollout_targets: the window's real frames, from the same draw
  targets = make_adversarial_dataset(clips, episodes, segment_frames=S, rollout_frames=L,
                                     batch_size=2, seed=0, process_index=0, process_count=1,
                                     rollout_targets=True)
  for i in range(4):
    t, b = targets[i], ds[i]
    np.testing.assert_array_equal(t["rollout_first"], b["rollout_first"])
    assert t["rollout_latents"].shape == (2, L, 2, 2, 4)
    codes = b["rollout_first"][:, 0, 0, 0]                  # 1000 e + f
    np.testing.assert_array_equal(t["rollout_latents"][:, :, 0, 0, 0],
                                  codes[:, None] + np.arange(L))


def test_adversarial_batches_carry_the_rollouts_controls_and_text():
  """The rollout carries the same kinds of condition as the real clips: its
  L controls from the episode and the episode's text (one embedding and
  mask per sample, for all its frames)."""
  from aapt_jax.data.pipeline import make_adversarial_dataset
  S, L, A = 3, 5, 2
  text = lambda n, v: np.full((n, 4), v, np.float32)
  clips = [{"latents": np.zeros((6, 2, 2, 4), np.float32), "actions": np.zeros(6, np.int32),
            "controls": np.zeros((6, A), np.float32), "text_embedding": text(2, -1.0)}
           for _ in range(4)]
  # episode e: frame f's latents and controls[:, 0] both 1000 e + f; its text 2 + e tokens of e
  episodes = [{"latents": (1000 * e + np.arange(20, dtype=np.float32))[:, None, None, None]
               * np.ones((1, 2, 2, 4), np.float32),
               "actions": np.zeros(20, np.int32),
               "controls": np.stack([1000 * e + np.arange(20), -np.arange(20)], 1).astype(
                   np.float32),
               "text_embedding": text(2 + e, e)} for e in range(3)]
  ds = make_adversarial_dataset(clips, episodes, segment_frames=S, rollout_frames=L,
                                batch_size=2, seed=0, process_index=0, process_count=1,
                                text_len=6)
  for batch in (ds[i] for i in range(4)):
    assert batch["rollout_controls"].shape == (2, L, A)
    assert batch["rollout_text_embedding"].shape == batch["text_embedding"].shape == (2, 6, 4)
    for first, controls, emb, mask in zip(batch["rollout_first"], batch["rollout_controls"],
                                          batch["rollout_text_embedding"],
                                          batch["rollout_text_mask"]):
      e, f = divmod(int(first[0, 0, 0]), 1000)
      np.testing.assert_array_equal(controls[:, 0], 1000 * e + f + np.arange(L))
      np.testing.assert_array_equal(mask, np.arange(6) < 2 + e)
      np.testing.assert_array_equal(emb[mask], e)
