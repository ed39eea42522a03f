"""Public checkpoints -> aapt_jax params (Wan2.1: `aapt_jax.convert.wan`)."""
