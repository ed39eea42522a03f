"""Simulators that produce (frames, actions) for training data.

  atari  ale-py games (`AtariWorld`), sticky actions off, exact replay.
"""
