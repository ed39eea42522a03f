"""Two processes with jax.distributed on 127.0.0.1 (CPU, gloo collectives),
each with 2 CPU devices, running launch/train.py on one 4-device mesh."""
import os
import signal
import subprocess
import time

import portpicker
import pytest

from aapt_jax.data.records import write_records
from test_training_loop import (ROOT, cli_args, cli_env, ckpt_dir, complete_steps,
                                run_summaries, tiny_examples)

HEARTBEAT_S = 5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  path = tmp_path_factory.mktemp("mh_data")
  write_records(str(path / "clips.array_record"), tiny_examples())
  return str(path)


def start(workdir, data, port, **overrides):
  procs = []
  for i in range(2):
    args = cli_args(workdir, data, mesh__data=2, mesh__fsdp=2,
                    distributed__heartbeat_timeout_s=HEARTBEAT_S, **overrides)
    args += [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
             f"--process_id={i}"]
    procs.append(subprocess.Popen(args, cwd=ROOT, env=cli_env(devices=2),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  return procs


def stop(procs):
  for p in procs:
    if p.poll() is None:
      p.kill()
    p.communicate()


def both_data_states(workdir, step):
  d = os.path.join(ckpt_dir(workdir), str(step), "data")
  return all(os.path.exists(os.path.join(d, f"process_{i}-of-2.json")) for i in range(2))


@pytest.mark.slow
@pytest.mark.ci
def test_two_processes_checkpoint_then_one_dies_and_the_other_exits(data, tmp_path):
  workdir = tmp_path / "run"
  procs = start(workdir, data, portpicker.pick_unused_port(), train__steps=100000,
                checkpoint__every_steps=2)
  try:
    end = time.time() + 300
    while not (complete_steps(workdir) and both_data_states(workdir, complete_steps(workdir)[0])):
      assert time.time() < end, "no checkpoint from the two processes"
      for p in procs:
        if p.poll() is not None:
          out, err = p.communicate()
          raise AssertionError(f"a process exited ({p.returncode}):\n{out[-2000:]}\n{err[-3000:]}")
      time.sleep(0.2)
    assert procs[0].poll() is None and procs[1].poll() is None
    procs[1].send_signal(signal.SIGKILL)
    t = time.time()
    try:
      _, err = procs[0].communicate(timeout=120)
    except subprocess.TimeoutExpired:
      raise AssertionError("process 0 still runs 120 s after process 1 died") from None
    elapsed = time.time() - t
  finally:
    stop(procs)
  assert procs[0].returncode != 0
  # The heartbeat timeout (plus the polling around it) bounds the wait.
  assert elapsed < 6 * HEARTBEAT_S + 15, (elapsed, err[-3000:])


@pytest.mark.slow
def test_two_processes_run_to_the_end_and_resume(data, tmp_path):
  workdir = tmp_path / "run"
  for steps, first in ((4, None), (6, 4)):
    procs = start(workdir, data, portpicker.pick_unused_port(), train__steps=steps,
                  checkpoint__every_steps=2)
    try:
      outs = [p.communicate(timeout=400) for p in procs]
    finally:
      stop(procs)
    for p, (_, err) in zip(procs, outs):
      assert p.returncode == 0, err[-3000:]
    if first is not None:
      assert run_summaries(workdir)[0]["resumed_from"] == first
    assert complete_steps(workdir)[-1] == steps and both_data_states(workdir, steps)
