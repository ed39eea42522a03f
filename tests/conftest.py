"""Test set-up: 8 fake CPU devices (set before JAX's backend initialises) and
the persistent compilation cache, so reruns skip recompiles."""
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/helpers.py

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("AAPT_JAX_CACHE", os.path.expanduser("~/.cache/aapt_jax/jax")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
