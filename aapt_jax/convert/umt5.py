"""umT5's text encoder (Wan2.1's) from a transformers folder, and captions -> embeddings.

    config, params = load_text_encoder("Wan2.1-T2V-1.3B-Diffusers/text_encoder")
    enc = TextEncoder.load("Wan2.1-T2V-1.3B-Diffusers/text_encoder")
    emb, mask = enc.encode(["a red car on a beach"], max_length=512)
    # emb float32 [N, L, d_model] (zeros past the caption's tokens), mask bool [N, L]

The folder is a transformers `UMT5EncoderModel` save: `config.json` plus
`model.safetensors` or shards with `model.safetensors.index.json` (float32,
bfloat16 or float16). The tokenizer is `tokenizer.json` (read with the
`tokenizers` package) or else `spiece.model` (with `sentencepiece`) in the
folder's `tokenizer/`, its sibling `../tokenizer/` (the Diffusers pipeline
layout: `text_encoder/` and `tokenizer/` side by side) or the folder itself.
No torch or transformers at run time.
"""
from __future__ import annotations

import html
import os
import re
from typing import Any
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from aapt_jax.convert.safetensors_folder import SafetensorsFolder, check_tensor_names
from aapt_jax.models.text import TextEncoderConfig, build_text_encoder

MODEL_TYPE = "umt5"
TOKENIZER_JSON, SENTENCEPIECE_MODEL = "tokenizer.json", "spiece.model"
# feed_forward_proj values whose activation is T5 v1.1's gelu with the tanh approximation
GATED_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
# tensors of a full (encoder-decoder) checkpoint that the encoder does not use
NOT_ENCODER = ("decoder.", "lm_head.")
EMBEDDING_NAMES = ("shared.weight", "encoder.embed_tokens.weight")  # tied: either one


# ---------------------------------------------------------------- config
def text_encoder_config(hf: dict[str, Any], where: str) -> TextEncoderConfig:
  """The TextEncoderConfig of a transformers UMT5 config.json (dict); ValueError
  naming `where` for another model family, a missing size or another activation."""
  model_type = hf.get("model_type")
  if model_type != MODEL_TYPE:
    raise ValueError(f"{where} describes a {model_type!r} model, not umT5 (model_type "
                     f"'{MODEL_TYPE}', a transformers UMT5EncoderModel such as the "
                     "text_encoder/ of Wan-AI/Wan2.1-T2V-1.3B-Diffusers)")
  proj = hf.get("feed_forward_proj", "gated-gelu")
  act = hf.get("dense_act_fn", "gelu_new" if proj == "gated-gelu" else proj.split("-")[-1])
  gated = hf.get("is_gated_act", proj.startswith("gated-"))
  if not gated or act not in GATED_GELU_TANH:
    raise ValueError(f"{where}: feed_forward_proj={proj!r} (dense_act_fn={act!r}, "
                     f"is_gated_act={gated}); only umT5's gated-gelu (tanh gelu) is supported")
  sizes = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")
  missing = [k for k in sizes if not isinstance(hf.get(k), int)]
  if missing:
    raise ValueError(f"{where} lacks the integer field(s) {', '.join(missing)}")
  optional = {k: hf[k] for k in ("relative_attention_num_buckets",
                                 "relative_attention_max_distance", "layer_norm_epsilon")
              if k in hf}
  return TextEncoderConfig(**{k: hf[k] for k in sizes}, **optional)


