"""The camera world: ViZDoom (Freedoom 2 MAP01, no monsters), steered by a
continuous control vector per frame, on one CPU.

Controls (aapt_jax/data/worlds/doom.py): model.control_dim = 3 floats in
[-1, 1] per latent frame -- yaw rate (+1 = turn right 8 degrees per frame),
forward/backward speed, strafe right/left; no discrete actions
(model.num_actions = 0). The page maps mouse look to the yaw and WASD to
forward/strafe.

Pixel space, as configs/atari.py and for its reasons: 64x64 RGB frames become
16x16x48 latents by 4x4 space-to-depth, one latent frame per video frame
(r = 1, a control shows in the very next frame), 64 tokens per frame; the
model has the Atari one's size and shape (dim 192, 6 layers), so the same
step cost: the Atari VAE's streaming decode alone measured ~230 ms per latent
frame on this CPU (8 video frames/s), under the 24 fps bar a pixel model
clears. A frame of Doom holds more detail than one of Pong (textures, a whole
scene shifting 5-6 pixels per frame when turning), which pixel space keeps
exactly; the price is a harder prediction at the same size, to be measured
on the trained model (issue 16).

  python launch/train.py --config=configs/doom.py --workdir=runs/doom       # pipeline
  python launch/train.py --config=configs/doom.py:full --workdir=runs/doom  # shipped run
"""
from configs import atari


def get_config(arg=None):
  if arg not in (None, "", "full"):
    raise ValueError(f"configs/doom.py: unknown variant {arg!r}; use configs/doom.py or "
                     "configs/doom.py:full")
  c = atari.get_config(arg)   # model size, stages and the :full schedule's lengths
  m = c.model
  m.num_actions = 0           # no discrete actions
  m.control_dim = 3           # yaw rate, forward, strafe (worlds/doom.py CONTROL_NAMES)
  c.data.world = "doom"
  c.data.game = "freedoom2"
  c.data.frame_size = 64
  c.data.frame_skip = 2       # 17.5 frames/s; Doom runs 35 tics/s
  # The main job records 8 episodes x 500 frames (~16 ms per frame here);
  # :full records 24 x 1000 (atari.py) and resumes when rerun.
  return c
