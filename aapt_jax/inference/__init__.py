"""Inference: streaming generation, one forward per latent frame."""
