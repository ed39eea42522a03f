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
WASD --, fps, frame size, limits), JSON `error` messages for bad input (the
stream goes on; every malformed message, however deep or large its numbers,
gets one), an `idle` message before the server closes a connection that sent
nothing for `idle_timeout` seconds (code 1001, its slot freed), and binary frames:
header `<IIi` (video frame number, seq of the last action or controls
message applied, the action id it shows; -1 = none, -2 = a control vector)
followed by the JPEG. A connection over
`max_sessions` gets a JSON `full` message and a close (code 1013), not a hang.

Every model call (and JPEG encode) runs on one worker thread, emulator resets
(seed starts) in a child process (ale-py holds the GIL) and image decodes on
the loop's default executor, so the event loop never blocks; each connection has its own `StreamingSession`,
freed when the connection closes.

Edges, read as a hostile page or client would:
  - Origin: a browser's handshake from another origin than the page's own
    (scheme://host:port of the request, the host an IP address or localhost)
    is refused with 403 before any message, unless listed in `allow_origins`
    ("*" = any). A page served under a host name (a DNS-rebinding page
    included) must be listed. A handshake without an Origin header (not a
    browser: scripts, tests) is served.
  - No absolute path leaves the server: the `hello` names the checkpoint by its
    last path component, and errors show paths the same way.
  - Image starts: the JPEG header is read first; more than MAX_IMAGE_SIDE pixels
    on a side is refused naming the limit, before any pixel is decoded; a
    decode is scaled down by libjpeg (DCT scaling) towards the frame size.
  - Seed and image starts: at most START_BURST at once, then one per
    1 / START_RATE s per connection (an `error` names the wait).
  - Control values must lie in [-1, 1] (the page's sliders' range): anything
    else, inf, nan or an integer too large for a float, is refused, not clamped.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import concurrent.futures
import json
import logging
import os
import re
import struct
import time

import numpy as np
import simplejpeg
from aiohttp import WSCloseCode, WSMsgType, web

from aapt_jax.inference.session import StreamingModel, StreamingSession
from aapt_jax.inference.world_process import WorldResets

log = logging.getLogger("aapt_jax.play")
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
FRAME_HEADER = struct.Struct("<IIi")   # frame number, acknowledged seq, action id
CONTROLS_SHOWN = -2                    # the header's action field for a control-vector frame
MAX_MESSAGE_BYTES = 4 << 20            # an uploaded first frame fits easily
DEFAULT_FPS = 24.0                     # for worlds without a frame rate of their own
MAX_IMAGE_SIDE = 4096                  # pixels per side of an uploaded start image
START_BURST, START_RATE = 4, 1.0       # seed/image starts: a burst, then per second
DEFAULT_IDLE_TIMEOUT = 600.0           # s without a client message before the slot is freed
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])/(?:[^\s'\"/]+/)*([^\s'\"/]*)")


def hide_paths(text: str) -> str:
  """`text` with every absolute path replaced by its last component
  ("/home/me/runs/atari/consistency/100" -> "100")."""
  return _ABSOLUTE_PATH.sub(lambda m: m.group(1) or ".", str(text))


def public_source(source: str) -> str:
  """A checkpoint's name a client may see: the last two components of its
  path ("runs/atari/consistency/100" -> "consistency/100"), never a full path."""
  parts = [p for p in str(source).replace(os.sep, "/").split("/") if p]
  return "/".join(parts[-2:]) if parts else str(source)


def origin_allowed(origin: str | None, scheme: str, host: str, allow_origins) -> bool:
  """Whether a WebSocket handshake with header `Origin: origin` to `host` (the
  request's Host header, with its port) over `scheme` may proceed: no Origin
  (not a browser), one in `allow_origins` ("*" = any), or the page's own
  origin when its host is an IP address or "localhost" (a named host must be
  listed: a DNS-rebinding page has its own name as both Origin and Host)."""
  if origin is None:
    return True
  origin = origin.strip().rstrip("/").lower()
  allowed = {o.strip().rstrip("/").lower() for o in allow_origins}
  if "*" in allowed or origin in allowed:
    return True
  name = host.lower().rsplit(":", 1)[0] if not host.endswith("]") else host.lower()
  name = name.strip("[]")
  try:
    literal = name == "localhost" or bool(ipaddress.ip_address(name))
  except ValueError:
    literal = False
  return literal and origin == f"{scheme}://{host}".lower()


def check_origins(allow_origins) -> tuple[str, ...]:
  """`allow_origins` as a tuple; ValueError naming one that is no origin."""
  for origin in allow_origins:
    if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin.strip().rstrip("/")):
      raise ValueError(f"--allow_origin {origin!r} is not an origin: give scheme://host[:port] "
                       "(e.g. http://localhost:3000) or *")
  return tuple(allow_origins)