# ----------------------------------------------------------------- names
def _plan(c: TextEncoderConfig) -> dict[tuple[str, ...], tuple[str, tuple[int, ...], bool]]:
  """Our param path -> (transformers tensor name, its shape, transpose?) for
  every tensor but the embedding (EMBEDDING_NAMES)."""
  inner = c.num_heads * c.d_kv
  plan = {("final_norm", "scale"): ("encoder.final_layer_norm.weight", (c.d_model,), False)}
  for i in range(c.num_layers):
    ours, theirs = f"layers_{i}", f"encoder.block.{i}.layer"
    attn = f"{theirs}.0.SelfAttention"
    for proj in ("q", "k", "v"):
      plan[(ours, "attention", proj, "kernel")] = (f"{attn}.{proj}.weight", (inner, c.d_model),
                                                   True)
    plan[(ours, "attention", "o", "kernel")] = (f"{attn}.o.weight", (c.d_model, inner), True)
    plan[(ours, "attention", "relative_attention_bias")] = (
        f"{attn}.relative_attention_bias.weight",
        (c.relative_attention_num_buckets, c.num_heads), False)
    plan[(ours, "attention_norm", "scale")] = (f"{theirs}.0.layer_norm.weight", (c.d_model,),
                                               False)
    ffn = f"{theirs}.1.DenseReluDense"
    plan[(ours, "ffn", "wi_0", "kernel")] = (f"{ffn}.wi_0.weight", (c.d_ff, c.d_model), True)
    plan[(ours, "ffn", "wi_1", "kernel")] = (f"{ffn}.wi_1.weight", (c.d_ff, c.d_model), True)
    plan[(ours, "ffn", "wo", "kernel")] = (f"{ffn}.wo.weight", (c.d_model, c.d_ff), True)
    plan[(ours, "ffn_norm", "scale")] = (f"{theirs}.1.layer_norm.weight", (c.d_model,), False)
  return plan


def load_text_encoder(path: str, dtype=np.float32) -> tuple[TextEncoderConfig, dict]:
  """(config, params) of the umT5 encoder in the transformers folder `path`.

  params: the bare tree `aapt_jax.models.text.build_text_encoder(config)`
  declares, numpy arrays of `dtype` (float32 by default, whatever the
  checkpoint stores; each tensor is cast as it is read, so bfloat16 params
  of a large encoder never hold a float32 copy of the whole). Raises
  FileNotFoundError for a missing folder, config.json or safetensors, and
  ValueError for a config that is not umT5's, missing tensors (named),
  unknown encoder tensors or a shape that does not match config.json.
  Decoder tensors of a full UMT5 checkpoint are ignored.
  """
  folder = SafetensorsFolder(path)
  where = os.path.join(folder.path, "config.json")
  config = text_encoder_config(folder.config, where)
  plan = _plan(config)
  present = {n for n in folder.names if not n.startswith(NOT_ENCODER)}
  embedding = next((n for n in EMBEDDING_NAMES if n in present), None)
  missing = {name for name, _, _ in plan.values()} - present
  if embedding is None:
    missing.add(" or ".join(EMBEDDING_NAMES))
  unknown = present - {name for name, _, _ in plan.values()} - set(EMBEDDING_NAMES)
  check_tensor_names(f"{folder.path} does not hold the umT5 encoder its config.json describes",
                     missing, unknown)

  plan[("embedding",)] = (embedding, (config.vocab_size, config.d_model), False)
  params: dict = {}
  for ours, (name, want, transpose) in plan.items():
    if folder.shape(name) != want:
      raise ValueError(f"tensor {name}: shape {folder.shape(name)} in the checkpoint, but "
                       f"{where} implies {want}")
    value = folder.get(name)
    value = np.ascontiguousarray(value.T if transpose else value, dtype=dtype)
    node = params
    for key in ours[:-1]:
      node = node.setdefault(key, {})
    node[ours[-1]] = value
  return config, params


# ------------------------------------------------------------- tokenizer
def clean_caption(text: str) -> str:
  """Wan's prompt cleaning (diffusers' `prompt_clean`, less its optional ftfy
  pass): HTML entities unescaped twice, whitespace runs -> one space, stripped."""
  return re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip()


def find_tokenizer(path: str) -> str:
  """The tokenizer file of the encoder folder `path`: tokenizer.json, else
  spiece.model, in `path/tokenizer/`, `path/../tokenizer/` or `path/`."""
  path = os.path.abspath(os.path.expanduser(path))
  places = [os.path.join(path, "tokenizer"), os.path.join(os.path.dirname(path), "tokenizer"),
            path]
  for name in (TOKENIZER_JSON, SENTENCEPIECE_MODEL):
    for place in places:
      if os.path.isfile(os.path.join(place, name)):
        return os.path.join(place, name)
  raise FileNotFoundError(f"no {TOKENIZER_JSON} or {SENTENCEPIECE_MODEL} in {', '.join(places)}:"
                          " put the encoder's tokenizer/ beside or inside its folder (as in "
                          "Wan-AI/Wan2.1-T2V-1.3B-Diffusers: text_encoder/ and tokenizer/)")


