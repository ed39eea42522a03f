"""The paper's scale: a ~8B-parameter generator of the Wan family.

736x416 video at 24 fps; the Wan VAE (4x temporal, 8x spatial, 16 channels)
makes 52x92 latents, 46x26 = 1196 tokens per latent frame; one latent frame
= 4 video frames, so 6 latent frames/s. The sliding window holds 30 latent
frames (5 s) plus the first frame as the attention sink.

Sized for 256 accelerators (H100 80 GiB or TPU v5p): batch 64 over data=8 x
fsdp=8 = one sample per device, heads and MLP split over tensor=4.
`benchmarks/aot_8b.py` compiles the stage-1 step on such a mesh and prints
its memory per device; with tensor=1 (one sample and all 32 heads per
device) one layer's block-causal attention scores alone outgrow an H100.
On fewer devices lower train.batch_size so that each device keeps one
sample (batch = devices / 4); `aapt_jax.training.memory.check_fits` says
before allocating when a config cannot fit the devices at hand.
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
  # stage 3 judges its 4 x 3 clips per sample one per D forward (rematerialised):
  # the backward pass holds one clip's D activations, not twelve's
  c.adversarial.disc_clips_per_forward = 1
  c.train.clip_frames = 21
  c.mesh.data = -1
  c.mesh.fsdp = 8
  c.mesh.tensor = 4           # see the docstring: tensor=1 does not fit 80 GiB
  return c