def jpeg_size(data: bytes) -> tuple[int, int]:
  """(height, width) from a JPEG's header (its SOF marker), without decoding
  pixels; ValueError when `data` is not a JPEG."""
  try:
    height, width, _, _ = simplejpeg.decode_jpeg_header(data)
  except (ValueError, RuntimeError) as e:
    raise ValueError(f"'image' is not a readable JPEG: {e}") from None
  return int(height), int(width)


def encode_frame(frame: np.ndarray, number: int, ack: int, action: int, quality: int) -> bytes:
  """One binary frame message: header + JPEG of a uint8 [H, W, 3] frame."""
  jpeg = simplejpeg.encode_jpeg(np.ascontiguousarray(frame), quality=quality, colorspace="RGB")
  return FRAME_HEADER.pack(number, ack, action) + jpeg


def decode_frame_message(data: bytes) -> tuple[int, int, int, np.ndarray]:
  """(frame number, ack, action, uint8 [H, W, 3]) of a binary frame message."""
  number, ack, action = FRAME_HEADER.unpack_from(data)
  return number, ack, action, simplejpeg.decode_jpeg(data[FRAME_HEADER.size:], colorspace="RGB")


def _preview(value) -> str:
  """At most 80 characters of repr(value); a huge integer by its digit count."""
  if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
    return f"an integer of {len(str(abs(value)))} digits"
  text = repr(value) if not isinstance(value, list) or len(value) <= 16 else \
      f"a list of {len(value)} items"
  return text[:80]


class _Controls:
  """What a connection's reader hands its stream loop (both on the event
  loop): the held action and control vector, and a pending start/reset,
  applied at the next frame."""

  def __init__(self, action: int):
    self.action, self.vector, self.seq, self.command = action, None, 0, None
    self.start_tokens, self.start_clock = float(START_BURST), time.monotonic()

  def take_start(self) -> None:
    """Spends one start (seed or image) of the per-connection budget:
    START_BURST at once, refilled at START_RATE per second; ValueError when
    none is left. (A connection's messages are handled one at a time, so a
    start being prepared holds back its next message.)"""
    now = time.monotonic()
    self.start_tokens = min(START_BURST, self.start_tokens + (now - self.start_clock) * START_RATE)
    self.start_clock = now
    if self.start_tokens < 1:
      raise ValueError(f"too many starts: at most {START_BURST} at once, then one per "
                       f"{1 / START_RATE:g} s; try again in "
                       f"{(1 - self.start_tokens) / START_RATE:.1f} s")
    self.start_tokens -= 1


