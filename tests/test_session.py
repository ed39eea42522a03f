"""StreamingSession: equal to Generator.step + decode by hand, one compile,
constant memory, reset, bad input, and the inference export round trip."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aapt_jax.checkpointing import config_to_dict
from aapt_jax.data import pipeline
from aapt_jax.inference import export as export_lib
from aapt_jax.inference.session import StreamingModel, StreamingSession, sampler_grid
from aapt_jax.models import Conditioning
from helpers import ROOT, compiled
from streaming_helpers import TINY_ATARI, tiny_streaming_model, tiny_world, write_tiny_export

# Everything in play: text, actions AND control vectors; 8x8 frames -> 4x4x12 latents.
TINY_FULL = (("stage", "consistency"), ("model.latent_channels", 12), ("data.world", ""),
             ("data.frame_size", 8), ("data.space_to_depth", 2))


def _hand_stream(model, params, first_frame, text, inputs, seed, steps, shift):
  """The stream computed by hand: the prefill step, then per frame noise ->
  (Euler peek steps) -> the committing Generator.step; decoded by pipeline's
  depth-to-space. inputs: (action or -1, control vector) per frame."""
  _, step = compiled(model)
  s = model.spec
  p = {"params": params}
  x = jnp.asarray(pipeline.pixels_to_latents(first_frame, 2))[None, None]
  text_mask = jnp.ones(text.shape[:2], bool)
  cond = lambda prev, a, c: Conditioning(previous=prev, text=text, text_mask=text_mask,
                                         actions=jnp.full((1, 1), a, jnp.int32),
                                         controls=jnp.asarray(c, jnp.float32)[None, None])
  cache = model.init_cache(1)
  _, cache = step(p, x, jnp.zeros((1, 1)), cond(jnp.zeros_like(x), 0, np.zeros(3)), cache)
  grid = sampler_grid(steps, shift)
  key = jax.random.key(seed)
  frames = [pipeline.latents_to_pixels(np.asarray(x[0, 0]), 2)]
  for i, (a, c) in enumerate(inputs, start=1):
    eps = jax.random.normal(jax.random.fold_in(key, i), x.shape)
    y = eps
    for k in range(steps, 1, -1):
      v, _ = step(p, y, jnp.full((1, 1), grid[k]), cond(x, a, c), cache, commit=False)
      y = y + (grid[k - 1] - grid[k]) * v
    v, cache = step(p, y, jnp.full((1, 1), grid[1]), cond(x, a, c), cache)
    x = y - grid[1] * v
    frames.append(pipeline.latents_to_pixels(np.asarray(x[0, 0]), 2))
  assert s.window_frames < len(inputs)  # the ring wrapped around
  return np.stack(frames)


@pytest.mark.parametrize("steps", [1, 2])
def test_session_equals_generator_step_and_decode_by_hand(steps):
  model = tiny_streaming_model(TINY_FULL, sampler_steps=steps)
  assert (model.num_actions, model.control_dim, model.frame_size) == (5, 3, (8, 8))
  first = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
  text = np.asarray(jax.random.normal(jax.random.key(3), (4, 12)))
  zeros, vec = np.zeros(3, np.float32), np.array([0.5, -1.0, 2.0], np.float32)
  inputs = [(1, zeros), (4, zeros), (-1, vec), (0, zeros), (2, zeros), (-1, -vec), (3, zeros)]
  session = StreamingSession(model, seed=5)
  out = [session.start(first, text=text)[0]]
  for a, c in inputs:
    out.append(session.step(a if a >= 0 else c)[0])
  out = np.stack(out)
  np.testing.assert_array_equal(out[0], first)  # the first frame is the real one, exactly
  ref = _hand_stream(model.model, model.params, first, jnp.asarray(text)[None], inputs, 5,
                     steps, float(model.config.diffusion.timestep_shift))
  diff = np.abs(out.astype(int) - ref.astype(int))
  assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
  # the actions matter: another action at frame 1 gives another frame
  session.reset()
  assert np.abs(session.step(2)[0].astype(int) - out[1].astype(int)).max() > 0


def test_reset_replays_and_bad_input_is_a_clear_error():
  session = StreamingSession(tiny_streaming_model(), seed=1)
  first = session.start()
  assert first.shape == (1, 16, 16, 3) and first.dtype == np.uint8
  actions = [2, 2, 3, 1, 0]
  a = np.stack([session.step(x) for x in actions])
  assert session.frame_index == 1 + len(actions)
  np.testing.assert_array_equal(session.reset(), first)
  assert session.frame_index == 1
  np.testing.assert_array_equal(np.stack([session.step(x) for x in actions]), a)
  for bad in (6, -1, 99):  # Pong has 6 actions
    with pytest.raises(ValueError, match="invalid action"):
      session.step(bad)
  with pytest.raises(ValueError, match="invalid action"):
    session.step([0.1, 0.2])  # a vector for an action-only model
  with pytest.raises(ValueError, match=r"first_frame must be uint8 \[16, 16, 3\]"):
    session.start(np.zeros((8, 8, 3), np.uint8))
  with pytest.raises(ValueError, match="takes no text"):
    session.start(text=np.zeros((2, 4)))
  with pytest.raises(ValueError, match="call start"):
    StreamingSession(tiny_streaming_model()).step(0)


def _live_bytes():
  return sum(a.nbytes for a in jax.live_arrays())


def test_one_compile_and_constant_memory_over_hundreds_of_steps():
  config, params = tiny_world()
  model = StreamingModel(config, params)  # its own jitted step: a fresh compile count
  session = StreamingSession(model)
  session.start()
  rng = np.random.default_rng(0)

  def play(n):
    for _ in range(n):
      frames = session.step(int(rng.integers(6)))
    return frames

  last = play(20)
  before = (_live_bytes(), len(jax.live_arrays()))
  last = play(400)
  assert (_live_bytes(), len(jax.live_arrays())) == before
  assert session.frame_index == 421  # far past the window (3): the ring wrapped many times
  assert last.shape == (1, 16, 16, 3)
  assert model.step_fn._cache_size() == 1  # prefill and every step: one compiled function
  session.reset()
  session.start(seed=3)  # a restart on the same model compiles nothing new
  session.step(1)
  assert model.step_fn._cache_size() == 1


def test_export_round_trip(tmp_path):
  out = write_tiny_export(tmp_path / "export")
  assert sorted(os.listdir(out)) == ["config.json", "export.json", "generator.msgpack",
                                     "start_frame.npy"]
  config, params = tiny_world()
  loaded = StreamingSession.load(out, seed=2)
  bf16 = jax.tree.map(lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32), params)
  for a, b in zip(jax.tree.leaves(loaded.model.params), jax.tree.leaves(bf16)):
    np.testing.assert_array_equal(np.asarray(a), b)
  assert config_to_dict(loaded.model.config) == config_to_dict(config)
  assert loaded.model.sampler_steps == 1 and loaded.action_names[:2] == ["NOOP", "FIRE"]
  # the same stream as the in-memory model with bf16-rounded params
  ref = StreamingSession(StreamingModel(config, bf16), seed=2)
  np.testing.assert_array_equal(loaded.start(), ref.start())
  for a in (1, 2, 3):
    np.testing.assert_array_equal(loaded.step(a), ref.step(a))


def test_broken_exports_and_checkpoints_are_clear_errors(tmp_path, monkeypatch):
  out = write_tiny_export(tmp_path / "export")
  with open(os.path.join(out, "config.json")) as f:
    cfg = json.load(f)
  cfg["model"]["dim"] = 48
  other = tmp_path / "other"
  os.makedirs(other)
  for name in os.listdir(out):
    with open(os.path.join(out, name), "rb") as f, open(other / name, "wb") as g:
      g.write(f.read())
  with open(other / "config.json", "w") as f:
    json.dump(cfg, f)
  with pytest.raises(ValueError, match="does not match its config's model"):
    StreamingSession.load(str(other))
  with open(os.path.join(out, "generator.msgpack"), "r+b") as f:
    f.truncate(100)
  with pytest.raises(ValueError, match="unreadable"):
    StreamingSession.load(out)
  with pytest.raises(FileNotFoundError, match="not a directory"):
    StreamingSession.load(str(tmp_path / "missing"))
  monkeypatch.setattr(export_lib, "SHIPPED_EXPORT", str(tmp_path / "assets" / "atari"))
  with pytest.raises(FileNotFoundError, match="no shipped export"):
    StreamingSession.load()


def test_export_command_from_a_run_directory(tmp_path):
  """launch/export.py on a training run: the EMA params, bf16, the emulator's
  first frame; StreamingSession.load reads it."""
  from aapt_jax import checkpointing, load_config, parallel
  from aapt_jax.models import build_generator
  from aapt_jax.training import optimizers, state as train_state
  config = load_config(os.path.join(ROOT, "configs", "tiny.py"),
                       {**dict(TINY_ATARI), "mesh.data": 1})
  tx = optimizers.make_optimizer(config.diffusion.optim, 10)
  with jax.set_mesh(parallel.make_mesh(config.mesh, jax.devices()[:1])):
    state, _ = train_state.create_train_state(build_generator(config), tx,
                                              parallel.make_mesh(config.mesh, jax.devices()[:1]))
  state = state.replace(ema_params=jax.tree.map(lambda a: a + 0.5, state.ema_params))
  run = str(tmp_path / "run")
  with checkpointing.Checkpointer(checkpointing.checkpoint_dir(run, "consistency")) as ckpt:
    ckpt.save(4, state, config=config)
  out = str(tmp_path / "export")
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "export.py"),
                         f"--checkpoint={run}", f"--out={out}"],
                        capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "consistency/checkpoints/4" in proc.stdout
  session = StreamingSession.load(out)
  ema = jax.tree.map(lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32),
                     state.ema_params)
  for a, b in zip(jax.tree.leaves(session.model.params), jax.tree.leaves(ema)):
    np.testing.assert_array_equal(np.asarray(a), b)
  from aapt_jax.data.worlds.atari import AtariWorld
  np.testing.assert_array_equal(session.start()[0], AtariWorld("Pong", size=16).reset(0))
  bad = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "export.py"),
                        f"--checkpoint={tmp_path / 'nope'}", f"--out={out}2"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert bad.returncode == 2
  assert bad.stderr.strip().count("\n") == 0 and "not a directory" in bad.stderr
