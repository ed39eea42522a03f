"""umT5 text encoder: equal to transformers' UMT5EncoderModel on the fixture
(tests/fixtures/umt5, made by make_umt5_fixture.py with transformers 4.57.1),
its tokenizers, bf16/fp16/sharded folders, clear errors, and
StreamingSession.start(text="...")."""
import json
import os
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from aapt_jax.convert.umt5 import TextEncoder, Tokenizer, clean_caption, find_tokenizer, \
    load_text_encoder
from aapt_jax.inference.session import StreamingModel, StreamingSession
from aapt_jax.models.text import build_text_encoder, relative_position_buckets
from helpers import ROOT
from streaming_helpers import tiny_streaming_model

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "umt5")
ENCODER_DIR = os.path.join(FIXTURE, "text_encoder")
TOKENIZER_DIR = os.path.join(FIXTURE, "tokenizer")
WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def io():
  return dict(np.load(os.path.join(FIXTURE, "io.npz")))


@pytest.fixture(scope="module")
def imported():
  return load_text_encoder(ENCODER_DIR)


@pytest.fixture(scope="module")
def apply(imported):
  return jax.jit(build_text_encoder(imported[0]).apply)


def leaves(tree):
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def copy_encoder(tmp_path):
  dst = tmp_path / "text_encoder"
  shutil.copytree(ENCODER_DIR, dst)
  return dst


def test_equals_transformers_including_padded_positions(io, imported, apply):
  config, params = imported
  assert (config.num_layers, config.relative_attention_num_buckets) == (2, 8)
  mask = io["attention_mask"]
  assert not mask.all() and mask.any(axis=1).all()  # padding in play, every row has a token
  hidden = np.asarray(apply({"params": params}, io["input_ids"], mask))
  assert hidden.dtype == np.float32 and hidden.shape == io["hidden"].shape
  np.testing.assert_allclose(hidden, io["hidden"], atol=2e-5, rtol=1e-5)
  # padded query rows are computed as transformers does (they attend to the tokens)
  assert np.abs(io["hidden"][mask == 0]).min() > 0
  # every layer has its own relative position bias (umT5, unlike T5)
  tables = [params[f"layers_{i}"]["attention"]["relative_attention_bias"] for i in range(2)]
  assert not np.allclose(tables[0], tables[1])


def test_relative_position_buckets_by_hand():
  # 8 buckets, max distance 16: 4 per sign; distances 0, 1 exact; 2.. log-spaced
  # (2 + int(log(d / 2) / log(8) * 2)), capped at 3; keys after the query get + 4
  buckets = np.asarray(relative_position_buckets(40, 8, 16))
  by_distance = {0: 0, 1: 1, 2: 2, 3: 2, 5: 2, 6: 3, 15: 3, 39: 3}
  for d, b in by_distance.items():
    assert buckets[d, 0] == b, d            # key d before the query
    assert buckets[0, d] == b + (4 if d else 0), d  # key d after it


def test_tokenizers_give_transformers_ids(io):
  captions = [str(c) for c in io["captions"]]
  length = int(io["max_length"])
  for name in ("tokenizer.json", "spiece.model"):
    ids, mask = Tokenizer(os.path.join(TOKENIZER_DIR, name))(captions, length)
    assert ids.dtype == np.int32 and mask.dtype == bool
    np.testing.assert_array_equal(ids, io["input_ids"], err_msg=name)
    np.testing.assert_array_equal(mask, io["attention_mask"].astype(bool), err_msg=name)


def test_text_encoder_encodes_as_wan(io):
  enc = TextEncoder.load(ENCODER_DIR)  # the tokenizer from the sibling ../tokenizer/
  assert enc.tokenizer.file == os.path.join(TOKENIZER_DIR, "tokenizer.json")
  captions = [str(c) for c in io["captions"]]
  # Wan's prompt cleaning: entities unescaped, whitespace collapsed
  assert clean_caption("  A red &amp;amp; car\n\t on  the beach. ") == "A red & car on the beach."
  captions[0] = captions[0].replace(" ", "  \n")
  emb, mask = enc.encode(captions, int(io["max_length"]))
  assert emb.dtype == np.float32 and emb.shape == (*io["input_ids"].shape, enc.d_model)
  np.testing.assert_array_equal(mask, io["attention_mask"].astype(bool))
  np.testing.assert_allclose(emb, io["hidden"] * mask[..., None], atol=2e-5, rtol=1e-5)
  assert (emb[~mask] == 0).all()  # zeros past the caption's tokens, as Wan pads
  enc.encode(captions[::-1], int(io["max_length"]))
  assert enc._encode_ids._cache_size() == 1  # one compile per shape
  empty, none = enc.encode([], 8)
  assert empty.shape == (0, 8, enc.d_model) and none.shape == (0, 8)
  with pytest.raises(ValueError, match="list of strings"):
    enc.encode("one caption", 8)


