"""Makes docs/play.png: the play page streaming the shipped Pong world in
headless Chromium (needs `chromium` and `chromedriver`, as the page test).

  python docs/screenshot.py
"""
import asyncio
import os
import shutil
import sys
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
  import portpicker
  from aiohttp import web
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service
  from selenium.webdriver.common.action_chains import ActionChains
  from selenium.webdriver.common.keys import Keys
  from selenium.webdriver.support.ui import WebDriverWait

  from aapt_jax.inference.server import PlayServer
  from aapt_jax.inference.session import StreamingModel

  model = StreamingModel.load(None)
  model.source = "the shipped export, atari"  # the page's label, not this machine's path
  server = PlayServer(model, max_sessions=1)
  server.warm_up()
  port, loop, ready = portpicker.pick_unused_port(), asyncio.new_event_loop(), threading.Event()

  def serve():
    runner = web.AppRunner(server.app())
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    ready.set()
    loop.run_forever()

  threading.Thread(target=serve, daemon=True).start()
  ready.wait(60)
  options = webdriver.ChromeOptions()
  options.binary_location = shutil.which("chromium")
  for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--window-size=800,840"):
    options.add_argument(flag)
  browser = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
  try:
    stats = lambda key: browser.execute_script(f"return window.playStats.{key}")
    wait = WebDriverWait(browser, 120, poll_frequency=0.1)
    browser.get(f"http://127.0.0.1:{port}/")
    wait.until(lambda _: stats("frames") >= 20)
    ActionChains(browser).key_down(Keys.ARROW_LEFT).perform()  # steer: the HUD shows the action
    start = stats("frames")
    wait.until(lambda _: stats("frames") >= start + 30 and len(stats("latencies")) >= 1)
    out = os.path.join(ROOT, "docs", "play.png")
    browser.save_screenshot(out)
    print(f"wrote {out}")
  finally:
    browser.quit()
    loop.call_soon_threadsafe(loop.stop)


if __name__ == "__main__":
  main()