class PlayServer:
  """Serves `model` to up to `max_sessions` WebSocket connections at once.

  Args:
    model: the loaded `StreamingModel` (one compile shared by all sessions).
    max_sessions: live streams at once; the next connection gets `full`.
    fps: video frames per second streamed (None = the world's rate, else 24).
    jpeg_quality: 1..100.
    allow_origins: origins ("http://host:port", "*" = any) whose pages may open
      a stream besides the server's own page.
    idle_timeout: seconds without a client message before the connection is
      told (`idle`) and closed, freeing its slot; 0 = never.
  """

  def __init__(self, model: StreamingModel, *, max_sessions: int = 4, fps: float | None = None,
               jpeg_quality: int = 90, allow_origins=(),
               idle_timeout: float = DEFAULT_IDLE_TIMEOUT):
    if max_sessions < 1:
      raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
    if fps is not None and not 0 < fps <= 240:
      raise ValueError(f"fps must be in (0, 240], got {fps}")
    if not 1 <= jpeg_quality <= 100:
      raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
    if not idle_timeout >= 0:
      raise ValueError(f"idle_timeout must be >= 0 seconds (0 = never), got {idle_timeout}")
    self.allow_origins = check_origins(allow_origins)
    self.idle_timeout = float(idle_timeout)
    self.model = model
    self.max_sessions = int(max_sessions)
    self.fps = float(fps or model.fps or DEFAULT_FPS)
    self.jpeg_quality = int(jpeg_quality)
    self.sessions: dict[int, StreamingSession] = {}
    self._next_id = 0
    self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="aapt-model")
    self._world_resets = WorldResets(model.config) if model.world is not None else None
    # the default start without a stored frame: seed 0's, computed once before serving
    self._seed0_frame = (model.default_start_frame(None) if model.start_frame is None and
                         model.world is not None else None)

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
    if self._world_resets is not None:
      self._world_resets.close()

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
            "max_sessions": self.max_sessions, "idle_timeout": self.idle_timeout,
            "max_image_side": MAX_IMAGE_SIDE, "source": public_source(m.source)}

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
    """A data URL (JPEG) -> uint8 [H, W, 3] resized to the model's frame size.
    The size is read from the header first (ValueError over MAX_IMAGE_SIDE);
    libjpeg decodes at the smallest DCT scale still >= the frame size."""
    from aapt_jax.image_utils import resize_area
    if not isinstance(data_url, str) or "," not in data_url:
      raise ValueError("'image' must be a data URL (data:image/jpeg;base64,...)")
    try:
      data = base64.b64decode(data_url.split(",", 1)[1])
    except (ValueError, binascii.Error) as e:
      raise ValueError(f"'image' is not a readable JPEG: {e}") from None
    height, width = jpeg_size(data)
    if max(height, width) > MAX_IMAGE_SIDE:
      raise ValueError(f"'image' is {width}x{height} pixels: the limit is {MAX_IMAGE_SIDE} "
                       f"pixels per side (MAX_IMAGE_SIDE); send a smaller image")
    frame_h, frame_w = self.model.frame_size
    try:
      image = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=frame_h,
                                     min_width=frame_w)
    except (ValueError, RuntimeError) as e:
      raise ValueError(f"'image' is not a readable JPEG: {e}") from None
    return resize_area(image, self.model.frame_size)

  def _control_vector(self, value) -> list[float]:
    n = self.model.control_dim
    if not n:
      raise ValueError("this world takes actions, not control vectors")
    if (not isinstance(value, list) or len(value) != n or
        not all(isinstance(v, (int, float)) and not isinstance(v, bool) and -1 <= v <= 1
                for v in value)):  # nan fails the comparison; no int is turned into a float
      raise ValueError(f"'controls' must be a list of {n} finite numbers in [-1, 1], got "
                       f"{_preview(value)}")
    return [float(v) for v in value]

  @staticmethod
  def _seq(msg, controls: _Controls) -> int:
    seq = msg.get("seq", controls.seq)
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq < 2 ** 32:
      raise ValueError(f"'seq' must be an integer in [0, 2^32), got {_preview(seq)}")
    return seq

  async def _parse(self, text: str, controls: _Controls) -> None:
    """Applies one client message to `controls`; ValueError names what is wrong."""
    try:
      msg = json.loads(text)
    except RecursionError:
      raise ValueError("JSON nested too deeply: send a flat message") from None
    except ValueError as e:  # includes integers of more than 4300 digits
      raise ValueError(f"not JSON ({str(e)[:80]}): {text[:80]!r}") from None
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
        raise ValueError(f"'seed' must be an integer in [0, 2^31), got {_preview(seed)}")
      if seed is not None and self.model.world is None:
        raise ValueError("this world has no emulator: start from the stored frame or an image")
      if image is None and seed is None:  # the stored frame (or seed 0's, prepared once)
        controls.command = ("start", await self._start_frame(None))
        return
      controls.take_start()
      if image is not None:  # the header checked, then decoded off the event loop
        frame = await asyncio.get_running_loop().run_in_executor(None, self._image, image)
      else:
        frame = await self._start_frame(seed)
      controls.command = ("start", frame)
    elif kind == "reset":
      controls.command = ("reset", None)
    else:
      raise ValueError(f"unknown message type {kind!r}: use action, controls, start or reset")

  async def _start_frame(self, seed=None) -> np.ndarray:
    """The stored start frame (seed None), else the world's frame for `seed`
    (None: seed 0's, computed before serving; else an emulator reset in the
    world process, which never holds this process's GIL)."""
    if seed is None:
      if self.model.start_frame is not None:
        return self.model.start_frame
      if self._seed0_frame is None:
        raise ValueError("this model has no stored start frame: send a start image")
      return self._seed0_frame
    return await self._world_resets.frame(seed)

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
        await ws.send_json({"type": "error", "message": hide_paths(f"the stream stopped: {e}")})
        await ws.close(code=WSCloseCode.INTERNAL_ERROR, message=b"stream failed")

  async def _websocket(self, request):
    origin = request.headers.get("Origin")
    if not origin_allowed(origin, request.scheme, request.host, self.allow_origins):
      log.warning("refused a WebSocket from origin %r", origin)
      raise web.HTTPForbidden(text=f"origin {origin[:100]!r} may not open a stream here: only "
                              "the server's own page (start the server with --allow_origin "
                              "to add one)")
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
    stream, close = None, (WSCloseCode.OK, b"")
    try:
      await ws.send_json(self._hello(session_id))
      try:
        controls.command = ("start", await self._start_frame())
      except ValueError as e:  # the client must send an image first
        await ws.send_json({"type": "error", "message": hide_paths(e)})
      stream = asyncio.create_task(self._stream(ws, session, controls))
      while True:
        try:  # a deadline of our own: aiohttp's receive timeout restarts at every pong
          async with asyncio.timeout(self.idle_timeout or None):
            msg = await ws.receive()
        except TimeoutError:  # the slot is freed before the close handshake (finally)
          await ws.send_json({"type": "idle", "message": (
              f"closed after {self.idle_timeout:g} s without a key or message: "
              "reload to play again")})
          close = (WSCloseCode.GOING_AWAY, b"idle")
          break
        if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
          break
        if msg.type == WSMsgType.TEXT:
          try:
            await self._parse(msg.data, controls)
          except ValueError as e:
            await ws.send_json({"type": "error", "message": hide_paths(e)})
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
        await ws.close(code=close[0], message=close[1])
    return ws