def test_bfloat16_float16_and_sharded_folders(tmp_path, imported):
  _, ref = imported
  tensors = load_file(os.path.join(ENCODER_DIR, WEIGHTS))
  names = sorted(tensors)
  for dtype in (ml_dtypes.bfloat16, np.float16):
    folder = tmp_path / np.dtype(dtype).name
    folder.mkdir()
    shutil.copy(os.path.join(ENCODER_DIR, "config.json"), folder)
    shards = {"model-00001-of-00002.safetensors": names[:9],
              "model-00002-of-00002.safetensors": names[9:]}
    for shard, keys in shards.items():
      save_file({k: tensors[k].astype(dtype) for k in keys}, folder / shard)
    with open(folder / "model.safetensors.index.json", "w") as f:
      json.dump({"metadata": {}, "weight_map": {k: s for s, ks in shards.items() for k in ks}}, f)
    _, params = load_text_encoder(str(folder))
    got, want = leaves(params), leaves(ref)
    assert got.keys() == want.keys()
    for k in want:
      assert got[k].dtype == np.float32, k
      np.testing.assert_array_equal(got[k], want[k].astype(dtype).astype(np.float32), err_msg=k)
  _, half = load_text_encoder(str(folder), dtype=ml_dtypes.bfloat16)  # cast as read
  assert all(v.dtype == ml_dtypes.bfloat16 for v in leaves(half).values())


def test_bad_folders_raise_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no config.json"):
    load_text_encoder(str(tmp_path))
  folder = copy_encoder(tmp_path)
  with open(folder / "config.json") as f:
    config = json.load(f)
  with open(folder / "config.json", "w") as f:
    json.dump({**config, "model_type": "t5"}, f)
  with pytest.raises(ValueError, match="'t5' model, not umT5"):
    load_text_encoder(str(folder))
  with open(folder / "config.json", "w") as f:
    json.dump(config, f)
  tensors = load_file(str(folder / WEIGHTS))
  gone = "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"
  save_file({k: v for k, v in tensors.items() if k != gone}, str(folder / WEIGHTS))
  with pytest.raises(ValueError, match=f"missing \\(1\\): {gone}"):
    load_text_encoder(str(folder))
  with pytest.raises(FileNotFoundError, match="no tokenizer.json or spiece.model"):
    find_tokenizer(str(folder))


# A tiny world whose text is the fixture's 32-d umT5 embedding.
TINY_TEXT = (("stage", "consistency"), ("model.latent_channels", 12), ("model.text_dim", 32),
             ("data.world", ""), ("data.frame_size", 8), ("data.space_to_depth", 2),
             ("data.text_encoder", ENCODER_DIR), ("data.text_len", 16))


def test_session_starts_from_a_caption():
  model = tiny_streaming_model(TINY_TEXT)
  first = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
  caption = "A red car."
  session = StreamingSession(model, seed=3)
  frames = [session.start(first, text=caption), session.step(1), session.step(2)]
  emb, mask = model.encode_text(caption)
  assert emb.shape == (16, 32) and 0 < mask.sum() < 16
  # the padded caption with its mask = its tokens alone (the padding is masked out)
  plain = StreamingSession(model, seed=3)
  same = [plain.start(first, text=emb[mask]), plain.step(1), plain.step(2)]
  for a, b in zip(frames, same):
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
  encoder = model._text_encoder
  other = StreamingSession(model, seed=3)
  other.start(first, text="Two dogs play in a green park.")
  assert np.abs(other.step(1).astype(int) - frames[1].astype(int)).max() > 1  # text matters
  assert model._text_encoder is encoder  # loaded once, shared by the sessions


def test_session_without_an_encoder_explains():
  base = tiny_streaming_model(TINY_TEXT)
  config = base.config.copy_and_resolve_references()
  config.data.text_encoder = ""
  with pytest.raises(ValueError, match="data.text_encoder"):
    StreamingSession(StreamingModel(config, base.params)).start(np.zeros((8, 8, 3), np.uint8),
                                                                text="a caption")
  # an encoder of another width than model.text_dim (12)
  other = tiny_streaming_model(tuple((k, 12 if k == "model.text_dim" else v)
                                     for k, v in TINY_TEXT))
  with pytest.raises(ValueError, match="32-d embeddings but the model takes model.text_dim=12"):
    other.encode_text("a caption")
