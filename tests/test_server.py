"""The play server over aiohttp's test client: the frames it streams are the
session's frames for the actions it reports; bad messages, clients that
vanish mid-stream and too many sessions leave it serving."""
import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import aiohttp
import numpy as np
import portpicker
import pytest
import simplejpeg
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient, TestServer

from aapt_jax.inference.server import PlayServer, decode_frame_message, encode_frame
from aapt_jax.inference.session import StreamingModel, StreamingSession
from helpers import ROOT
from streaming_helpers import tiny_streaming_model, tiny_world, write_tiny_export

TIMEOUT = 60.0  # seconds; generous for a loaded 2-core CPU


def _serve(test, **options):
  """Runs `await test(client, server)` against a fresh PlayServer on the tiny world."""
  server = PlayServer(tiny_streaming_model(), fps=options.pop("fps", 240.0), **options)

  async def main():
    async with TestClient(TestServer(server.app())) as client:
      return await asyncio.wait_for(test(client, server), TIMEOUT)

  return asyncio.run(main())


async def _receive(ws, frames=0, texts=0):
  """Reads until `frames` binary and `texts` JSON messages arrived; returns both lists."""
  got_frames, got_texts = [], []
  while len(got_frames) < frames or len(got_texts) < texts:
    msg = await ws.receive()
    if msg.type == WSMsgType.BINARY:
      got_frames.append(msg.data)
    elif msg.type == WSMsgType.TEXT:
      got_texts.append(json.loads(msg.data))
    else:
      raise AssertionError(f"socket closed early: {msg.type} {msg.data} {msg.extra}")
  return got_frames, got_texts


async def _until(predicate, seconds=TIMEOUT):
  for _ in range(int(seconds / 0.02)):
    if predicate():
      return
    await asyncio.sleep(0.02)
  raise AssertionError("condition not reached")


def test_streamed_frames_are_the_sessions_frames_for_the_reported_actions():
  async def test(client, server):
    ws = await client.ws_connect("/ws")
    _, (hello,) = await _receive(ws, texts=1)
    assert hello["type"] == "hello" and hello["actions"][3] == "LEFT"
    assert hello["frame_size"] == [16, 16] and hello["stored_start_frame"] is False
    frames, _ = await _receive(ws, frames=3)
    await ws.send_json({"type": "action", "action": "left", "seq": 1})
    while True:
      more, _ = await _receive(ws, frames=1)
      frames += more
      if decode_frame_message(more[0])[1] == 1 and len(frames) >= 8:
        break
    await ws.send_json({"type": "action", "action": 2, "seq": 2})
    while decode_frame_message(frames[-1])[1] != 2:
      frames += (await _receive(ws, frames=1))[0]
    frames += (await _receive(ws, frames=2))[0]
    await ws.close()
    await _until(lambda: not server.sessions)
    return hello["session"], frames

  session_id, frames = _serve(test)
  headers = [decode_frame_message(f)[:3] for f in frames]
  assert [n for n, _, _ in headers] == list(range(len(frames)))  # no frame lost or reordered
  assert headers[0][2] == -1  # the start frame
  acks = [a for _, a, _ in headers]
  assert acks == sorted(acks) and {1, 2} <= set(acks)
  assert {act for _, a, act in headers[1:] if a == 1} == {3}  # "left" -> LEFT (id 3)
  assert {act for _, a, act in headers[1:] if a == 2} == {2}
  # the same actions through a session by hand give byte-identical messages
  by_hand = StreamingSession(tiny_streaming_model(), seed=session_id)
  expected = [encode_frame(by_hand.start()[0], 0, 0, -1, 90)]
  for n, ack, action in headers[1:]:
    expected.append(encode_frame(by_hand.step(action)[0], n, ack, action, 90))
  assert frames == expected


