"""The tests' config: compiles in seconds on one CPU core."""
from configs import base


def get_config(arg=None):
  c = base.get_config(arg)
  m = c.model
  m.dim = 32
  m.num_layers = 2
  m.num_heads = 2
  m.ffn_dim = 64
  m.freq_dim = 32
  m.text_dim = 12
  m.latent_channels = 4
  m.latent_size = (4, 4)
  m.window_frames = 3
  m.num_actions = 5
  m.control_dim = 3
  c.train.batch_size = 2
  c.train.clip_frames = 5
  return c
