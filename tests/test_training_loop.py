"""The trainer and its checkpoints: exact resume, restore onto other meshes,
crash safety (SIGKILL mid-save, SIGTERM), and bad input that must never
touch a good checkpoint.

All runs use one compiled program (configs/tiny.py, global batch 8, mesh
data=2 x fsdp=4 on 8 CPU devices) so the persistent compilation cache makes
every run after the first cheap, in this process and in the subprocesses.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from aapt_jax import checkpointing, load_config, loading, parallel
from aapt_jax.data.records import write_records
from aapt_jax.models import build_generator
from aapt_jax.training.program import build_train_program
from aapt_jax.training.metrics import NonFiniteLossError
from aapt_jax.training.trainer import Trainer
from helpers import ROOT, config_path

STAGE = "diffusion"
BASE = {"train.batch_size": 8, "mesh.data": 2, "mesh.fsdp": 4, "mesh.tensor": 1,
        "train.log_every": 1, "checkpoint.every_steps": 3}


def tiny_examples(n=32, frames=8, seed=0, channels=4, action_max=5, nan=False):
  rng = np.random.default_rng(seed)
  for _ in range(n):
    latents = rng.standard_normal((frames, 4, 4, channels)).astype(np.float16)
    if nan:
      latents[1:] = np.nan
    yield {"latents": latents, "fps": 8.0,
           "actions": rng.integers(0, action_max, frames).astype(np.int32)}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
  path = tmp_path_factory.mktemp("data")
  write_records(str(path / "clips.array_record"), tiny_examples())
  return str(path)


def make_config(data, **overrides):
  o = dict(BASE)
  o["data.path"] = data
  o.update({k.replace("__", "."): v for k, v in overrides.items()})
  return load_config(config_path("tiny.py"), o)


def cli_env(devices=8):
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices),
             JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5", PYTHONUNBUFFERED="1")
  return env


def cli_args(workdir, data, **overrides):
  o = dict(BASE)
  o["data.path"] = data
  o.update({k.replace("__", "."): v for k, v in overrides.items()})
  return ([sys.executable, os.path.join(ROOT, "launch", "train.py"),
           f"--config={config_path('tiny.py')}", f"--workdir={workdir}"] +
          [f"--config.{k}={v}" for k, v in o.items()])


def run_cli(workdir, data, timeout=240, **overrides):
  return subprocess.run(cli_args(workdir, data, **overrides), cwd=ROOT, env=cli_env(),
                        capture_output=True, text=True, timeout=timeout)


def ckpt_dir(workdir):
  return checkpointing.checkpoint_dir(str(workdir), STAGE)


def complete_steps(workdir):
  d = ckpt_dir(workdir)
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def tmp_dirs(workdir):
  d = ckpt_dir(workdir)
  return [n for n in os.listdir(d) if "tmp" in n] if os.path.isdir(d) else []


def snapshot(directory):
  """{relative path: (size, mtime_ns, sha of content)} of every file."""
  out = {}
  for root, _, files in os.walk(directory):
    for f in files:
      p = os.path.join(root, f)
      st = os.stat(p)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, directory)] = (st.st_size, st.st_mtime_ns, hash(fh.read()))
  return out


def metrics_by_step(workdir):
  rows = {}
  with open(os.path.join(checkpointing.stage_dir(str(workdir), STAGE), "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      rows[row["step"]] = row   # a rerun's rows replace the killed run's
  return rows


def run_summaries(workdir):
  """The stages' summaries a launch/train.py run wrote to <workdir>/summary.json."""
  with open(os.path.join(str(workdir), "summary.json")) as f:
    return json.load(f)["stages"]


def abstract_target(config, mesh):
  program = build_train_program(config, mesh)
  return program.abstract_state, program.shardings


def load_state(workdir, step, config):
  mesh = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  target, _ = abstract_target(config, mesh)
  with checkpointing.Checkpointer(ckpt_dir(workdir)) as ck:
    state, _ = ck.restore(step, target)
  return jax.device_get(state)


