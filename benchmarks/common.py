"""What every benchmark prints about the machine it ran on, and the random
training batch the step benchmarks feed."""
import os
import platform
import sys


def cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def config_names(arg: str, known) -> list[str]:
  """The comma-separated --configs, each checked against `known` (exits with a message)."""
  names = arg.split(",")
  for n in names:
    if n not in known:
      sys.exit(f"unknown config {n!r}; choose from {sorted(known)}")
  return names


def device_line() -> str:
  """`device: ...` — what every benchmark table is measured on."""
  import jax
  dev = jax.devices()[0]
  return (f"device: {dev.platform} {dev.device_kind} ({cpu_name()}, {os.cpu_count()} cores "
          f"visible), jax {jax.__version__}, {len(jax.devices())} device(s)")


def random_batch(config, spec, rng, text_len: int, adversarial: bool = False) -> dict:
  """A training batch of standard-normal latents (numpy) for `config`'s step:
  clips of train.clip_frames [B, T, h, w, C] with the model's actions,
  controls and text (text_len tokens); `adversarial`: clips of
  adversarial.segment_frames with actions, the rollout's start frame and its
  actions (no controls or text)."""
  import numpy as np
  b = int(config.train.batch_size)
  h, w = spec.latent_size
  frame = (h, w, spec.latent_channels)
  t = int(config.adversarial.segment_frames if adversarial else config.train.clip_frames)
  batch = {"latents": rng.standard_normal((b, t) + frame).astype(np.float32)}
  if spec.num_actions:
    batch["actions"] = rng.integers(0, spec.num_actions, (b, t)).astype(np.int32)
  if adversarial:
    batch["rollout_first"] = rng.standard_normal((b,) + frame).astype(np.float32)
    if spec.num_actions:
      batch["rollout_actions"] = rng.integers(
          0, spec.num_actions, (b, int(config.adversarial.rollout_frames))).astype(np.int32)
    return batch
  if spec.control_dim:
    batch["controls"] = rng.standard_normal((b, t, spec.control_dim)).astype(np.float32)
  if spec.text_dim:
    batch["text_embedding"] = rng.standard_normal((b, text_len, spec.text_dim)).astype(np.float32)
    batch["text_mask"] = np.ones((b, text_len), bool)
  return batch