def test_malformed_messages_get_an_error_and_the_stream_goes_on():
  bad = [("not json", "not JSON"), ("[1, 2]", "JSON object"), ('{"type": 5}', "JSON object"),
         ('{"type": "teleport"}', "unknown message type"),
         ('{"type": "action", "action": "JUMP"}', "unknown action name"),
         ('{"type": "action", "action": 99}', "invalid action"),
         ('{"type": "action", "action": true}', "invalid action"),
         ('{"type": "action", "action": 1, "seq": -4}', "'seq'"),
         ('{"type": "start", "seed": "x"}', "'seed'"),
         ('{"type": "start", "image": "data:image/jpeg;base64,AAAA"}', "not a readable JPEG"),
         ('{"type": "start", "image": 7}', "data URL"),
         ('{"type": "controls", "controls": [1.0]}', "takes actions, not control vectors"),
         ("[" * 100_000 + "]" * 100_000, "nested too deeply"),  # RecursionError in json
         ('{"type": "action", "action": 1, "seq": ' + "9" * 5000 + "}", "not JSON"),
         ('{"type": "start", "seed": ' + "9" * 4000 + "}", "integer of 4000 digits"),
         (b"\x00\x01", "binary messages")]
  image = np.zeros((32, 32, 3), np.uint8)
  image[:, 16:] = 255  # left black, right white
  url = "data:image/jpeg;base64," + base64.b64encode(
      simplejpeg.encode_jpeg(image, quality=95, colorspace="RGB")).decode()

  async def test(client, server):
    ws = await client.ws_connect("/ws")
    await _receive(ws, frames=1, texts=1)
    for message, error in bad:
      await (ws.send_bytes(message) if isinstance(message, bytes) else ws.send_str(message))
      while True:
        _, texts = await _receive(ws, texts=1)
        if texts[0]["type"] == "error":
          break
      assert error in texts[0]["message"], (message, texts[0])
    frames, _ = await _receive(ws, frames=3)  # still streaming
    assert len(server.sessions) == 1
    await ws.send_json({"type": "start", "image": url})  # a good image restarts the stream
    while True:
      frame, = (await _receive(ws, frames=1))[0]
      if decode_frame_message(frame)[2] == -1:
        break
    await ws.close()
    return decode_frame_message(frame)[3]

  first = _serve(test)
  assert first.shape == (16, 16, 3)  # resized to the model's frames
  assert first[:, :7].max() < 40 and first[:, 9:].min() > 215


# A world steered by 3-d control vectors only (no actions, no emulator): the
# page's sliders and keys send {"type": "controls"} messages.
TINY_CONTROLS = (("stage", "consistency"), ("model.latent_channels", 48), ("model.text_dim", 0),
                 ("model.control_dim", 3), ("model.num_actions", 0), ("data.world", ""),
                 ("data.frame_size", 16), ("data.space_to_depth", 4))