def data_state(workdir, step):
  with open(os.path.join(ckpt_dir(workdir), str(step), "data", "process_0-of-1.json")) as f:
    return json.load(f)


def assert_trees_equal(a, b, exact=True):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb) and jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(la, lb):
    if exact:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    else:
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def good_run(tiny_data, tmp_path_factory):
  """A workdir holding a good checkpoint at step 3 (3 steps trained)."""
  workdir = tmp_path_factory.mktemp("good")
  summary = Trainer(make_config(tiny_data, train__steps=3), str(workdir)).run()
  assert summary["step"] == 3 and complete_steps(workdir) == [3]
  return str(workdir)


def test_summary_metrics_and_profile(tiny_data, tmp_path):
  """A run writes <stage>/summary.json (what `run` returns: steps, losses,
  skipped steps, the compiled step's cost and memory analysis), namespaced
  metrics (train/*, perf/* from the second step read on) and, with
  train.profile_steps, a profiler trace TensorBoard's profile tab reads."""
  workdir = tmp_path / "run"
  summary = Trainer(make_config(tiny_data, train__steps=3, train__profile_steps=1),
                    str(workdir)).run()
  stage_dir = checkpointing.stage_dir(str(workdir), STAGE)
  with open(os.path.join(stage_dir, "summary.json")) as f:
    assert json.load(f) == json.loads(json.dumps(summary))
  assert (summary["stage"], summary["start_step"], summary["step"], summary["steps_run"],
          summary["nonfinite_steps"], summary["resumed_from"]) == (STAGE, 0, 3, 3, 0, None)
  assert summary["compiled"]["cost/flops"] > 0
  assert summary["compiled"]["memory/argument_size_in_bytes"] > 0
  rows = metrics_by_step(workdir)
  assert sorted(rows) == [1, 2, 3]
  assert summary["first_loss"] == rows[1]["train/loss"]
  assert summary["final_loss"] == rows[3]["train/loss"]
  assert {"train/loss", "train/grad_norm", "train/finite"} <= set(rows[1])
  assert not any(k.startswith("perf/") for k in rows[1])  # no interval before the first read
  tokens = 8 * 5 * 4  # batch x clip frames x tokens per frame (4x4 latents, 2x2 patches)
  for s in (2, 3):
    assert rows[s]["perf/step_time_s"] > 0
    np.testing.assert_allclose(rows[s]["perf/tokens_per_s"] * rows[s]["perf/step_time_s"],
                               tokens, rtol=1e-6)
    assert "perf/mfu" not in rows[s]  # float32 on CPU: no known peak
  traces = [f for _, _, files in os.walk(os.path.join(stage_dir, "tb", "plugins", "profile"))
            for f in files if f.endswith(".xplane.pb")]
  assert traces


# ----------------------------------------------------------------------------
# Resume.


