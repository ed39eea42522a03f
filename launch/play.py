"""Serves the playable page: a generated world you steer with the keyboard.

  python launch/play.py --checkpoint=runs/atari --port=8000   # then open http://localhost:8000

--checkpoint: a run directory (its last stage's latest step), a stage or step
directory, an inference export (launch/export.py) or a shipped export's name;
empty = the shipped export (aapt_jax/assets/atari). Each browser tab gets its
own stream, up to --max_sessions at once.
"""
import errno
import os
import socket
import sys

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

config_flags.DEFINE_config_file("config", None, "Optional: checked against the checkpoint's "
                                "own config (an error if the model differs).", lock_config=False)
flags.DEFINE_string("checkpoint", "", "Run, stage, step or export directory; empty = the "
                    "shipped export (aapt_jax/assets/atari).")
flags.DEFINE_string("workdir", "", "Run directory (used when --checkpoint is empty).")
flags.DEFINE_string("host", "127.0.0.1", "Interface to listen on (0.0.0.0 = all).")
flags.DEFINE_integer("port", 8000, "Port to listen on.")
flags.DEFINE_integer("max_sessions", 4, "Streams (browser tabs) served at once.")
flags.DEFINE_float("fps", 0, "Video frames/s streamed; 0 = the world's frame rate.")
flags.DEFINE_multi_string("allow_origin", [], "Origins (scheme://host:port, or *) whose "
                          "pages may open a stream besides this server's own page; repeatable.")
flags.DEFINE_float("idle_timeout", 600.0, "Seconds without a key or message before a tab's "
                   "stream is closed and its slot freed; 0 = never.")
flags.DEFINE_integer("steps", 0, "Forwards per latent frame: 1 = 1NFE; 0 = auto (16 Euler "
                     "steps for a stage-1 diffusion checkpoint, else 1).")
FLAGS = flags.FLAGS


def _check_port(host: str, port: int) -> None:
  """ValueError/OSError with a one-line reason when host:port cannot be listened on."""
  if not 1 <= port <= 65535:
    raise ValueError(f"--port={port} is not a port: give 1..65535")
  try:
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
  except (socket.gaierror, UnicodeError) as e:
    raise ValueError(f"--host={host!r} is not an address of this machine ({e}): give e.g. "
                     "127.0.0.1 or 0.0.0.0") from None
  with socket.socket(family, socket.SOCK_STREAM) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp: TIME_WAIT is free
    try:
      s.bind((host, port))
    except OSError as e:
      if e.errno == errno.EADDRNOTAVAIL:
        raise OSError(f"--host={host} is not an address of this machine ({e.strerror}): give "
                      "e.g. 127.0.0.1 or 0.0.0.0") from None
      raise OSError(f"cannot listen on {host}:{port} ({e.strerror}): is another server "
                    "running there? pick another --port") from None


def main(_):
  logging.set_verbosity(logging.WARNING)
  from aapt_jax.cli import fail
  try:
    _check_port(FLAGS.host, FLAGS.port)  # before the model loads and compiles
    from aiohttp import web
    from aapt_jax.inference.server import PlayServer, check_origins
    check_origins(FLAGS.allow_origin)
    if not FLAGS.idle_timeout >= 0:
      raise ValueError(f"--idle_timeout={FLAGS.idle_timeout} must be >= 0 seconds (0 = never)")
    from aapt_jax.inference.session import StreamingModel
    model = StreamingModel.load(FLAGS.checkpoint or FLAGS.workdir or None,
                                sampler_steps=FLAGS.steps)
    if FLAGS.config is not None:
      model.check_config(FLAGS.config)
    server = PlayServer(model, max_sessions=FLAGS.max_sessions, fps=FLAGS.fps or None,
                        allow_origins=FLAGS.allow_origin, idle_timeout=FLAGS.idle_timeout)
    print(f"play: {model.source} ({model.sampler_steps} forward(s) per latent frame); "
          "compiling ...", flush=True)
    server.warm_up()
    print(f"play: open http://{'localhost' if FLAGS.host in ('127.0.0.1', '0.0.0.0') else FLAGS.host}"
          f":{FLAGS.port} (Ctrl-C stops)", flush=True)
    web.run_app(server.app(), host=FLAGS.host, port=FLAGS.port, print=None)
  except (ValueError, FileNotFoundError, OSError) as e:
    fail("play", e)


if __name__ == "__main__":
  app.run(main)
