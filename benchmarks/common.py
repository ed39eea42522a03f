"""What every benchmark prints about the machine it ran on."""
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
