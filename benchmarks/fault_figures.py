"""Fault tests that report figures: the play server against hostile pages and
inputs, checkpoints against damage and failed saves, resume against a
changed config. One table: scenario, outcome, peak memory added, time to
recover.

  python benchmarks/fault_figures.py [--attempts 50] [--state_mb 64] [--clients 4]
                                     [--soak_seconds 30] [--kill_restarts 4]
                                     [--only server,soak,checkpoint,kill]

Runs in one process on CPU with a tiny random-weight Pong world (16x16
frames) served by `PlayServer` over aiohttp's test server on 127.0.0.1.
"Peak memory added" is tracemalloc's peak over the scenario minus what was
allocated before it (numpy buffers included; the XLA heap is not traced).
"Time to recover" is the wall time until the server (or run) is back to
serving (or training) state: the error answered, the slot freed, the run
restored. The 11000x11000 bomb is a real uniform-grey JPEG; its "unchecked"
row decodes it as the server did before the header check (simplejpeg +
resize_area), the reference for the checked row in the same run. The soak
row: concurrent tabs sending actions, junk and bombs, dropping connections,
one over capacity; frames served, errors answered, action-to-frame p95
latency and the process's RSS at start and end. The kill row: a tiny
diffusion-stage run of launch/train.py (subprocesses, 8 fake CPU devices)
killed with SIGKILL at seeded random steps K times, each restart resuming,
then run to the end; steps lost per fault (the last step logged before the
kill minus the checkpoint the next start resumes from) and whether the final
checkpoint's params equal an uninterrupted run's; its "time to recover" is
the mean wall time from a restart's launch to its first trained step.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import glob
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import simplejpeg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from common import device_line  # noqa: E402
from aapt_jax import checkpointing, load_config, loading  # noqa: E402
from aapt_jax.data.records import write_records  # noqa: E402
from aapt_jax.image_utils import resize_area  # noqa: E402
from aapt_jax.inference.server import PlayServer  # noqa: E402
from aapt_jax.inference.session import StreamingModel  # noqa: E402
from aapt_jax.models import build_generator, init_params  # noqa: E402
from aapt_jax.training.resume_check import check_resume  # noqa: E402

WORLD = {"stage": "consistency", "model.latent_channels": 48, "model.text_dim": 0,
         "model.control_dim": 3, "model.num_actions": 18, "data.world": "atari",
         "data.game": "Pong", "data.frame_size": 16, "data.space_to_depth": 4}
BOMB_SIDE = 11000
ROWS = []


def row(scenario, outcome, peak_bytes=None, seconds=None):
  ROWS.append((scenario, outcome, "-" if peak_bytes is None else f"{peak_bytes / 2**20:.1f} MiB",
               "-" if seconds is None else f"{seconds * 1e3:.0f} ms"))


class Traced:
  """tracemalloc peak (bytes above the start) and wall time of a block."""

  def __enter__(self):
    tracemalloc.reset_peak()
    self.base, self.t = tracemalloc.get_traced_memory()[0], time.perf_counter()
    return self

  def __exit__(self, *exc):
    self.seconds = time.perf_counter() - self.t
    self.peak = tracemalloc.get_traced_memory()[1] - self.base


def tiny_model() -> StreamingModel:
  config = load_config(os.path.join(ROOT, "configs", "tiny.py"), WORLD)
  params = nn.meta.unbox(init_params(build_generator(config), jax.random.key(0)))["params"]
  return StreamingModel(config, params)


async def next_text(ws, kind="error"):
  while True:
    msg = await ws.receive(timeout=60)
    if msg.type.name == "TEXT" and json.loads(msg.data)["type"] == kind:
      return json.loads(msg.data)
    if msg.type.name in ("CLOSE", "CLOSED", "ERROR"):
      raise RuntimeError(f"socket closed: {msg}")


async def server_scenarios(model, bomb_url, attempts):
  import aiohttp
  from aiohttp.test_utils import TestClient, TestServer
  server = PlayServer(model, fps=60.0, max_sessions=2, idle_timeout=0.5)
  async with TestClient(TestServer(server.app())) as client:
    # pages from another origin
    refused = 0
    with Traced() as t:
      for _ in range(attempts):
        try:
          ws = await client.ws_connect("/ws", headers={"Origin": "http://evil.example"})
          await ws.close()
        except aiohttp.WSServerHandshakeError as e:
          refused += e.status == 403
    row(f"{attempts} handshakes from Origin http://evil.example",
        f"{refused}/{attempts} refused 403, {len(server.sessions)} sessions opened",
        t.peak, t.seconds / attempts)

    ws = await client.ws_connect("/ws")
    hello = await next_text(ws, "hello")
    row("hello message", f"source {hello['source']!r} (no absolute path)")
    # the bomb
    with Traced() as t:
      await ws.send_json({"type": "start", "image": bomb_url})
      error = await next_text(ws)
    row(f"{BOMB_SIDE}x{BOMB_SIDE} grey JPEG ({len(bomb_url) / 2**20:.1f} MiB data URL) as a "
        "start image", f"error: {error['message'][:60]}...", t.peak, t.seconds)
    # hostile JSON
    hostile = ["[" * 100_000, '{"type": "action", "action": 1, "seq": ' + "9" * 5000 + "}",
               '{"type": "controls", "controls": [1e308, 0, 0]}',
               '{"type": "controls", "controls": [' + "9" * 400 + ', 0, 0]}',
               '{"type": "controls", "controls": [NaN, 0, 0]}',
               '{"type": "start", "seed": ' + "9" * 4000 + "}", "\x00" * 1000, "{}"]
    answered = 0
    with Traced() as t:
      for _ in range(max(1, attempts // len(hostile))):
        for text in hostile:
          await ws.send_str(text)
          await next_text(ws)
          answered += 1
    alive = not ws.closed
    row(f"{answered} hostile JSON messages (deep, huge ints, 1e308, NaN, NUL)",
        f"{answered} errors answered, socket {'open' if alive else 'CLOSED'}", t.peak,
        t.seconds / answered)
    # seed starts: a burst, loop lag measured by a ticker
    lags = []

    async def ticker():
      while True:
        t0 = time.perf_counter()
        await asyncio.sleep(0.005)
        lags.append(time.perf_counter() - t0 - 0.005)

    tick = asyncio.create_task(ticker())
    with Traced() as t:
      for seed in range(10):
        await ws.send_json({"type": "start", "seed": seed})
      limited = await next_text(ws)
    await asyncio.sleep(0.5)
    tick.cancel()
    row("10 seed starts at once (ROM loads)",
        f"rate limited ({limited['message'][:40]}...); loop lag max {max(lags) * 1e3:.0f} ms",
        t.peak, t.seconds)
    await ws.close()
    # idle tab
    idle = await client.ws_connect("/ws")
    await next_text(idle, "hello")
    t0 = time.perf_counter()
    await next_text(idle, "idle")
    while server.sessions:
      await asyncio.sleep(0.005)
    row("idle tab (idle_timeout=0.5 s)", "told 'idle', closed 1001, slot freed", None,
        time.perf_counter() - t0)


def rss_mib() -> float:
  with open("/proc/self/status") as f:
    return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024


async def soak(model, bomb_url, clients, seconds):
  """`clients` tabs for `seconds` against max_sessions = clients - 1: each
  sends actions (latency = send -> first frame acknowledging it), malformed
  JSON, a bomb now and then, drops its TCP connection mid-stream and
  reconnects; the tab over capacity gets `full`."""
  import random
  from aiohttp.test_utils import TestClient, TestServer
  from aapt_jax.inference.server import FRAME_HEADER
  server = PlayServer(model, fps=30.0, max_sessions=clients - 1)
  stats = {"frames": 0, "errors": 0, "full": 0, "drops": 0, "latencies": []}
  junk = ["[" * 50_000, "{", '{"type": "controls", "controls": [1e308, 0, 0]}',
          '{"type": "action", "action": 99}', '{"type": "start", "seed": -1}']

  async def tab(client, index):
    rng = random.Random(index)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
      ws = await client.ws_connect("/ws")
      sent, seq = {}, 0

      async def read():
        async for msg in ws:
          if msg.type.name == "BINARY":
            stats["frames"] += 1
            ack = FRAME_HEADER.unpack_from(msg.data)[1]
            for s in [s for s in sent if s <= ack]:
              stats["latencies"].append(time.perf_counter() - sent.pop(s))
          elif msg.type.name == "TEXT":
            kind = json.loads(msg.data)["type"]
            stats["errors"] += kind == "error"
            stats["full"] += kind == "full"

      reader = asyncio.create_task(read())
      life = time.perf_counter() + rng.uniform(2, 6)
      while time.perf_counter() < min(life, deadline) and not ws.closed:
        r = rng.random()
        if r < 0.8:
          seq += 1
          sent[seq] = time.perf_counter()
          await ws.send_json({"type": "action", "action": rng.randrange(6), "seq": seq})
        elif r < 0.99:
          await ws.send_str(rng.choice(junk))
        else:
          await ws.send_json({"type": "start", "image": bomb_url})
        await asyncio.sleep(0.05)
      if not ws.closed and rng.random() < 0.5:  # vanish mid-stream, no close handshake
        ws._response.connection.transport.abort()
        stats["drops"] += 1
      else:
        await ws.close()
      reader.cancel()
      await asyncio.sleep(0.1)

  async with TestClient(TestServer(server.app())) as client:
    rss0 = rss_mib()
    t0 = time.perf_counter()
    await asyncio.gather(*(tab(client, i) for i in range(clients)))
    wall = time.perf_counter() - t0
    rss1 = rss_mib()
  lat = np.sort(stats["latencies"]) * 1e3
  p95 = lat[int(0.95 * (len(lat) - 1))] if len(lat) else float("nan")
  row(f"soak: {clients} tabs x {seconds:g} s (max_sessions {clients - 1}): actions, junk, "
      "bombs, drops", f"{stats['frames']} frames ({stats['frames'] / wall:.0f}/s), "
      f"{stats['errors']} errors answered, {stats['full']} full, {stats['drops']} drops; "
      f"action->frame p95 {p95:.0f} ms; RSS {rss0:.0f} -> {rss1:.0f} MiB")


def checkpoint_scenarios(state_mb):
  work = tempfile.mkdtemp(prefix="fault_figures_")
  n = state_mb * 2**20 // 4
  state = lambda s: {"w": jnp.full((n,), float(s)), "b": jnp.ones((3,)) * s}
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state(0))
  try:
    directory = os.path.join(work, "ckpt")
    with checkpointing.Checkpointer(directory) as ckpt:
      for s in (100, 200, 300):
        ckpt.save(s, state(s))
    shard = max(glob.glob(f"{directory}/300/state/**/d/*", recursive=True), key=os.path.getsize)
    with open(shard, "r+b") as f:
      f.truncate(100)
    reports = []
    with Traced() as t, checkpointing.Checkpointer(directory) as ckpt:
      step, _, _ = ckpt.restore_latest(abstract, report=reports.append)
    row(f"latest step (300) of a {state_mb} MiB state: a shard truncated",
        f"resumed from step {step}: {300 - step} steps lost, 300 set aside", t.peak, t.seconds)

    from orbax.checkpoint._src.path import atomicity
    real = atomicity.AtomicRenameTemporaryPath.finalize

    async def disk_full(self, *args, **kwargs):
      raise OSError(28, "No space left on device")

    atomicity.AtomicRenameTemporaryPath.finalize = disk_full
    try:
      ckpt = checkpointing.Checkpointer(os.path.join(work, "full"))
      guard = checkpointing.PreemptionGuard(ckpt)
      polls = 0
      with Traced() as t:
        ckpt.save(1, state(1))
        try:
          while True:  # the training loop's per-step question
            polls += 1
            guard.requested(1)
            time.sleep(0.001)
        except checkpointing.CheckpointSaveError as e:
          error = e
      ckpt.close()  # already raised: close does not raise again
      row("disk full during an async save (ENOSPC at commit)",
          f"CheckpointSaveError after {polls} loop polls: {str(error.__cause__)[:30]}",
          t.peak, t.seconds)
    finally:
      atomicity.AtomicRenameTemporaryPath.finalize = real

    config = load_config(os.path.join(ROOT, "configs", "tiny.py"))
    changed = load_config(os.path.join(ROOT, "configs", "tiny.py"),
                          {"diffusion.optim.learning_rate": 3e-5})
    try:
      check_resume(config.to_dict(), changed, workdir=work, stage="diffusion", step=300)
      outcome = "RESUMED (wrong)"
    except ValueError as e:
      outcome = "refused: " + str(e).splitlines()[1].strip()[:50]
    row("resume with learning_rate 1e-5 -> 3e-5", outcome)
  finally:
    shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------
# kill -9 over K restarts.

KILL_RUN = {"stage": "diffusion", "train.batch_size": 8, "mesh.data": 2, "mesh.fsdp": 4,
            "mesh.tensor": 1, "train.log_every": 1}


def write_tiny_clips(path, n=32, frames=8, seed=0):
  """`n` random latent clips [frames, 4, 4, 4] with actions, as array_record."""
  rng = np.random.default_rng(seed)
  write_records(path, ({"latents": rng.standard_normal((frames, 4, 4, 4)).astype(np.float16),
                        "fps": 8.0, "actions": rng.integers(0, 5, frames).astype(np.int32)}
                       for _ in range(n)))


def _train_command(workdir, data, steps, every):
  overrides = dict(KILL_RUN, **{"data.path": data, "train.steps": steps,
                                "checkpoint.every_steps": every})
  return ([sys.executable, os.path.join(ROOT, "launch", "train.py"),
           f"--config={os.path.join(ROOT, 'configs', 'tiny.py')}", f"--workdir={workdir}"] +
          [f"--config.{k}={v}" for k, v in overrides.items()])


def _train_env():
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="8", PYTHONUNBUFFERED="1")
  if jax.config.jax_compilation_cache_dir:
    env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
  return env


def _logged_steps(metrics, offset):
  """Steps of the metrics.jsonl rows written after byte `offset` (whole lines)."""
  if not os.path.exists(metrics):
    return []
  with open(metrics, "rb") as f:
    f.seek(offset)
    lines = f.read().split(b"\n")[:-1]  # a torn last line is not a row yet
  return [json.loads(line)["step"] for line in lines if line.strip()]


def _complete_steps(workdir):
  d = checkpointing.checkpoint_dir(workdir, "diffusion")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def kill_restart_scenario(restarts, steps=24, every=4, seed=0, timeout=300):
  """An uninterrupted tiny run to `steps` and the same run SIGKILLed `restarts`
  times at seeded random steps (each start resumes from the latest complete
  checkpoint), then run to the end. Returns {"lost": [steps lost per fault],
  "reached": [last step logged before each kill], "resumed_from": [step each
  killed start resumed from], "killed": [whether SIGKILL ended it (False: it
  finished first)], "recover_s": [launch -> first trained step per start],
  "final_resumed_from", "final_step", "max_abs_diff" {"ema_params",
  "gen_params"} of the two final checkpoints, "exact": bool}."""
  work = tempfile.mkdtemp(prefix="fault_kill_")
  rng = random.Random(seed)
  env = _train_env()
  try:
    data = os.path.join(work, "data")
    os.makedirs(data)
    write_tiny_clips(os.path.join(data, "clips.array_record"))
    reference = os.path.join(work, "reference")
    r = subprocess.run(_train_command(reference, data, steps, every), cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    if r.returncode:
      raise RuntimeError(f"reference run failed:\n{r.stderr[-3000:]}")
    faulty = os.path.join(work, "faulty")
    metrics = os.path.join(checkpointing.stage_dir(faulty, "diffusion"), "metrics.jsonl")
    lost, reached, resumed_from, recover, killed = [], [], [], [], []
    for _ in range(restarts):
      start = (_complete_steps(faulty) or [0])[-1]
      if start >= steps - 1:
        break
      target = rng.randint(start + 1, steps - 1)  # kill once this step is logged ...
      delay = rng.uniform(0, 0.2)                 # ... plus a random extra delay
      offset = os.path.getsize(metrics) if os.path.exists(metrics) else 0
      t0 = time.perf_counter()
      proc = subprocess.Popen(_train_command(faulty, data, steps, every), cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
      try:
        first = None
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None:
          logged = _logged_steps(metrics, offset)
          if logged and first is None:
            first = time.perf_counter() - t0
          if logged and max(logged) >= target:
            break
          time.sleep(0.005)
        if proc.poll() is not None:
          raise RuntimeError(f"run exited ({proc.returncode}) before step {target}:\n"
                             f"{proc.stderr.read()[-3000:]}")
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        killed.append(proc.wait(timeout=30) == -signal.SIGKILL)
      finally:
        if proc.poll() is None:
          proc.kill()
          proc.wait()
      reached.append(max(_logged_steps(metrics, offset)))
      resumed_from.append(start)
      recover.append(first)
      lost.append(reached[-1] - (_complete_steps(faulty) or [0])[-1])
    r = subprocess.run(_train_command(faulty, data, steps, every), cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    if r.returncode:
      raise RuntimeError(f"final run failed:\n{r.stderr[-3000:]}")
    with open(os.path.join(faulty, "summary.json")) as f:
      (summary,) = json.load(f)["stages"]
    diffs = {}
    exact = True
    for which in ("ema_params", "gen_params"):
      _, a = loading.load_generator_params(
          os.path.join(checkpointing.checkpoint_dir(reference, "diffusion"), str(steps)), which)
      _, b = loading.load_generator_params(
          os.path.join(checkpointing.checkpoint_dir(faulty, "diffusion"), str(steps)), which)
      la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
      assert jax.tree.structure(a) == jax.tree.structure(b)
      diffs[which] = max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y))))
                         for x, y in zip(la, lb))
      exact &= all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))
    return {"lost": lost, "reached": reached, "resumed_from": resumed_from,
            "killed": killed, "recover_s": recover,
            "final_resumed_from": summary["resumed_from"], "final_step": summary["step"],
            "max_abs_diff": diffs, "exact": exact}
  finally:
    shutil.rmtree(work, ignore_errors=True)


def kill_row(restarts, steps=24, every=4):
  result = kill_restart_scenario(restarts, steps, every)
  d = result["max_abs_diff"]
  faults = ", ".join(f"{r}->{c}" for r, c in zip(result["reached"],
                                                 result["resumed_from"][1:] +
                                                 [result["final_resumed_from"]]))
  row(f"kill -9 at random steps, {sum(result['killed'])} kills + final restart ({steps} "
      f"steps, checkpoint every {every})",
      f"step reached->resumed from: {faults}; steps lost per fault {result['lost']}; "
      "final params vs uninterrupted: "
      f"{'EQUAL' if result['exact'] else 'DIFFER'} (max |diff| ema {d['ema_params']:.1e}, "
      f"gen {d['gen_params']:.1e})", None, float(np.mean(result["recover_s"])))
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--attempts", type=int, default=50)
  parser.add_argument("--state_mb", type=int, default=64)
  parser.add_argument("--clients", type=int, default=4, help="soak: concurrent tabs")
  parser.add_argument("--soak_seconds", type=float, default=30, help="soak: 0 = no soak")
  parser.add_argument("--kill_restarts", type=int, default=4,
                      help="kill: SIGKILLs of a tiny training run, each then resumed")
  parser.add_argument("--only", default="server,soak,checkpoint,kill",
                      help="comma-separated scenarios: server, soak, checkpoint, kill")
  args = parser.parse_args()
  only = set(args.only.split(","))
  unknown = only - {"server", "soak", "checkpoint", "kill"}
  if unknown:
    sys.exit(f"--only: unknown scenarios {sorted(unknown)}; choose from server, soak, "
             "checkpoint, kill")
  logging.getLogger("aapt_jax.play").setLevel(logging.ERROR)  # one warning per refusal
  logging.getLogger("absl").setLevel(logging.CRITICAL)  # orbax logs the injected failure
  print(device_line())
  if only & {"server", "soak"}:
    server_rows(args, only)
  if "checkpoint" in only:
    tracemalloc.start()
    checkpoint_scenarios(args.state_mb)
    tracemalloc.stop()
  if "kill" in only and args.kill_restarts > 0:
    kill_row(args.kill_restarts)
  widths = [max(len(r[i]) for r in ROWS + [("scenario", "outcome", "peak mem added",
                                              "time to recover")]) for i in range(4)]
  header = ("scenario", "outcome", "peak mem added", "time to recover")
  for r in [header, tuple("-" * w for w in widths)] + ROWS:
    print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))


def server_rows(args, only):
  """The play server's rows: hostile pages and inputs ("server"), the soak."""
  model = tiny_model()
  PlayServer(model).warm_up()
  grey = np.full((BOMB_SIDE, BOMB_SIDE, 3), 128, np.uint8)
  bomb = simplejpeg.encode_jpeg(grey, quality=75, colorspace="RGB", colorsubsampling="420")
  del grey
  bomb_url = "data:image/jpeg;base64," + base64.b64encode(bomb).decode()
  if "server" in only:
    tracemalloc.start()
    with Traced() as t:  # the reference: what the server did before the header check
      resize_area(simplejpeg.decode_jpeg(bomb, colorspace="RGB"), model.frame_size)
    row(f"{BOMB_SIDE}x{BOMB_SIDE} grey JPEG decoded unchecked (the old path)", "decoded",
        t.peak, t.seconds)
    asyncio.run(server_scenarios(model, bomb_url, args.attempts))
    tracemalloc.stop()
  if "soak" in only and args.soak_seconds > 0:
    asyncio.run(soak(model, bomb_url, args.clients, args.soak_seconds))


if __name__ == "__main__":
  main()
