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

from aapt_jax.models import abstract_params, build_generator, init_params

PATCH_KERNEL = ("patch_embedding", "kernel")  # [pt, ph, pw, C_in, D]
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


def _flat(tree) -> dict[tuple[str, ...], object]:
  return {tuple(k.key for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _name(path) -> str:
  return "/".join(path)


def _check_same_function(source_config, target_config) -> None:
  differ = [f"model.{f}: checkpoint {source_config.model[f]!r}, target {target_config.model[f]!r}"
            for f in FUNCTION_FIELDS if source_config.model[f] != target_config.model[f]]
  if differ:
    raise ValueError("the target config computes a different function from the checkpoint's "
                     "model: " + "; ".join(differ))


def _model_init(config, paths):
  """The model's own init of `paths` only (jit drops the rest of the init)."""
  model = build_generator(config)

  def init(rng):
    params = _flat(nn.meta.unbox(init_params(model, rng))["params"])
    return [params[p] for p in paths]

  values = jax.jit(init)(jax.random.key(int(config.train.seed)))
  return {p: np.asarray(v, np.float32) for p, v in zip(paths, values)}


def adapt_to(params_plain, target_config, source_config=None):
  """(params, AdaptReport): `params_plain` fitted to `target_config`'s generator.

  `source_config` (the checkpoint's config, as `load_transformer` returns it)
  also checks the fields that change the function without changing a shape
  (eps, RoPE theta, q/k norm, cross-attention norm, freq_dim).
  """
  if source_config is not None:
    _check_same_function(source_config, target_config)
  have = {p: np.asarray(v) for p, v in _flat(params_plain).items()}
  want = _flat(abstract_params(target_config))
  report = AdaptReport()
  out, bad, to_init = {}, [], []
  for path, spec in want.items():
    shape = tuple(spec.shape)
    if path not in have:
      if path[0] in ZERO_INIT:
        out[path] = np.zeros(shape, np.float32)
        report.zeros.append(_name(path))
      elif path[0] in RANDOM_INIT:
        to_init.append(path)
        report.random.append(_name(path))
      else:
        bad.append(f"{_name(path)}: needed by the target config {shape}, not in the checkpoint")
      continue
    value = have[path]
    if value.shape == shape:
      out[path] = value.astype(np.float32)
    elif (path == PATCH_KERNEL and value.ndim == 5 and value.shape[:3] == shape[:3]
          and value.shape[4] == shape[4] and value.shape[3] < shape[3]):
      widths = [(0, 0)] * 3 + [(0, shape[3] - value.shape[3]), (0, 0)]
      out[path] = np.pad(value.astype(np.float32), widths)
      report.padded.append(f"{_name(path)} {value.shape}->{shape}")
    else:
      bad.append(f"{_name(path)}: checkpoint {value.shape}, target config {shape}")
      continue
    report.loaded.append(_name(path))
  if bad:
    raise ValueError(f"the checkpoint's params do not fit the target config "
                     f"({len(bad)}): " + "; ".join(bad))
  out.update(_model_init(target_config, to_init) if to_init else {})
  report.ignored = sorted(_name(p) for p in have if p not in want)
  size = lambda names: sum(math.prod(want[tuple(n.split("/"))].shape) for n in names)
  report.counts = {"loaded": size(report.loaded), "zeros": size(report.zeros),
                   "random": size(report.random)}
  params: dict = {}
  for path in want:  # the target's order
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = out[path]
  return params, report
