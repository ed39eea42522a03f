"""Metrics of a run: the non-finite-loss watcher, the metric writer
(TensorBoard + metrics.jsonl, process 0), step time / tokens per second /
MFU, the compiled step's cost and memory analysis, a profiler window, the
run summary (summary.json), and `log` (absl logging on process 0).

Keys are namespaced: `train/<step metric>` (train/loss, train/grad_norm,
...), `perf/step_time_s`, `perf/tokens_per_s`, `perf/mfu`; the compiled
step's analysis as `cost/*` and `memory/*` (logged once, in the summary)."""
from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import numpy as np
from absl import logging

from aapt_jax.parallel import is_main_process


class NonFiniteLossError(RuntimeError):
  """`train.max_nonfinite` non-finite losses in a row."""


def log(message: str) -> None:
  """absl logging.info on process 0 only."""
  if is_main_process():
    logging.info("%s", message)


class NonFiniteWatcher:
  """Reads each step's metrics on the host (one step late); counts non-finite
  losses in a row and raises `NonFiniteLossError` after `limit`."""

  def __init__(self, limit: int):
    self.limit = int(limit)
    self.nonfinite_in_a_row = 0
    self.nonfinite_total = 0
    self.first: tuple[int, float] | None = None
    self.last: tuple[int, float] | None = None
    self.last_finite: tuple[int, float] | None = None

  def consume(self, step: int, metrics: dict[str, Any]) -> dict[str, float]:
    host = {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}
    loss = host["loss"]
    if self.first is None:
      self.first = (step, loss)
    self.last = (step, loss)
    if host.get("finite", 1.0) and math.isfinite(loss):
      self.nonfinite_in_a_row = 0
      self.last_finite = (step, loss)
    else:
      self.nonfinite_in_a_row += 1
      self.nonfinite_total += 1
      if self.nonfinite_in_a_row >= self.limit:
        raise NonFiniteLossError(
            f"{self.nonfinite_in_a_row} non-finite losses in a row (train.max_nonfinite="
            f"{self.limit}), last at step {step} (loss {loss}); their updates were skipped "
            "and no checkpoint was saved since the first of them. Lower the learning "
            "rate (e.g. --config.diffusion.optim.learning_rate) or check the data.")
    return host


class MetricWriter:
  """TensorBoard events + metrics.jsonl + console lines, on process 0 only."""

  def __init__(self, directory: str, enabled: bool):
    self.enabled = enabled
    self.tb = None
    self.jsonl = None
    if enabled:
      from tensorboardX import SummaryWriter
      os.makedirs(directory, exist_ok=True)
      self.tb = SummaryWriter(os.path.join(directory, "tb"), flush_secs=30)
      self.jsonl = open(os.path.join(directory, "metrics.jsonl"), "a")

  def write(self, step: int, scalars: dict[str, float]) -> None:
    """One row: namespaced scalars (`train/loss`, `perf/step_time_s`, ...) to
    TensorBoard and metrics.jsonl; `data_fingerprint` to metrics.jsonl only."""
    if not self.enabled:
      return
    for k, v in scalars.items():
      if k != "data_fingerprint" and v is not None:
        self.tb.add_scalar(k, v, step)
    self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self.jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self.tb.close()
      self.jsonl.close()
      self.enabled = False


def data_fingerprint(batch: dict[str, np.ndarray]) -> float:
  """A cheap host-side checksum of a batch (for tests of the data order)."""
  x = batch["latents"] if "latents" in batch else batch["video"]
  w = np.arange(1, x.shape[0] + 1, dtype=np.float64).reshape(-1, *([1] * (x.ndim - 1)))
  return float(np.sum(x.astype(np.float64) * w))


def format_summary(s: dict[str, Any]) -> str:
  """One line for a stage's run summary (`Trainer.run`'s dict)."""
  if not s["steps_run"]:
    return f"{s['stage']}: no steps run (at step {s['step']})."
  per = (f", {s['seconds_per_step'] * 1e3:.1f} ms/step after the first"
         if s["seconds_per_step"] else "")
  return (f"{s['stage']}: steps {s['start_step']} -> {s['step']} ({s['steps_run']} run) in "
          f"{s['seconds']:.1f} s{per}; loss {s['first_loss']:.5f} (first) -> "
          f"{s['final_loss']:.5f} (final); {s.get('nonfinite_steps', 0)} non-finite "
          f"step(s) skipped" + (f"; checkpoint {s['checkpoint']}" if s["checkpoint"] else ""))


