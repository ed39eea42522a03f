"""Training: state, optimizers, per-stage steps, the loop."""
