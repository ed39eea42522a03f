"""aapt_jax: Autoregressive Adversarial Post-Training in JAX/Flax."""
from aapt_jax.config import load_config

__all__ = ["load_config"]
