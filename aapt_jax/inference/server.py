"""The playable page: HTTP + WebSocket (aiohttp), JPEG frames out, keys in.

Routes: `GET /` the page (static/play.html), `GET /ws` one stream per
connection, `GET /status` JSON {"sessions", "max_sessions"}.

WebSocket protocol. Client -> server, JSON text messages:

  {"type": "action", "action": "LEFT" | 3, "seq": 17}  hold an action (name or id)
                                                       from the next frame on
  {"type": "controls", "controls": [0.5, -1.0], "seq": 18}  hold a control vector
                                                       (model.control_dim floats)
  {"type": "start"}                                    restart from the stored start frame
  {"type": "start", "seed": 5}                         ... from the world's frame for seed 5
  {"type": "start", "image": "data:image/jpeg;base64,..."}  ... from an image
  {"type": "reset"}                                    back to right after the last start

Server -> client: a JSON `hello` (action names, control names -- a camera
world's ["yaw", "forward", "strafe"] make the page steer by mouse look and
WASD --, fps, frame size, limits), JSON
`error` messages for bad input (the stream goes on), and binary frames:
header `<IIi` (video frame number, seq of the last action or controls
message applied, the action id it shows; -1 = none, -2 = a control vector)
followed by the JPEG. A connection over
`max_sessions` gets a JSON `full` message and a close (code 1013), not a hang.

Every model call (and JPEG encode) runs on one worker thread, so the event
loop never blocks; each connection has its own `StreamingSession`, freed when
the connection closes.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import math
import json
import logging
import os
import struct
import time

import numpy as np
import simplejpeg
from aiohttp import WSCloseCode, WSMsgType, web

from aapt_jax.inference.session import StreamingModel, StreamingSession

log = logging.getLogger("aapt_jax.play")
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
FRAME_HEADER = struct.Struct("<IIi")   # frame number, acknowledged seq, action id
CONTROLS_SHOWN = -2                    # the header's action field for a control-vector frame
MAX_MESSAGE_BYTES = 4 << 20            # an uploaded first frame fits easily
DEFAULT_FPS = 24.0                     # for worlds without a frame rate of their own


def encode_frame(frame: np.ndarray, number: int, ack: int, action: int, quality: int) -> bytes:
  """One binary frame message: header + JPEG of a uint8 [H, W, 3] frame."""
  jpeg = simplejpeg.encode_jpeg(np.ascontiguousarray(frame), quality=quality, colorspace="RGB")
  return FRAME_HEADER.pack(number, ack, action) + jpeg


def decode_frame_message(data: bytes) -> tuple[int, int, int, np.ndarray]:
  """(frame number, ack, action, uint8 [H, W, 3]) of a binary frame message."""
  number, ack, action = FRAME_HEADER.unpack_from(data)
  return number, ack, action, simplejpeg.decode_jpeg(data[FRAME_HEADER.size:], colorspace="RGB")


class _Controls:
  """What a connection's reader hands its stream loop (both on the event
  loop): the held action and control vector, and a pending start/reset,
  applied at the next frame."""

  def __init__(self, action: int):
    self.action, self.vector, self.seq, self.command = action, None, 0, None


class PlayServer:
  """Serves `model` to up to `max_sessions` WebSocket connections at once.

  Args:
    model: the loaded `StreamingModel` (one compile shared by all sessions).
    max_sessions: live streams at once; the next connection gets `full`.
    fps: video frames per second streamed (None = the world's rate, else 24).
    jpeg_quality: 1..100.
  """

  def __init__(self, model: StreamingModel, *, max_sessions: int = 4, fps: float | None = None,
               jpeg_quality: int = 90):
    if max_sessions < 1:
      raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
    if fps is not None and not 0 < fps <= 240:
      raise ValueError(f"fps must be in (0, 240], got {fps}")
    if not 1 <= jpeg_quality <= 100:
      raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
    self.model = model
    self.max_sessions = int(max_sessions)
    self.fps = float(fps or model.fps or DEFAULT_FPS)
    self.jpeg_quality = int(jpeg_quality)
    self.sessions: dict[int, StreamingSession] = {}
    self._next_id = 0
    self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="aapt-model")

  # ------------------------------------------------------------------ app
  def app(self) -> web.Application:
    app = web.Application()
    app.router.add_get("/", self._page)
    app.router.add_get("/ws", self._websocket)
    app.router.add_get("/status", self._status)
    app.on_cleanup.append(self._close)
    return app

  async def _close(self, app):
    del app
    self._worker.shutdown(wait=False, cancel_futures=True)

  def warm_up(self) -> None:
    """Compiles the step (one start + one step of a throwaway session)."""
    session = StreamingSession(self.model)
    session.start()
    session.step(self.model.noop if self.model.num_actions else None)

  async def _page(self, request):
    del request
    return web.FileResponse(os.path.join(STATIC_DIR, "play.html"))

  async def _status(self, request):
    del request
    return web.json_response({"sessions": len(self.sessions), "max_sessions": self.max_sessions})

  def _hello(self, session_id: int) -> dict:
    m = self.model
    return {"type": "hello", "session": session_id, "actions": m.action_names,
            "num_actions": m.num_actions, "control_dim": m.control_dim,
            "control_names": list(getattr(m.world, "control_names", None) or []),
            "noop": m.noop if m.num_actions else -1, "fps": self.fps,
            "frame_size": list(m.frame_size), "frames_per_latent": m.frames_per_latent,
            "stored_start_frame": m.start_frame is not None, "world": m.world is not None,
            "max_sessions": self.max_sessions, "source": m.source}

  # ------------------------------------------------------------- messages
  def _action_id(self, value) -> int:
    m = self.model
    if not m.num_actions:
      raise ValueError("this world takes control vectors, not actions")
    if isinstance(value, str) and m.action_names:
      if value.upper() not in m.action_names:
        raise ValueError(f"unknown action name {value!r}; this world has {m.action_names}")
      return m.action_names.index(value.upper())
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < m.num_actions:
      return value
    raise ValueError(f"invalid action {value!r}: give an id 0..{m.num_actions - 1}"
                     + (f" or a name in {m.action_names}" if m.action_names else ""))

  def _image(self, data_url) -> np.ndarray:
    """A data URL (JPEG) -> uint8 [H, W, 3] resized to the model's frame size."""
    from aapt_jax.image_utils import resize_area
    if not isinstance(data_url, str) or "," not in data_url:
      raise ValueError("'image' must be a data URL (data:image/jpeg;base64,...)")
    try:
      image = simplejpeg.decode_jpeg(base64.b64decode(data_url.split(",", 1)[1]),
                                     colorspace="RGB")
    except (ValueError, binascii.Error) as e:
      raise ValueError(f"'image' is not a readable JPEG: {e}") from None
    return resize_area(image, self.model.frame_size)

  def _control_vector(self, value) -> list[float]:
    n = self.model.control_dim
    if not n:
      raise ValueError("this world takes actions, not control vectors")
    if (not isinstance(value, list) or len(value) != n or
        not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                for v in value)):
      raise ValueError(f"'controls' must be a list of {n} finite numbers, got {value!r:.80}")
    return [float(v) for v in value]

  @staticmethod
  def _seq(msg, controls: _Controls) -> int:
    seq = msg.get("seq", controls.seq)
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq < 2 ** 32:
      raise ValueError(f"'seq' must be an integer in [0, 2^32), got {seq!r}")
    return seq

  async def _parse(self, text: str, controls: _Controls) -> None:
    """Applies one client message to `controls`; ValueError names what is wrong."""
    try:
      msg = json.loads(text)
    except ValueError:
      raise ValueError(f"not JSON: {text[:80]!r}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
      raise ValueError("a message must be a JSON object with a string 'type'")
    kind = msg["type"]
    if kind == "action":
      action = self._action_id(msg.get("action"))
      controls.action, controls.seq = action, self._seq(msg, controls)
    elif kind == "controls":
      vector = self._control_vector(msg.get("controls"))
      controls.vector, controls.seq = vector, self._seq(msg, controls)
    elif kind == "start":
      seed, image = msg.get("seed"), msg.get("image")
      if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)
                               or not 0 <= seed < 2 ** 31):
        raise ValueError(f"'seed' must be an integer in [0, 2^31), got {seed!r}")
      if seed is not None and self.model.world is None:
        raise ValueError("this world has no emulator: start from the stored frame or an image")
      if image is not None:  # decoded off the event loop
        frame = await asyncio.get_running_loop().run_in_executor(None, self._image, image)
      else:
        frame = self._default_start(seed)
      controls.command = ("start", frame)
    elif kind == "reset":
      controls.command = ("reset", None)
    else:
      raise ValueError(f"unknown message type {kind!r}: use action, controls, start or reset")

  def _default_start(self, seed=None) -> np.ndarray:
    if seed is None and self.model.start_frame is None and self.model.world is None:
      raise ValueError("this model has no stored start frame: send a start image")
    return self.model.default_start_frame(seed)

  # --------------------------------------------------------------- stream
  def _advance(self, session: StreamingSession, command, action: int, vector, seq: int,
               number: int):
    """On the worker thread: one model call -> the binary frame messages."""
    if command is None:
      action = action if action >= 0 else None
      if self.model.control_dim:  # the vector (zeros until one is sent), with the action if any
        vector = vector if vector is not None else [0.0] * self.model.control_dim
        frames = session.step((action, vector) if self.model.num_actions else vector)
        action = CONTROLS_SHOWN if action is None else action
      else:
        frames = session.step(action)
        action = -1 if action is None else action
    elif command[0] == "start":
      frames, action = session.start(command[1]), -1
    else:
      frames, action = session.reset(), -1
    return [encode_frame(f, number + i, seq, action, self.jpeg_quality)
            for i, f in enumerate(frames)]

  async def _stream(self, ws, session: StreamingSession, controls: _Controls):
    """Steps the session and sends its frames at self.fps until the socket closes."""
    loop = asyncio.get_running_loop()
    period = 1.0 / self.fps
    number, due = 0, time.perf_counter()
    try:
      while not ws.closed:
        command, controls.command = controls.command, None
        if command is None and not session.started:  # waiting for a start image
          await asyncio.sleep(period)
          continue
        messages = await loop.run_in_executor(self._worker, self._advance, session, command,
                                              controls.action, controls.vector, controls.seq,
                                              number)
        for message in messages:
          now = time.perf_counter()
          due = max(due + period, now - period)  # never run ahead, never build up a debt
          if due > now:
            await asyncio.sleep(due - now)
          if ws.closed:
            return
          await ws.send_bytes(message)
          number += 1
    except ConnectionResetError:  # the client went away mid-send
      return
    except Exception as e:  # noqa: BLE001 - a model error ends this stream, not the server
      log.exception("stream failed")
      if not ws.closed:
        await ws.send_json({"type": "error", "message": f"the stream stopped: {e}"})
        await ws.close(code=WSCloseCode.INTERNAL_ERROR, message=b"stream failed")

  async def _websocket(self, request):
    ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE_BYTES, heartbeat=30.0)
    await ws.prepare(request)
    if len(self.sessions) >= self.max_sessions:
      await ws.send_json({"type": "full", "message": (
          f"the server is full: {len(self.sessions)} of {self.max_sessions} sessions in use; "
          "close another tab or try again later")})
      await ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=b"server full")
      return ws
    session_id, self._next_id = self._next_id, self._next_id + 1
    session = StreamingSession(self.model, seed=session_id)
    self.sessions[session_id] = session
    log.info("session %d opened (%d live)", session_id, len(self.sessions))
    controls = _Controls(self.model.noop if self.model.num_actions else -1)
    stream = None
    try:
      await ws.send_json(self._hello(session_id))
      try:
        controls.command = ("start", self._default_start())
      except ValueError as e:  # the client must send an image first
        await ws.send_json({"type": "error", "message": str(e)})
      stream = asyncio.create_task(self._stream(ws, session, controls))
      async for msg in ws:
        if msg.type == WSMsgType.TEXT:
          try:
            await self._parse(msg.data, controls)
          except ValueError as e:
            await ws.send_json({"type": "error", "message": str(e)})
        elif msg.type == WSMsgType.BINARY:
          await ws.send_json({"type": "error", "message": "binary messages are not understood: "
                              "send JSON text"})
    except ConnectionResetError:
      pass
    finally:  # free the session first: aiohttp may cancel this handler when the client drops
      del self.sessions[session_id]
      log.info("session %d closed (%d live)", session_id, len(self.sessions))
      if stream is not None:
        stream.cancel()
      if not ws.closed:
        await ws.close()
    return ws