def test_control_vectors_steer_the_stream_and_bad_ones_are_named():
  config, params = tiny_world(TINY_CONTROLS)
  start = np.full((16, 16, 3), 90, np.uint8)
  model = StreamingModel(config, params, start_frame=start)
  server = PlayServer(model, fps=240.0)
  vector = [0.5, -1.0, 0.25]

  async def test(client):
    ws = await client.ws_connect("/ws")
    _, (hello,) = await _receive(ws, texts=1)
    assert hello["control_dim"] == 3 and hello["num_actions"] == 0
    frames, _ = await _receive(ws, frames=2)
    for message, error in (({"type": "controls", "controls": [1, 2]}, "list of 3 finite"),
                           ({"type": "controls", "controls": [1, "x", 2]}, "list of 3 finite"),
                           # float32(1e308) = inf; 10**400 has no float (OverflowError)
                           ({"type": "controls", "controls": [1e308, 0, 0]}, "in [-1, 1]"),
                           ({"type": "controls", "controls": [10 ** 400, 0, 0]}, "in [-1, 1]"),
                           ({"type": "controls", "controls": [0, -1.5, 0]}, "in [-1, 1]"),
                           ({"type": "action", "action": 1}, "control vectors, not action")):
      await ws.send_json(message)
      while True:  # frames streamed meanwhile are kept: the by-hand session steps once per frame
        more, texts = await _receive(ws, texts=1)
        frames += more
        if texts[0]["type"] == "error":
          break
      assert error in texts[0]["message"]
    await ws.send_json({"type": "controls", "controls": vector, "seq": 1})
    while True:
      more, _ = await _receive(ws, frames=1)
      frames += more
      if decode_frame_message(more[0])[1] == 1 and len(frames) >= 6:
        break
    await ws.close()
    return hello["session"], frames

  async def main():
    async with TestClient(TestServer(server.app())) as client:
      return await asyncio.wait_for(test(client), TIMEOUT)

  session_id, frames = asyncio.run(main())
  headers = [decode_frame_message(f)[:3] for f in frames]
  assert [n for n, _, _ in headers] == list(range(len(frames)))  # none lost or reordered
  assert headers[0][2] == -1 and {act for _, _, act in headers[1:]} == {-2}
  by_hand = StreamingSession(model, seed=session_id)
  expected = [encode_frame(by_hand.start()[0], 0, 0, -1, 90)]
  for n, ack, _ in headers[1:]:
    expected.append(encode_frame(by_hand.step(vector if ack == 1 else [0.0, 0.0, 0.0])[0],
                                 n, ack, -2, 90))
  assert frames == expected
  assert any(a == 1 for _, a, _ in headers) and any(a == 0 for _, a, _ in headers[1:])


def test_start_from_a_seed_and_reset():
  from aapt_jax.data.worlds.atari import AtariWorld

  async def test(client, server):
    ws = await client.ws_connect("/ws")
    await _receive(ws, frames=2, texts=1)
    await ws.send_json({"type": "start", "seed": 3})
    seen = []
    for kind in ("seed", "reset"):
      while True:  # frames until the restart shows up (action -1 after stepped ones)
        frame, = (await _receive(ws, frames=1))[0]
        n, _, action, pixels = decode_frame_message(frame)
        if action == -1 and n > 1:
          seen.append(pixels)
          break
      if kind == "seed":
        await _receive(ws, frames=2)
        await ws.send_json({"type": "reset"})
    await ws.close()
    return seen

  seeded, reset = _serve(test)
  real = AtariWorld("Pong", size=16).reset(3)
  assert np.abs(seeded.astype(int) - real.astype(int)).mean() < 6  # through JPEG
  np.testing.assert_array_equal(reset, seeded)


def test_a_client_vanishing_mid_stream_frees_its_session():
  async def test(client, server):
    ws = await client.ws_connect("/ws")
    await _receive(ws, frames=2, texts=1)
    assert len(server.sessions) == 1
    ws._response.connection.transport.abort()  # no close handshake: the TCP connection drops
    await _until(lambda: not server.sessions)
    again = await client.ws_connect("/ws")  # the server still serves
    frames, _ = await _receive(again, frames=2, texts=1)
    await again.close()
    await _until(lambda: not server.sessions)
    return frames

  assert len(_serve(test)) == 2


def test_too_many_sessions_get_a_clear_message_not_a_hang():
  async def test(client, server):
    first = await client.ws_connect("/ws")
    second = await client.ws_connect("/ws")
    for ws in (first, second):
      await _receive(ws, frames=1, texts=1)
    status = await (await client.get("/status")).json()
    assert status == {"sessions": 2, "max_sessions": 2}
    third = await client.ws_connect("/ws")
    msg = await third.receive(timeout=10)
    assert msg.type == WSMsgType.TEXT and json.loads(msg.data)["type"] == "full"
    assert "2 of 2 sessions" in json.loads(msg.data)["message"]
    closed = await third.receive(timeout=10)
    assert closed.type == WSMsgType.CLOSE and closed.data == 1013
    await first.close()
    await _until(lambda: len(server.sessions) == 1)
    fourth = await client.ws_connect("/ws")  # a freed slot is taken again
    _, (hello,) = await _receive(fourth, frames=1, texts=1)
    await asyncio.gather(second.close(), fourth.close())
    return hello

  assert _serve(test, max_sessions=2)["type"] == "hello"