@pytest.mark.slow
@pytest.mark.ci
def test_resume_is_exact(tiny_data, good_run, tmp_path):
  # A: 6 steps straight, saving (asynchronously, state donated right after) at 3 and 6.
  straight = tmp_path / "straight"
  summary = Trainer(make_config(tiny_data, train__steps=6), str(straight)).run()
  assert summary["step"] == 6 and complete_steps(straight) == [3, 6]
  config = make_config(tiny_data, train__steps=6)
  # The mid-run async save holds the step-3 state although steps 4-6 then
  # donated its buffers: it equals the 3-step run's final checkpoint.
  assert_trees_equal(load_state(straight, 3, config), load_state(good_run, 3, config))

  # B: the 3-step run's workdir, resumed to 6 in a new process.
  resumed = tmp_path / "resumed"
  shutil.copytree(good_run, resumed)
  r = run_cli(resumed, tiny_data, train__steps=6)
  assert r.returncode == 0, r.stderr[-3000:]
  (s,) = run_summaries(resumed)
  assert (s["stage"], s["resumed_from"], s["start_step"], s["step"]) == (STAGE, 3, 3, 6)
  assert complete_steps(resumed) == [3, 6]

  a, b = load_state(straight, 6, config), load_state(resumed, 6, config)
  assert int(a.step) == int(b.step) == 6
  assert_trees_equal(a, b, exact=False)
  # Training really moved the params (the comparison is not vacuous).
  first = load_state(straight, 3, config)
  assert not np.allclose(np.asarray(jax.tree.leaves(first.gen_params)[0]),
                         np.asarray(jax.tree.leaves(a.gen_params)[0]))
  # Same data order: the batches of steps 4-6 (fingerprints) and the losses.
  ma, mb = metrics_by_step(straight), metrics_by_step(resumed)
  for s in (4, 5, 6):
    assert ma[s]["data_fingerprint"] == mb[s]["data_fingerprint"], s
    np.testing.assert_allclose(ma[s]["train/loss"], mb[s]["train/loss"], rtol=1e-5)
  assert len({ma[s]["data_fingerprint"] for s in (1, 2, 3, 4, 5, 6)}) == 6
  assert data_state(straight, 6) == data_state(resumed, 6)
  tb = os.path.join(checkpointing.stage_dir(str(resumed), STAGE), "tb")
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tb))
  assert data_state(straight, 3) != data_state(straight, 6)

  # A rerun at the target step trains nothing and writes nothing.
  before = snapshot(ckpt_dir(resumed))
  summary = Trainer(make_config(tiny_data, train__steps=6), str(resumed)).run()
  assert summary["steps_run"] == 0 and snapshot(ckpt_dir(resumed)) == before


def test_restore_onto_other_meshes(tmp_path):
  config = load_config(config_path("tiny.py"))
  mesh_a = parallel.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  with jax.set_mesh(mesh_a):
    state = build_train_program(config, mesh_a).init_state(seed=3)
  state = state.replace(step=state.step + 7)
  saved = jax.device_get(state)
  with checkpointing.Checkpointer(str(tmp_path / "ck")) as ck:
    assert ck.save(7, state, config=config)
  assert "7" in os.listdir(tmp_path / "ck")

  meshes = {"fsdp=8": parallel.make_mesh({"data": 1, "fsdp": 8, "tensor": 1}),
            "1 device": parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1},
                                           jax.devices()[:1])}
  for name, mesh in meshes.items():
    target, shardings = abstract_target(config, mesh)
    with checkpointing.Checkpointer(str(tmp_path / "ck")) as ck:
      ck.check_compatible(7, target, config)
      restored, data = ck.restore(7, target)
    assert not data and restored.disc_params is None and restored.teacher_params is None
    assert_trees_equal(jax.device_get(restored), saved)
    for leaf, want in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)):
      assert leaf.sharding == want, name
      assert leaf.sharding.mesh.shape == mesh.shape, name
    emb = restored.gen_params["patch_embedding"]["kernel"]
    if name == "fsdp=8":   # embed (D = 32) split 8 ways on the new mesh
      assert emb.addressable_shards[0].data.shape[-1] == 4
    else:
      assert len(emb.sharding.device_set) == 1


# ----------------------------------------------------------------------------
# Crash safety.


def _wait(predicate, timeout, proc=None, what=""):
  end = time.time() + timeout
  while time.time() < end:
    if predicate():
      return True
    if proc is not None and proc.poll() is not None:
      out, err = proc.communicate()
      raise AssertionError(f"run exited ({proc.returncode}) while waiting for {what}:\n"
                           f"{out[-2000:]}\n{err[-3000:]}")
    time.sleep(0.002)
  return False


