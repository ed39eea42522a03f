"""Parallelism: the one logical-axis rules table.

Glossary of logical axis names (every parameter carries them; an unnamed
parameter would be silently replicated, so a test walks the tree):

  parameters
    embed       the model width D (sharded over "fsdp")
    embed_out   a second D axis of a D x D matrix (replicated, so that no
                mesh axis appears twice in one spec)
    heads       the flattened attention width (num_heads x head_dim) of
                q/k/v/out projections and q/k norms ("tensor")
    mlp         the MLP hidden width and the 6·D modulation projection ("tensor")
    freq        the sinusoidal timestep features
    text_embed  the text encoder's width (input of the text projection)
    vocab       discrete actions
    control     continuous control features
    modulation  the rows (shift/scale/gate) of a modulation table
    patch_t, patch_h, patch_w, channels
                the patch-embedding kernel [pt, ph, pw, C_in, D]
    patch_out   the output head's pt·ph·pw·C
    layers      the stacked layer axis of the scanned blocks
  activations
    batch       samples ("data" and "fsdp")
    frames      latent frames
    tokens      tokens inside a frame
"""
from __future__ import annotations

LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("frames", None),
    ("tokens", None),
    ("embed", "fsdp"),
    ("embed_out", None),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("freq", None),
    ("text_embed", None),
    ("vocab", None),
    ("control", None),
    ("modulation", None),
    ("patch_t", None),
    ("patch_h", None),
    ("patch_w", None),
    ("channels", None),
    ("patch_out", None),
    ("layers", None),
)

LOGICAL_AXIS_NAMES = frozenset(name for name, _ in LOGICAL_AXIS_RULES)
