"""The paper's scale: a ~8B-parameter generator of the Wan family.

736x416 video at 24 fps; the Wan VAE (4x temporal, 8x spatial, 16 channels)
makes 52x92 latents, 46x26 = 1196 tokens per latent frame; one latent frame
= 4 video frames, so 6 latent frames/s. The sliding window holds 30 latent
frames (5 s) plus the first frame as the attention sink.
"""
from configs import base


def get_config(arg=None):
  c = base.get_config(arg)
  m = c.model
  m.dim = 4096
  m.num_layers = 36
  m.num_heads = 32            # head dim 128, RoPE split 44/42/42
  m.ffn_dim = 11008
  m.freq_dim = 256
  m.text_dim = 4096           # umT5-XXL embeddings
  m.latent_channels = 16
  m.patch_size = (1, 2, 2)
  m.latent_size = (52, 92)
  m.window_frames = 30
  m.num_actions = 0
  m.control_dim = 0
  m.dtype = "bfloat16"
  m.remat = "full"
  c.train.batch_size = 64
  c.train.clip_frames = 21
  c.mesh.data = -1
  c.mesh.fsdp = 8
  c.mesh.tensor = 1
  return c
