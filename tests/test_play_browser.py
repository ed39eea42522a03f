"""The playable page in a real headless Chromium (Debian's `chromium` and
`chromium-driver`; .ci/run installs them): it loads, streams frames, turns a
held key into the world's action and shows its latency, refuses a tab over the
limit with a message, and a closed tab frees its session. The screenshot is
saved to test-artifacts/play.png."""
import asyncio
import os
import shutil
import threading

import portpicker
import pytest
from aiohttp import web

from aapt_jax.inference.server import PlayServer
from aapt_jax.inference.session import StreamingModel
from helpers import ROOT
from streaming_helpers import write_tiny_export

TIMEOUT = 90  # seconds per wait; a loaded 2-core CPU runs Chromium and the model together
ARTIFACTS = os.path.join(ROOT, "test-artifacts")


class _ServerThread:
  """The play server on its own event loop in a background thread."""

  def __init__(self, server: PlayServer):
    self.server, self.port = server, portpicker.pick_unused_port()
    self.loop = asyncio.new_event_loop()
    self.ready = threading.Event()
    self.thread = threading.Thread(target=self._run, daemon=True)

  def _run(self):
    runner = web.AppRunner(self.server.app())
    self.loop.run_until_complete(runner.setup())
    self.loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
    self.ready.set()
    self.loop.run_forever()
    self.loop.run_until_complete(runner.cleanup())

  def __enter__(self):
    self.thread.start()
    assert self.ready.wait(TIMEOUT)
    return f"http://127.0.0.1:{self.port}/"

  def __exit__(self, *exc):
    self.loop.call_soon_threadsafe(self.loop.stop)
    self.thread.join(TIMEOUT)


def _chromium():
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service
  binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
  if not binary or not driver:
    pytest.fail("the browser test needs Debian's chromium and chromium-driver: "
                "apt-get install -y chromium chromium-driver (.ci/run does)")
  options = webdriver.ChromeOptions()
  options.binary_location = binary
  for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--window-size=800,800"):
    options.add_argument(flag)
  return webdriver.Chrome(service=Service(executable_path=driver), options=options)


@pytest.mark.slow
@pytest.mark.ci
def test_page_plays_in_headless_chromium(tmp_path):
  from selenium.webdriver.common.action_chains import ActionChains
  from selenium.webdriver.common.keys import Keys
  from selenium.webdriver.support.ui import WebDriverWait

  model = StreamingModel.load(write_tiny_export(tmp_path / "export"))
  server = PlayServer(model, max_sessions=2, fps=30.0)
  server.warm_up()
  with _ServerThread(server) as url:
    browser = _chromium()
    try:
      wait = WebDriverWait(browser, TIMEOUT, poll_frequency=0.1)
      stats = lambda key: browser.execute_script(f"return window.playStats.{key}")
      pixels = lambda: browser.execute_script(
          "return document.getElementById('screen').toDataURL('image/png')")
      browser.get(url)
      wait.until(lambda _: stats("frames") >= 10)
      assert stats("status") == "playing" and stats("hello")["actions"][3] == "LEFT"
      assert len(server.sessions) == 1
      before = pixels()
      ActionChains(browser).key_down(Keys.ARROW_LEFT).perform()
      wait.until(lambda _: stats("action") == "LEFT" and len(stats("latencies")) >= 1)
      frames_at_action = stats("frames")
      wait.until(lambda _: stats("frames") >= frames_at_action + 5)
      assert pixels() != before  # the canvas shows new frames after the action
      assert 0 < stats("latencies")[0] < 10_000 and stats("fps") > 0
      hud = browser.find_element("id", "hud").text
      assert "fps" in hud and "action→frame" in hud and "action LEFT" in hud
      os.makedirs(ARTIFACTS, exist_ok=True)
      browser.save_screenshot(os.path.join(ARTIFACTS, "play.png"))
      ActionChains(browser).key_up(Keys.ARROW_LEFT).perform()
      wait.until(lambda _: stats("action") == "NOOP")

      first_tab = browser.current_window_handle
      browser.switch_to.new_window("tab")  # a second tab: a second session
      browser.get(url)
      wait.until(lambda _: stats("frames") >= 3)
      assert len(server.sessions) == 2
      second_tab = browser.current_window_handle
      browser.switch_to.new_window("tab")  # a third: over the limit of 2
      browser.get(url)
      wait.until(lambda _: stats("status") == "full")
      status = browser.find_element("id", "status").text
      assert "server is full: 2 of 2 sessions" in status and stats("frames") == 0
      browser.close()
      browser.switch_to.window(second_tab)
      browser.close()  # closing a playing tab frees its session
      wait.until(lambda _: len(server.sessions) == 1)
      browser.switch_to.window(first_tab)
      assert stats("status") == "playing"
    finally:
      browser.quit()
    wait.until(lambda _: not server.sessions)  # the browser is gone: every session is freed