# bfloat16 dense matmul peak per chip, by a substring of `device_kind`
# (vendor data sheets); other devices or float32 compute: set
# train.peak_flops_per_device to get perf/mfu.
BF16_PEAK_FLOPS = (("H100", 989e12), ("H200", 989e12), ("GH200", 989e12), ("B200", 2250e12),
                   ("A100", 312e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12),
                   ("TPU v5e", 197e12), ("TPU v6", 918e12), ("TPU v4", 275e12))


def peak_flops_per_device(config, device=None) -> float | None:
  """`train.peak_flops_per_device`, else the table's bfloat16 peak of this
  device kind when the model computes in bfloat16, else None (no MFU)."""
  if float(config.train.peak_flops_per_device) > 0:
    return float(config.train.peak_flops_per_device)
  if config.model.dtype != "bfloat16":
    return None
  kind = (device or jax.devices()[0]).device_kind
  return next((peak for name, peak in BF16_PEAK_FLOPS if name in kind), None)


class StepTimer:
  """perf/* metrics from the host wall time between the reads of consecutive
  steps' metrics. The loop reads step i's metrics after dispatching step
  i+1, and reading them waits for step i, so in steady state the interval is
  the device's time per step.

  tokens_per_step: generator tokens of the global batch (None: no tokens/s).
  model_flops_per_step: 6 x params x tokens (None: no MFU), against
  `peak_flops` per device x `devices`.
  """

  def __init__(self, tokens_per_step=None, model_flops_per_step=None, peak_flops=None,
               devices=1):
    self.tokens = tokens_per_step
    self.flops = model_flops_per_step
    self.peak = peak_flops * devices if peak_flops else None
    self.last: tuple[int, float] | None = None

  def tick(self, step: int, now: float) -> dict[str, float]:
    """The perf/* metrics of the steps since the last tick ({} at the first)."""
    out = {}
    if self.last is not None and step > self.last[0]:
      dt = (now - self.last[1]) / (step - self.last[0])
      out["perf/step_time_s"] = dt
      if self.tokens:
        out["perf/tokens_per_s"] = self.tokens / dt
      if self.flops and self.peak:
        out["perf/mfu"] = self.flops / dt / self.peak
    self.last = (step, now)
    return out


def compiled_analysis(compiled) -> dict[str, float]:
  """The compiled step's XLA cost analysis (flops, bytes accessed; a scanned
  layer stack is counted once) and memory analysis (bytes per device), as
  far as the backend reports them."""
  out = {}
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 (not every backend implements it)
    cost = None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  for key in ("flops", "bytes accessed", "transcendentals"):
    if cost and key in cost:
      out[f"cost/{key.replace(' ', '_')}"] = float(cost[key])
  try:
    mem = compiled.memory_analysis()
  except Exception:  # noqa: BLE001
    mem = None
  for key in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
              "temp_size_in_bytes", "generated_code_size_in_bytes"):
    if mem is not None and hasattr(mem, key):
      out[f"memory/{key}"] = float(getattr(mem, key))
  return out


class ProfileWindow:
  """A JAX profiler trace of `steps` steps from step `first` into `log_dir`
  (written as <log_dir>/plugins/profile/<run>/*.xplane.pb: TensorBoard's
  profile tab on that directory shows it). Inactive when `steps` is 0."""

  def __init__(self, log_dir: str, first: int, steps: int):
    self.log_dir, self.first, self.last = log_dir, int(first), int(first) + int(steps) - 1
    self.enabled = int(steps) > 0
    self.active = False

  def before(self, step: int) -> None:
    """Call before dispatching step number `step`."""
    if self.enabled and step == self.first:
      jax.profiler.start_trace(self.log_dir)
      self.active = True

  def after(self, step: int, outputs) -> None:
    """Call after dispatching step `step` (its `outputs` are waited for at the end)."""
    if self.active and step >= self.last:
      jax.block_until_ready(outputs)
      self.stop()
      log(f"profile of steps {self.first}-{step} -> {self.log_dir} (TensorBoard: profile tab)")

  def stop(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False


def write_summary(path: str, summary: Any) -> None:
  """`summary` as JSON at `path` (process 0; atomic: written, then renamed)."""
  if not is_main_process():
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(summary, f, indent=1, default=float)
  os.replace(tmp, path)