def test_page_and_bad_options():
  async def test(client, server):
    page = await client.get("/")
    return page.status, await page.text()

  status, html = _serve(test)
  assert status == 200 and "<canvas" in html and "/ws" in html
  with pytest.raises(ValueError, match="max_sessions"):
    PlayServer(tiny_streaming_model(), max_sessions=0)
  with pytest.raises(ValueError, match="fps"):
    PlayServer(tiny_streaming_model(), fps=-1)


def _play(*flags, **kwargs):
  return subprocess.Popen([sys.executable, os.path.join(ROOT, "launch", "play.py"), *flags],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          **kwargs)


def test_play_command_serves_and_its_bad_input_is_one_line(tmp_path):
  export = write_tiny_export(tmp_path / "export")
  port = portpicker.pick_unused_port()
  server = _play(f"--checkpoint={export}", f"--port={port}")
  try:
    for _ in range(600):  # loads, compiles, then listens
      try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=1) as r:
          assert json.load(r) == {"sessions": 0, "max_sessions": 4}
          break
      except OSError:
        assert server.poll() is None, server.communicate()[1][-2000:]
        time.sleep(0.2)
    else:
      raise AssertionError("play.py did not start serving")
    # the port is taken now: a second server says so in one line, before loading anything
    taken = _play(f"--checkpoint={export}", f"--port={port}")
    _, err = taken.communicate(timeout=120)
    assert taken.returncode == 2 and err.strip().count("\n") == 0
    assert f"cannot listen on 127.0.0.1:{port}" in err and "--port" in err
  finally:
    server.send_signal(signal.SIGINT)
    server.communicate(timeout=60)
  other = _play(f"--checkpoint={export}", f"--port={port}",
                f"--config={os.path.join(ROOT, 'configs', 'atari.py')}")
  _, err = other.communicate(timeout=300)
  assert other.returncode == 2 and err.strip().count("\n") == 0, err
  assert "trained with a different config" in err and "model.dim" in err


# ----------------------------------------------------------------- hostile pages and inputs

def test_a_page_from_another_origin_is_refused_before_any_message():
  async def test(client, server):
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
      await client.ws_connect("/ws", headers={"Origin": "http://evil.example"})
    assert refused.value.status == 403 and not server.sessions
    rebound = f"rebind.example:{client.port}"  # DNS rebinding: the page's name is Origin and Host
    with pytest.raises(aiohttp.WSServerHandshakeError, match="403"):
      await client.ws_connect("/ws", headers={"Origin": f"http://{rebound}", "Host": rebound})
    own = await client.ws_connect("/ws", headers={"Origin": f"http://{client.host}:{client.port}"})
    _, (hello,) = await _receive(own, texts=1)
    await own.close()
    await _until(lambda: not server.sessions)
    listed = await client.ws_connect("/ws", headers={"Origin": "http://friend.example:3000"})
    _, (hello_listed,) = await _receive(listed, texts=1)
    await listed.close()
    return hello["type"], hello_listed["type"], refused.value.status

  assert _serve(test, allow_origins=["http://friend.example:3000"]) == ("hello", "hello", 403)
  with pytest.raises(ValueError, match="allow_origin"):
    PlayServer(tiny_streaming_model(), allow_origins=["evil.example"])


