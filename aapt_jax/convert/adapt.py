"""Plain-Wan params -> the params of an AAPT config built on the same model.

    params, report = adapt_to(params_plain, load_config("configs/wan2_1_1_3b.py"))

What AAPT adds to an imported Wan model starts where Wan was, so before any
training the AAPT model (block-causal attention, recycled frame, controls)
gives exactly Wan's output for a single latent frame:

* the patch embedding's recycled-frame input columns are zero-padded;
* the action embedding table and the control MLP's output layer are zeros;
  the control MLP's first layer keeps its random init (were it zero too, no
  gradient would ever reach either layer).

Any other difference between the two trees is an error naming the tensor and
both shapes; params the target lacks are reported as ignored.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import numpy as np

from aapt_jax.checkpointing import named_leaves
from aapt_jax.loading import fit_leaves
from aapt_jax.models import abstract_params, build_generator, init_params

PATCH_KERNEL = "patch_embedding/kernel"  # [pt, ph, pw, C_in, D]
ZERO_INIT = ("action_embedding", "control_out")  # top-level modules: zeros
RANDOM_INIT = ("control_in",)                    # top-level modules: the model's init
# model.* fields that change the function without changing any shape
FUNCTION_FIELDS = ("eps", "rope_theta", "qk_norm", "cross_attn_norm", "freq_dim")


@dataclasses.dataclass
class AdaptReport:
  """Which tensors (as "a/b/c" paths) were loaded, padded, initialised or ignored."""
  loaded: list[str] = dataclasses.field(default_factory=list)
  padded: list[str] = dataclasses.field(default_factory=list)     # subset of loaded
  zeros: list[str] = dataclasses.field(default_factory=list)      # newly initialised
  random: list[str] = dataclasses.field(default_factory=list)     # newly initialised
  ignored: list[str] = dataclasses.field(default_factory=list)
  counts: dict[str, int] = dataclasses.field(default_factory=dict)  # parameters per list

  def summary(self) -> str:
    c = self.counts
    lines = [f"params loaded: {len(self.loaded)} tensors, {c.get('loaded', 0):,} parameters"
             + (f" ({len(self.padded)} zero-padded: {', '.join(self.padded)})"
                if self.padded else "")]
    new = self.zeros + self.random
    lines.append(f"params newly initialised: {len(new)} tensors, "
                 f"{c.get('zeros', 0) + c.get('random', 0):,} parameters"
                 + (f" (zeros: {', '.join(self.zeros) or '-'}; random: "
                    f"{', '.join(self.random) or '-'})" if new else ""))
    lines.append(f"keys ignored: {len(self.ignored)}"
                 + (f" ({', '.join(self.ignored)})" if self.ignored else ""))
    return "\n".join(lines)


def _check_same_function(source_config, target_config) -> None:
  differ = [f"model.{f}: checkpoint {source_config.model[f]!r}, target {target_config.model[f]!r}"
            for f in FUNCTION_FIELDS if source_config.model[f] != target_config.model[f]]
  if differ:
    raise ValueError("the target config computes a different function from the checkpoint's "
                     "model: " + "; ".join(differ))


def _model_init(config, names):
  """The model's own init of the leaves `names` only (jit drops the rest of the init)."""
  model = build_generator(config)

  def init(rng):
    flat = named_leaves(nn.meta.unbox(init_params(model, rng))["params"])
    return [flat[n] for n in names]

  values = jax.jit(init)(jax.random.key(int(config.train.seed)))
  return {n: np.asarray(v, np.float32) for n, v in zip(names, values)}


def adapt_to(params_plain, target_config, source_config=None):
  """(params, AdaptReport): `params_plain` fitted to `target_config`'s generator.

  `loading.fit_leaves` with this policy: only the patch embedding's
  input-channel axis may be zero-padded; of the missing leaves, ZERO_INIT
  modules start at zeros and RANDOM_INIT ones at the model's init, any other
  is an error; leaves the target lacks are reported as ignored.
  `source_config` (the checkpoint's config, as `load_transformer` returns it)
  also checks the fields that change the function without changing a shape
  (eps, RoPE theta, q/k norm, cross-attention norm, freq_dim).
  """
  if source_config is not None:
    _check_same_function(source_config, target_config)
  want = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, np.float32),
                      abstract_params(target_config))
  fit = fit_leaves(params_plain, want,
                   can_pad=lambda name, axis: (name, axis) == (PATCH_KERNEL, 3))
  shapes = {name: tuple(s.shape) for name, s in named_leaves(want).items()}
  report = AdaptReport(padded=list(fit.padded), ignored=list(fit.extra))
  bad = [f"{n}: checkpoint {a}, target config {b}" for n, a, b in fit.bad]
  values = dict(fit.values)
  for name in fit.missing:
    top = name.split("/")[0]
    if top in ZERO_INIT:
      values[name] = np.zeros(shapes[name], np.float32)
      report.zeros.append(name)
    elif top in RANDOM_INIT:
      report.random.append(name)
    else:
      bad.append(f"{name}: needed by the target config {shapes[name]}, not in the checkpoint")
  if bad:
    raise ValueError(f"the checkpoint's params do not fit the target config "
                     f"({len(bad)}): " + "; ".join(bad))
  values.update(_model_init(target_config, report.random) if report.random else {})
  report.loaded = [n for n in shapes if n in fit.values]
  size = lambda names: sum(math.prod(shapes[n]) for n in names)
  report.counts = {"loaded": size(report.loaded), "zeros": size(report.zeros),
                   "random": size(report.random)}
  params = jax.tree.unflatten(jax.tree.structure(want), [values[n] for n in shapes])
  return params, report