@pytest.mark.slow
@pytest.mark.ci
def test_camera_world_page_steers_by_mouse_look_and_wasd(tmp_path):
  """A camera world (a tiny random-weight doom-like model: control_dim 3, no
  actions): pointer-lock mouse look drives controls[0], W/S and A/D drive
  forward and strafe, smoothed so that a held key is a steady full speed."""
  from selenium.webdriver.common.action_chains import ActionChains
  from selenium.webdriver.support.ui import WebDriverWait
  from streaming_helpers import TINY_DOOM

  model = StreamingModel.load(write_tiny_export(tmp_path / "export", TINY_DOOM))
  server = PlayServer(model, max_sessions=1, fps=30.0)
  server.warm_up()
  with _ServerThread(server) as url:
    browser = _chromium()
    try:
      wait = WebDriverWait(browser, TIMEOUT, poll_frequency=0.05)
      stats = lambda key: browser.execute_script(f"return window.playStats.{key}")
      browser.get(url)
      wait.until(lambda _: stats("frames") >= 5)
      hello = stats("hello")
      assert hello["control_names"] == ["yaw", "forward", "strafe"]
      assert hello["num_actions"] == 0
      legend = browser.find_element("id", "keys").text
      assert "mouse look" in legend and "W/S = forward/back" in legend
      assert "A/D = strafe" in legend and "steady full speed" in legend
      labels = browser.find_element("id", "controls").text
      assert "yaw" in labels and "forward" in labels and "strafe" in labels
      body = browser.find_element("tag name", "body")

      def hold(key, index, value):
        ActionChains(browser).key_down(key, body).perform()
        wait.until(lambda _: (stats("controls") or [0, 0, 0])[index] == value)
        n = len(stats("sent"))
        ramp = [v[index] for v in stats("sent")][-n:]
        frames = stats("frames")
        wait.until(lambda _: stats("frames") >= frames + 5)
        assert stats("controls")[index] == value  # held: a steady speed, no drift
        ActionChains(browser).key_up(key, body).perform()
        wait.until(lambda _: stats("controls")[index] == 0)
        return ramp

      ramp = hold("w", 1, 1)
      ups = [x for x in ramp if 0 < x < 1]
      assert ups and ups == sorted(ups)  # smoothed: intermediate speeds, rising
      hold("s", 1, -1)
      hold("d", 2, 1)
      hold("a", 2, -1)
      # Mouse look: capture the pointer on the picture, then move it right / left.
      canvas = browser.find_element("id", "screen")
      ActionChains(browser).move_to_element(canvas).click().perform()
      wait.until(lambda _: stats("pointerLocked"))
      for dx, sign in ((80, 1), (-80, -1)):
        start = len(stats("sent"))
        for _ in range(4):
          ActionChains(browser).move_by_offset(dx, 0).perform()
        wait.until(lambda _: any(sign * v[0] > 0.2 for v in stats("sent")[start:]))
        wait.until(lambda _: stats("controls")[0] == 0)  # the mouse stopped: it eases off
        assert all(v[1] == 0 and v[2] == 0 for v in stats("sent")[start:])
      assert stats("ack") > 0 and stats("action").startswith("controls")
      os.makedirs(ARTIFACTS, exist_ok=True)
      browser.save_screenshot(os.path.join(ARTIFACTS, "play_camera.png"))
    finally:
      browser.quit()