@pytest.mark.slow
@pytest.mark.ci
def test_sigkill_during_save_then_sigterm(tiny_data, tmp_path):
  workdir = tmp_path / "run"
  args = cli_args(workdir, tiny_data, train__steps=100000, checkpoint__every_steps=2)
  proc = subprocess.Popen(args, cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    assert _wait(lambda: len(complete_steps(workdir)) >= 2, 240, proc, "two checkpoints")
    # SIGKILL the moment an async save has a half-written (tmp) directory.
    caught = _wait(lambda: bool(tmp_dirs(workdir)), 20, proc, "a save in flight")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.communicate()
  complete = complete_steps(workdir)
  last = complete[-1]
  print(f"SIGKILL with a save in flight: {caught}; left {tmp_dirs(workdir)}, complete {complete}")
  if caught:
    half = tmp_dirs(workdir)
    assert half and all(int(re.match(r"\d+", h).group()) > last for h in half), (half, complete)
  # Make sure a half-written newer step exists either way: a copy of the last
  # complete one under a tmp name, with a file cut short.
  fake = os.path.join(ckpt_dir(workdir), f"{last + 100}.orbax-checkpoint-tmp")
  shutil.copytree(os.path.join(ckpt_dir(workdir), str(last)), fake)
  for root, _, files in os.walk(fake):
    for f in files:
      if f.startswith("ocdbt") or f == "manifest.ocdbt":
        with open(os.path.join(root, f), "r+b") as fh:
          fh.truncate(1)

  # Restart: resumes from the last complete checkpoint; then SIGTERM -> save, exit 0.
  proc = subprocess.Popen(args, cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    assert _wait(lambda: complete_steps(workdir) and complete_steps(workdir)[-1] > last,
                 240, proc, "a checkpoint after the restart")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.communicate()
  assert proc.returncode == 0, err[-3000:]
  (s,) = run_summaries(workdir)
  assert s["resumed_from"] == last and s["preempted"], s
  stopped = s["step"]
  assert complete_steps(workdir)[-1] == stopped and s["checkpoint"].endswith(f"/{stopped}")
  assert not tmp_dirs(workdir)  # the half-written ones were cleaned up
  assert int(load_state(workdir, stopped, make_config(tiny_data)).step) == stopped


# ----------------------------------------------------------------------------
# Bad input never touches a good checkpoint.


def test_bad_inputs_leave_the_checkpoint_alone(tiny_data, good_run, tmp_path):
  before = snapshot(ckpt_dir(good_run))

  def fails(exc, pattern, **overrides):
    config = make_config(overrides.pop("data", tiny_data), **{"train__steps": 6, **overrides})
    with pytest.raises(exc, match=pattern):
      Trainer(config, good_run).run()
    assert snapshot(ckpt_dir(good_run)) == before

  fails(FileNotFoundError, r"data\.path='/no/such/dir' does not exist", data="/no/such/dir")
  fails(ValueError, r"data\.path is empty", data="")
  empty = tmp_path / "empty"
  empty.mkdir()
  fails(FileNotFoundError, r"data\.path=.* holds no ArrayRecord", data=str(empty))

  wrong = tmp_path / "wrong"
  write_records(str(wrong / "clips.array_record"), tiny_examples(4, channels=3))
  fails(ValueError, r"clips\.array_record\[0\]: field 'latents': 3 channels but "
        r"model\.latent_channels=4", data=str(wrong))
  short = tmp_path / "short"
  write_records(str(short / "clips.array_record"), tiny_examples(4, frames=3))
  fails(ValueError, r"3 frames < train\.clip_frames=5", data=str(short))
  actions = tmp_path / "actions"
  write_records(str(actions / "clips.array_record"), tiny_examples(4, action_max=9))
  fails(ValueError, r"field 'actions': action id \d >= model\.num_actions=5",
        data=str(actions))

  # A model of another shape than the checkpoint's: named, before any training.
  fails(ValueError, r"(?s)does not match this config.*model\.dim: checkpoint=32, "
        r"config=64.*gen_params/action_embedding: checkpoint \(5, 32\) float32, config "
        r"\(5, 64\).*nothing was trained or saved", model__dim=64)
  fails(ValueError, r"train\.steps must be >= 1", train__steps=0)

  # Non-finite losses: updates skipped, the run stops after max_nonfinite in a
  # row and saves nothing (although a save was due at every step).
  nan = tmp_path / "nan"
  write_records(str(nan / "clips.array_record"), tiny_examples(16, nan=True))
  fails(NonFiniteLossError, r"2 non-finite losses in a row \(train\.max_nonfinite=2\)",
        data=str(nan), train__max_nonfinite=2, checkpoint__every_steps=1,
        resume_with_changes=True)  # other data than the checkpoint's: allowed explicitly


def test_cli_errors_are_one_line(tiny_data, tmp_path):
  r = subprocess.run(cli_args(tmp_path / "w", tiny_data, train__steps="abc"), cwd=ROOT,
                     env=cli_env(), capture_output=True, text=True, timeout=120)
  assert r.returncode != 0
  assert "train.steps" in r.stderr and "abc" in r.stderr
  assert "Traceback" not in r.stderr
  r = run_cli(tmp_path / "w", "/no/such/data", timeout=120)
  assert r.returncode == 2
  assert "train: error: config field data.path='/no/such/data' does not exist" in r.stderr
  assert "Traceback" not in r.stderr
  assert not os.path.exists(ckpt_dir(tmp_path / "w"))


@pytest.mark.slow
@pytest.mark.ci
def test_consistency_stage_starts_from_the_diffusion_stage(tiny_data, tmp_path):
  """Stage 2 in the same workdir starts its student and frozen teacher from
  stage 1's EMA params, trains, and the teacher stays frozen."""
  workdir = str(tmp_path / "run")
  Trainer(make_config(tiny_data, train__steps=2), workdir).run()
  _, stage1 = loading.load_generator_params(os.path.join(workdir, "diffusion"))
  summary = Trainer(make_config(tiny_data, stage="consistency", train__steps=2,
                                consistency__num_steps=4), workdir).run()
  assert summary["steps_run"] == 2 and np.isfinite(summary["final_loss"])
  step_dir = loading.resolve_step_dir(workdir)
  assert step_dir.endswith(os.path.join("consistency", "checkpoints", "2"))
  _, teacher = loading.load_generator_params(workdir, which="teacher_params")
  _, student = loading.load_generator_params(workdir, which="gen_params")
  for a, b in zip(jax.tree.leaves(teacher), jax.tree.leaves(stage1)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert any(float(np.abs(np.asarray(a) - np.asarray(b)).max()) > 0
             for a, b in zip(jax.tree.leaves(student), jax.tree.leaves(stage1)))


def test_consistency_without_a_diffusion_checkpoint_is_a_clear_error(tiny_data, tmp_path):
  with pytest.raises(FileNotFoundError, match="run stage 'diffusion'"):
    Trainer(make_config(tiny_data, stage="consistency"), str(tmp_path / "empty")).run()


@pytest.mark.slow
@pytest.mark.ci
def test_pipeline_runs_three_stages_each_from_the_one_before(tiny_data, tmp_path):
  """stage=pipeline through launch/train.py: diffusion -> consistency ->
  adversarial in one workdir. Stage 3's generator starts from stage 2's EMA
  and trains; its discriminator's backbone is stage 1's EMA (frozen here by a
  zero learning rate, so it must still equal it after the steps).

  One device: on a multi-device CPU mesh XLA's CPU runtime may run two
  independent collectives of a stage-3 step in different orders on different
  devices and abort (a CPU-runtime limit; accelerators run them in program
  order). make_adversarial_step orders its phases to avoid it, yet it still
  happened here once in a few runs."""
  workdir = str(tmp_path / "run")
  overrides = dict(
      stage="pipeline", pipeline__diffusion_steps=2, pipeline__consistency_steps=2,
      pipeline__adversarial_steps=2, pipeline__sample_frames=0, consistency__num_steps=4,
      adversarial__rollout_frames=6, adversarial__segment_frames=4,
      adversarial__segment_overlap=1, adversarial__disc_optim__learning_rate=0.0,
      adversarial__gen_optim__learning_rate=1e-3, mesh__data=-1, mesh__fsdp=1,
      train__batch_size=2)

  def run():
    r = subprocess.run(cli_args(workdir, tiny_data, **overrides), cwd=ROOT,
                       env=cli_env(devices=1), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout + r.stderr

  out = run()
  assert [(s["stage"], s["start_step"], s["step"], s["steps_run"])
          for s in run_summaries(workdir)] == [
              (stage, 0, 2, 2) for stage in ("diffusion", "consistency", "adversarial")]
  assert "next: python launch/generate.py" in out
  assert loading.resolve_step_dir(workdir).endswith(
      os.path.join("adversarial", "checkpoints", "2"))
  _, stage1 = loading.load_generator_params(os.path.join(workdir, "diffusion"))
  _, stage2 = loading.load_generator_params(os.path.join(workdir, "consistency"))
  _, gen = loading.load_generator_params(workdir, which="gen_params")
  _, disc = loading.load_generator_params(workdir, which="disc_params")
  for name, leaf in disc["backbone"].items():
    for a, b in zip(jax.tree.leaves(leaf), jax.tree.leaves(stage1[name])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert any(float(np.abs(np.asarray(a) - np.asarray(b)).max()) > 0
             for a, b in zip(jax.tree.leaves(gen), jax.tree.leaves(stage2)))
  # a rerun finds every stage done and trains nothing
  run()
  assert [s["steps_run"] for s in run_summaries(workdir)] == [0, 0, 0]


def test_a_preempted_pipeline_stage_ends_the_run(tiny_data, tmp_path, monkeypatch):
  """SIGTERM during a pipeline stage saves that stage and stops the run: the
  next stage must not start from a half-trained one (a rerun resumes)."""
  from aapt_jax import pipeline as pipeline_lib
  ran = []

  class FakeTrainer:
    def __init__(self, config, workdir):
      self.stage = config.stage

    def run(self):
      ran.append(self.stage)
      return {"stage": self.stage, "preempted": self.stage == "consistency"}

  monkeypatch.setattr(pipeline_lib, "Trainer", FakeTrainer)
  config = make_config(tiny_data, stage="pipeline", pipeline__sample_frames=0)
  summaries = pipeline_lib.train(config, str(tmp_path))
  assert ran == ["diffusion", "consistency"] and summaries[-1]["preempted"]


@pytest.mark.slow
@pytest.mark.ci
def test_stage1_from_converted_wan_weights_starts_at_their_loss(tiny_data, tmp_path):
  """convert_weights (the diffusers fixture) -> --config.init_from: stage 1
  starts from exactly the converted params (a zero learning rate keeps them),
  and its first loss equals the flow-matching loss computed directly from them
  on the same first batch and noise."""
  import jax.numpy as jnp
  from aapt_jax.data import pipeline
  from aapt_jax.training import stages
  out = tmp_path / "converted"
  conv = subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch", "convert_weights.py"), "--from=diffusers",
       f"--src={os.path.join(ROOT, 'tests', 'fixtures', 'wan_transformer')}", f"--out={out}",
       f"--config={config_path('tiny.py')}", "--config.model.text_dim=32",
       "--config.model.num_layers=2"], capture_output=True, text=True, cwd=ROOT)
  assert conv.returncode == 0, conv.stderr
  _, converted = loading.load_generator_params(str(out))
  config = make_config(tiny_data, train__steps=1, init_from=str(out), model__text_dim=32,
                       diffusion__optim__learning_rate=0.0)
  summary = Trainer(config, str(tmp_path / "run")).run()
  _, trained = loading.load_generator_params(str(tmp_path / "run"), which="gen_params")
  for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(converted)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  ds = pipeline.make_dataset(tiny_data + "/clips.array_record",
                             clip_frames=config.train.clip_frames,
                             batch_size=config.train.batch_size, seed=config.train.seed,
                             process_index=0, process_count=1,
                             space_to_depth=config.data.space_to_depth or 1)
  batch = {k: jnp.asarray(v) for k, v in next(pipeline.make_iterator(ds)).items()}
  # the step's noise: TrainState.rng is the second of three keys from the seed
  state_rng = jax.random.split(jax.random.key(config.train.seed), 3)[1]
  _, k = jax.random.split(state_rng)
  loss = stages.diffusion_loss(build_generator(config), converted, batch, k, config)
  np.testing.assert_allclose(summary["first_loss"], float(loss), rtol=1e-5)


def test_stage_starts_from_an_export(tiny_data, tmp_path):
  """--config.init_from=EXPORT (fine-tuning an exported or shipped world):
  the run starts from exactly the export's generator (stored in bfloat16,
  read as float32; a zero learning rate keeps it); an export holds only the
  EMA params, so asking it for gen_params is named as such."""
  import flax.linen as nn
  import ml_collections
  from aapt_jax.export import write_export
  from aapt_jax.models import init_params
  config = make_config(tiny_data, train__steps=1, diffusion__optim__learning_rate=0.0)
  params = nn.meta.unbox(init_params(build_generator(config), jax.random.key(7)))["params"]
  params = jax.tree.map(lambda a: np.asarray(a) + 0.01, params)  # not the run's own init
  export_dir = str(tmp_path / "export")
  write_export(export_dir, config, params, source="test")
  assert loading.generator_location(export_dir) == export_dir
  exported_config, exported = loading.load_generator_params(export_dir)
  assert isinstance(exported_config, ml_collections.ConfigDict)
  rounded = jax.tree.map(lambda a: np.asarray(a).astype(jax.numpy.bfloat16).astype(np.float32),
                         params)
  for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(rounded)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="holds only the EMA generator params"):
    loading.load_generator_params(export_dir, which="gen_params")

  Trainer(make_config(tiny_data, train__steps=1, diffusion__optim__learning_rate=0.0,
                      init_from=export_dir), str(tmp_path / "run")).run()
  _, trained = loading.load_generator_params(str(tmp_path / "run"), which="gen_params")
  for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(rounded)):
    np.testing.assert_array_equal(np.asarray(a), b)


VAE_TINY = {"stage": "vae", "vae.base_dim": 8, "vae.z_dim": 4, "vae.dim_mult": (1, 2),
            "vae.num_res_blocks": 1, "vae.temperal_downsample": (True,),
            "model.latent_size": (4, 4), "vae.optim.learning_rate": 3e-3,
            "train.clip_frames": 5, "data.space_to_depth": 0}


def test_vae_stage_trains_on_pixel_clips_and_checks_them(tmp_path):
  """--config.stage=vae: the trainer trains the VAE (r = 2, s = 2) on uint8
  clips of 1 + 2k frames; its checkpoint holds the VAE's params; records or
  clip lengths that cannot train it are named before anything compiles."""
  rng = np.random.default_rng(0)
  data = tmp_path / "pixels"
  data.mkdir()
  write_records(str(data / "clips.array_record"),
                ({"video": rng.integers(0, 256, (9, 8, 8, 3), dtype=np.uint8), "fps": 8.0}
                 for _ in range(16)))
  config = make_config(str(data), train__steps=3, **{k.replace(".", "__"): v
                                                    for k, v in VAE_TINY.items()})
  summary = Trainer(config, str(tmp_path / "run")).run()
  assert summary["steps_run"] == 3 and np.isfinite(summary["final_loss"])
  from aapt_jax.models import abstract_params
  _, params = loading.load_generator_params(str(tmp_path / "run" / "vae"))
  want = abstract_params(config, "vae")
  assert jax.tree.structure(params) == jax.tree.structure(want)
  assert all(a.shape == b.shape for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want)))

  with pytest.raises(ValueError, match=r"train.clip_frames=4: stage 'vae' trains on clips "
                                       r"of 1 \+ k\*2 video frames"):
    Trainer(make_config(str(data), **{k.replace(".", "__"): v for k, v in
                                      {**VAE_TINY, "train.clip_frames": 4}.items()}),
            str(tmp_path / "bad"))
  with pytest.raises(ValueError, match=r"field 'video': shape \(9, 8, 8, 3\), expected "
                                       r"\[T, 16, 16, 3\]"):
    Trainer(make_config(str(data), **{k.replace(".", "__"): v for k, v in
                                      {**VAE_TINY, "model.latent_size": (8, 8)}.items()}),
            str(tmp_path / "bad2")).run()
