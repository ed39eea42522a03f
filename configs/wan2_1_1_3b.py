"""The shape of the public Wan2.1 T2V-1.3B transformer, for imported weights.

`configs/wan2_1_1_3b.py` is the AAPT model built on it (block-causal
attention, recycled-frame input channels); `configs/wan2_1_1_3b.py:plain` is
plain Wan (bidirectional, 16 input channels: exactly the public
1,418,996,800 parameters). 832x480 video -> 104x60 latents.
"""
from configs import base


def get_config(arg=None):
  c = base.get_config(None)
  m = c.model
  m.dim = 1536
  m.num_layers = 30
  m.num_heads = 12
  m.ffn_dim = 8960
  m.freq_dim = 256
  m.text_dim = 4096           # umT5-XXL embeddings
  m.latent_channels = 16
  m.patch_size = (1, 2, 2)
  m.latent_size = (60, 104)   # 480x832 / 8
  m.window_frames = 30
  m.num_actions = 0
  m.control_dim = 0
  m.dtype = "bfloat16"
  m.remat = "full"
  c.adversarial.disc_clips_per_forward = 1  # stage 3: one clip per D forward (memory)
  c.data.space_to_depth = 0   # records in Wan-VAE latents (prepare_data --vae_checkpoint),
                              # normalised by vae.latents_mean/std (base: Wan2.1's)
  if arg == "plain":
    m.block_causal = False
    m.frame_recycling = False
  elif arg not in (None, ""):
    raise ValueError(f"configs/wan2_1_1_3b.py takes no arg or 'plain', got {arg!r}")
  return c