def test_hello_names_the_checkpoint_without_its_absolute_path():
  model = tiny_streaming_model()
  model.source = "/home/someone/runs/atari/consistency/700"
  server = PlayServer(model, fps=240.0)

  async def main():
    async with TestClient(TestServer(server.app())) as client:
      ws = await client.ws_connect("/ws")
      msg = await asyncio.wait_for(ws.receive(), TIMEOUT)
      await ws.close()
      return msg.data

  hello = asyncio.run(main())
  assert "/home" not in hello and json.loads(hello)["source"] == "consistency/700"


def _bomb_jpeg(height: int, width: int) -> bytes:
  """A 16x16 grey JPEG whose SOF0 header claims height x width pixels: what a
  decompression bomb's header says, in a few hundred bytes."""
  data = bytearray(simplejpeg.encode_jpeg(np.full((16, 16, 3), 128, np.uint8), quality=50,
                                          colorspace="RGB"))
  sof = data.index(b"\xff\xc0")  # SOF0: marker, length(2), precision(1), height(2), width(2)
  data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
  return bytes(data)


def test_an_oversized_jpeg_is_refused_from_its_header_without_decoding(monkeypatch):
  bomb = _bomb_jpeg(11000, 11000)
  assert simplejpeg.decode_jpeg_header(bomb)[:2] == (11000, 11000)
  decoded = []
  real_decode = simplejpeg.decode_jpeg
  monkeypatch.setattr(simplejpeg, "decode_jpeg",
                      lambda data, *a, **k: decoded.append(len(data)) or real_decode(data, *a, **k))
  url = "data:image/jpeg;base64," + base64.b64encode(bomb).decode()

  async def test(client, server):
    ws = await client.ws_connect("/ws")
    await _receive(ws, frames=1, texts=1)
    await ws.send_json({"type": "start", "image": url})
    while True:
      _, (text,) = await _receive(ws, texts=1)
      if text["type"] == "error":
        break
    frames, _ = await _receive(ws, frames=2)  # still streaming
    await ws.close()
    return text["message"]

  message = _serve(test)
  assert "11000x11000" in message and "4096" in message
  assert len(bomb) not in decoded  # never handed to the decoder


def test_seed_starts_are_rate_limited_per_connection():
  async def test(client, server):
    ws = await client.ws_connect("/ws")
    await _receive(ws, frames=1, texts=1)
    for seed in range(6):
      await ws.send_json({"type": "start", "seed": seed})
    errors = []
    while not errors:
      _, (text,) = await _receive(ws, texts=1)
      if text["type"] == "error":
        errors.append(text["message"])
    await ws.close()
    return errors[0]

  assert "too many starts" in _serve(test)


def test_an_idle_connection_is_told_and_closed_and_its_slot_freed():
  async def test(client, server):
    ws = await client.ws_connect("/ws")
    await _receive(ws, frames=1, texts=1)
    while True:  # frames stream on; no message from us
      msg = await ws.receive()
      if msg.type == WSMsgType.TEXT:
        break
    closed = await ws.receive()
    await _until(lambda: not server.sessions)
    again = await client.ws_connect("/ws")  # the one slot is free again
    _, (hello,) = await _receive(again, texts=1)
    await again.close()
    return json.loads(msg.data), closed.type, closed.data, hello["type"]

  idle, kind, code, again = _serve(test, max_sessions=1, idle_timeout=0.5)
  assert idle["type"] == "idle" and "0.5 s" in idle["message"]
  assert (kind, code, again) == (WSMsgType.CLOSE, 1001, "hello")


@pytest.mark.parametrize("flag, error", [("--port=70000", "--port=70000 is not a port"),
                                         ("--host=no.such.host.invalid", "--host="),
                                         ("--allow_origin=evil.example", "is not an origin"),
                                         ("--idle_timeout=-1", "--idle_timeout=-1")])
def test_play_command_bad_flags_are_one_line(flag, error):
  port = f"--port={portpicker.pick_unused_port()}"
  _, err = _play(port, flag).communicate(timeout=120)
  assert err.strip().count("\n") == 0 and error in err, err
