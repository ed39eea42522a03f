"""Student-forcing rollout: the generator plays its own frames, one 1NFE
`Generator.step` per latent frame inside `jax.lax.scan`.

inputs [B, L, h, w, C] = [x_0, eps_1, ..., eps_{L-1}]: the real first frame
(the sink, prefilled at t = 0) then the noises; frame i >= 1 is
x_i = eps_i - v(eps_i, t=1 | x_{i-1}, cache). The recycled input x_{i-1} is
`stop_gradient`, so the video is a function of the parameters only through
each block's own forward and the keys/values it attends to. Two equal ways
to differentiate segment losses, equal gradients (tests/test_rollout.py):

* "scan": differentiate the scan itself (saves a whole cache per step);
* "recompute": roll out without gradient, then ONE parallel block-causal
  `__call__` over the same inputs with previous = the detached rolled frames
  — the same function of the parameters, at teacher-forcing memory.

Segment gradients: "end_to_end" (the summed segment loss differentiates
through the whole rollout) or "truncated" (segment k sees the parameters only
through the forwards of its own frames; every key/value before its first
frame is detached).
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from aapt_jax.models import Conditioning, Generator, with_text_kv

GRADIENTS = ("scan", "recompute")
SEGMENT_GRADIENTS = ("end_to_end", "truncated")


def _slice_cond(cond: Conditioning, start: int, stop: int) -> Conditioning:
  pick = lambda a: None if a is None else a[:, start:stop]
  return cond.replace(actions=pick(cond.actions), controls=pick(cond.controls), previous=None)


def _timesteps(batch: int, length: int, first_is_sink: bool):
  t = jnp.ones((batch, length))
  return t.at[:, 0].set(0.0) if first_is_sink else t


def _shift(frames, first_previous=None):
  """previous[:, i] = frames[:, i - 1]; previous[:, 0] = first_previous or zeros."""
  head = jnp.zeros_like(frames[:, :1]) if first_previous is None else first_previous[:, None]
  return jnp.concatenate([head, frames[:, :-1]], axis=1)


def _scan_frames(model: Generator, params, inputs, cond: Conditioning, cache, previous):
  """Generates frames for inputs [B, n, ...] (all noise) from `cache`; returns (frames, cache)."""
  b = inputs.shape[0]
  cond = with_text_kv(model, params, cond)  # the text's keys/values once, not per step

  def body(carry, xs):
    cache, prev = carry
    eps, actions, controls = xs
    c = cond.replace(previous=jax.lax.stop_gradient(prev)[:, None],
                     actions=None if actions is None else actions[:, None],
                     controls=None if controls is None else controls[:, None])
    v, cache = model.apply({"params": params}, eps[:, None], jnp.ones((b, 1)), c, cache,
                           method="step")
    x = eps - v[:, 0]
    return (cache, x), x

  time_major = lambda a: None if a is None else jnp.swapaxes(a, 0, 1)
  xs = (time_major(inputs), time_major(cond.actions), time_major(cond.controls))
  (cache, _), frames = jax.lax.scan(body, (cache, previous), xs)
  return jnp.swapaxes(frames, 0, 1), cache


def _prefill(model: Generator, params, first, cond: Conditioning):
  """Writes the sink (the real first frame, t = 0) into a fresh cache."""
  b = first.shape[0]
  c = cond.replace(previous=jnp.zeros_like(first)[:, None],
                   actions=None if cond.actions is None else cond.actions[:, :1],
                   controls=None if cond.controls is None else cond.controls[:, :1])
  # opaque to XLA: a constant empty cache (counter 0, zero ring) lets the
  # compiler constant-fold the masked ring scores' softmax max, [B, H, P, N·P]
  # on the host at compile time (~40 s at 8B)
  empty = jax.lax.optimization_barrier(model.init_cache(b))
  _, cache = model.apply({"params": params}, first[:, None], jnp.zeros((b, 1)), c, empty,
                         method="step")
  return cache


def rollout_student_forcing(model: Generator, params, inputs, cond: Conditioning | None = None,
                            cache_at: Sequence[int] = ()):
  """The scan rollout. Returns (frames [B, L, ...], {start: cache before frame start}).

  cond: per-frame actions/controls [B, L, ...] (frame i's), text/text_mask
  shared; `cond.previous` is ignored (the rollout recycles its own frames).
  cache_at: frame indices (>= 1) before which to return the cache, e.g. the
  segment starts for "truncated" gradients.
  """
  cond = cond if cond is not None else Conditioning()
  length = inputs.shape[1]
  first = inputs[:, 0]
  cache = _prefill(model, params, first, cond)
  bounds = sorted({s for s in cache_at if 0 < s < length} | {1, length})
  caches, chunks, prev = {}, [first[:, None]], first
  for start, stop in zip(bounds[:-1], bounds[1:]):
    caches[start] = cache
    frames, cache = _scan_frames(model, params, inputs[:, start:stop],
                                 _slice_cond(cond, start, stop), cache, prev)
    chunks.append(frames)
    prev = frames[:, -1]
  return jnp.concatenate(chunks, axis=1), caches


def recompute_frames(model: Generator, params, inputs, rolled, cond: Conditioning | None = None,
                     start: int = 0, stop: int | None = None, cache=None):
  """Frames start..stop-1 of a rollout, from one parallel `__call__`.

  rolled: the (detached) rolled-out frames [B, L, ...]: they are the recycled
  inputs. With `cache` (the detached cache before frame `start`), the pass
  continues it; else it starts at the sink (start must be 0).
  """
  cond = cond if cond is not None else Conditioning()
  stop = inputs.shape[1] if stop is None else stop
  rolled = jax.lax.stop_gradient(rolled)
  x = inputs[:, start:stop]
  previous = _shift(rolled[:, start:stop], None if start == 0 else rolled[:, start - 1])
  c = _slice_cond(cond, start, stop).replace(previous=previous)
  t = _timesteps(x.shape[0], x.shape[1], first_is_sink=start == 0)
  v = model.apply({"params": params}, x, t, c, cache=cache)
  frames = x - v
  if start == 0:  # the sink is the real first frame, not generated
    frames = jnp.concatenate([x[:, :1], frames[:, 1:]], axis=1)
  return frames


def segment_frames(model: Generator, params, inputs, cond: Conditioning | None,
                   starts: Sequence[int], segment: int, *, gradient: str = "recompute",
                   segment_gradient: str = "end_to_end", rollout=None) -> list:
  """The frames of each segment [B, S_k, ...], differentiable per the two modes.

  starts: segment start frames (objectives.adversarial.segment_starts).
  rollout: (frames, caches) of `rollout_student_forcing` of the same params,
  inputs and cond, run without gradient (with cache_at=starts when
  "truncated"), e.g. the rollout a discriminator already judged: "recompute"
  and truncated "scan" reuse it instead of rolling out again ("scan" end to
  end differentiates its own scan and needs none).
  """
  if gradient not in GRADIENTS:
    raise ValueError(f"adversarial.gradient must be one of {GRADIENTS}, got {gradient!r}")
  if segment_gradient not in SEGMENT_GRADIENTS:
    raise ValueError(f"adversarial.segment_gradient must be one of {SEGMENT_GRADIENTS}, "
                     f"got {segment_gradient!r}")
  cond = cond if cond is not None else Conditioning()
  length = inputs.shape[1]
  spans = [(s, min(s + segment, length)) for s in starts]
  truncated = segment_gradient == "truncated"
  sg = jax.lax.stop_gradient

  if gradient == "scan" and not truncated:
    frames, _ = rollout_student_forcing(model, params, inputs, cond)
    return [frames[:, a:b] for a, b in spans]

  if rollout is None:
    rollout = rollout_student_forcing(model, sg(params), inputs, cond,
                                      cache_at=starts if truncated else ())
  rolled, caches = sg(rollout)
  if truncated and any(s not in caches for s in starts if s > 0):
    raise ValueError(f"truncated segment gradients need the rollout's caches at the segment "
                     f"starts {list(starts)}: roll out with cache_at=starts")
  if gradient == "recompute" and not truncated:
    frames = recompute_frames(model, params, inputs, rolled, cond)
    return [frames[:, a:b] for a, b in spans]

  out = []
  for a, b in spans:
    if gradient == "recompute":
      cache = None if a == 0 else jax.tree.map(sg, caches[a])
      out.append(recompute_frames(model, params, inputs, rolled, cond, a, b, cache))
    elif a == 0:  # scan, truncated, from the sink
      frames, _ = rollout_student_forcing(model, params, inputs[:, :b], _slice_cond(cond, 0, b))
      out.append(frames)
    else:  # scan, truncated: one scan per segment from the detached cache
      frames, _ = _scan_frames(model, params, inputs[:, a:b], _slice_cond(cond, a, b),
                               jax.tree.map(sg, caches[a]), rolled[:, a - 1])
      out.append(frames)
  return out