class Tokenizer:
  """T5's tokenization of captions: the pieces, then `</s>`, truncated to
  `max_length` tokens (the `</s>` kept) and padded with `<pad>`, as transformers'
  `T5TokenizerFast(captions, padding="max_length", truncation=True)` does."""

  def __init__(self, file: str):
    self.file = file
    if os.path.basename(file) == TOKENIZER_JSON:
      import tokenizers
      self._fast = tokenizers.Tokenizer.from_file(file)
      self._fast.no_padding()
      pad = self._fast.token_to_id("<pad>")
    else:
      try:
        import sentencepiece
      except ImportError:
        raise ImportError(f"{file} needs the sentencepiece package (pip install "
                          "sentencepiece), or give the folder a tokenizer.json") from None
      self._fast = None
      self._sp = sentencepiece.SentencePieceProcessor(model_file=file)
      pad, self._eos = self._sp.pad_id(), self._sp.eos_id()
      if self._eos < 0:
        raise ValueError(f"{file} defines no </s> (eos) piece: not a T5 tokenizer")
    self.pad_id = 0 if pad is None or pad < 0 else int(pad)

  def __call__(self, captions: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [N, max_length], mask bool [N, max_length]) of `captions`."""
    if max_length < 1:
      raise ValueError(f"max_length must be >= 1, got {max_length}")
    if self._fast is not None:
      self._fast.enable_truncation(max_length)
      rows = [e.ids for e in self._fast.encode_batch(list(captions))]
    else:
      rows = [ids[:max_length - 1] + [self._eos] for ids in self._sp.encode(list(captions))]
    ids = np.full((len(rows), max_length), self.pad_id, np.int32)
    mask = np.zeros((len(rows), max_length), bool)
    for i, row in enumerate(rows):
      ids[i, :len(row)], mask[i, :len(row)] = row, True
    return ids, mask


# --------------------------------------------------------------- encoder
class TextEncoder:
  """Captions -> umT5 embeddings, as Wan2.1's pipelines make them.

  `TextEncoder.load(dir)`: the encoder folder (see the module docstring).
  `encode(captions, max_length) -> (embeddings float32 [N, L, d_model],
  mask bool [N, L])`, L = max_length: each caption cleaned (`clean_caption`),
  tokenized (`Tokenizer`), encoded, and the embeddings past its tokens zeroed
  (Wan's pipelines keep the first `mask.sum()` rows and pad with zeros). One
  compile per (N, L). Attributes: `config`, `params`, `tokenizer`, `d_model`.
  """

  def __init__(self, config: TextEncoderConfig, params, tokenizer: Tokenizer,
               source: str = ""):
    self.config, self.tokenizer, self.source = config, tokenizer, source
    self.d_model = config.d_model
    self.params = jax.tree.map(jnp.asarray, params)
    module = build_text_encoder(config)

    def encode_ids(params, ids, mask):
      hidden = module.apply({"params": params}, ids, mask)         # [N, L, d_model]
      return jnp.where(mask[..., None], hidden, 0.0).astype(jnp.float32)

    self._encode_ids = jax.jit(encode_ids)

  @classmethod
  def load(cls, path: str, dtype=np.float32) -> TextEncoder:
    """The encoder in the transformers folder `path` and its tokenizer
    (`find_tokenizer`). `dtype` of the params (bfloat16 halves the memory; the
    matmuls still run in float32)."""
    config, params = load_text_encoder(path, dtype)
    return cls(config, params, Tokenizer(find_tokenizer(path)), os.path.abspath(path))

  def encode(self, captions: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings float32 [N, max_length, d_model], mask bool [N, max_length])."""
    if isinstance(captions, str):
      raise ValueError("captions must be a list of strings, got one string")
    ids, mask = self.tokenizer([clean_caption(c) for c in captions], max_length)
    if not len(ids):
      return np.zeros((0, max_length, self.d_model), np.float32), mask
    return np.asarray(self._encode_ids(self.params, ids, mask)), mask
