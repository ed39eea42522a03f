"""Resume never trains on a silently changed config: a change of what the run
trains refuses to resume (naming the key and both values) unless
resume_with_changes, which records the diff; harmless changes resume silently."""
import json
import os
import shutil

import pytest

from aapt_jax import load_config
from aapt_jax.training.resume_check import CHANGES_FILE, check_resume, config_changes
from aapt_jax.training.trainer import Trainer
from helpers import config_path
from test_training_loop import complete_steps, good_run, make_config, tiny_data  # noqa: F401


def _config(**overrides):
  return load_config(config_path("tiny.py"), overrides)


def test_config_changes_kinds():
  saved = _config().to_dict()
  saved.pop("resume_with_changes")  # a checkpoint from before the field existed
  current = _config(**{"diffusion.optim.learning_rate": 2e-5, "train.log_every": 3,
                       "checkpoint.every_steps": 7, "mesh.fsdp": 2, "train.steps": 50,
                       "train.seed": 4, "data.path": "/other"})
  assert config_changes(saved, current) == [
      ("checkpoint.every_steps", 500, 7, "harmless"),
      ("data.path", "", "/other", "meaning"),
      ("diffusion.optim.learning_rate", 1e-5, 2e-5, "meaning"),
      ("mesh.fsdp", 1, 2, "harmless"),
      ("resume_with_changes", None, False, "schema"),
      ("train.log_every", 10, 3, "harmless"),
      ("train.seed", 0, 4, "meaning"),
      ("train.steps", 1000, 50, "harmless")]  # constant schedules: training on longer
  cosine = _config(**{"vae.optim.schedule": "cosine"})
  assert config_changes(cosine, _config(**{"vae.optim.schedule": "cosine", "train.steps": 9})) \
      == [("train.steps", 1000, 9, "meaning")]  # the decay ends at train.steps
  assert config_changes(_config(), _config()) == []


def test_later_stages_settings_do_not_stop_an_earlier_stage(tmp_path):
  """A finished stage 1 rerun with new stage-3 settings (a pipeline, claims.py)
  resumes; the same change refuses a stage-3 resume, and stage 1's own
  fields still refuse stage 1."""
  saved = _config().to_dict()
  later = _config(**{"adversarial.r1_sigma": 0.03, "consistency.shift": 5.0})
  assert [c[3] for c in config_changes(saved, later, "diffusion")] == ["harmless", "harmless"]
  check_resume(saved, later, workdir=str(tmp_path), stage="diffusion", step=3)
  assert [(c[0], c[3]) for c in config_changes(saved, later, "consistency")] == [
      ("adversarial.r1_sigma", "harmless"), ("consistency.shift", "meaning")]
  with pytest.raises(ValueError, match=r"adversarial\.r1_sigma: checkpoint=0\.1, config=0\.03"):
    check_resume(saved, later, workdir=str(tmp_path), stage="adversarial", step=3)
  with pytest.raises(ValueError, match=r"diffusion\.context_noise"):
    check_resume(saved, _config(**{"diffusion.context_noise": 0.2}), workdir=str(tmp_path),
                 stage="diffusion", step=3)
  assert not os.path.exists(tmp_path / CHANGES_FILE)


def test_check_resume_refuses_then_records_with_the_flag(tmp_path):
  saved = _config().to_dict()
  changed = _config(**{"diffusion.optim.learning_rate": 3e-5, "train.log_every": 1})
  with pytest.raises(ValueError, match=r"(?s)diffusion\.optim\.learning_rate: checkpoint=1e-05, "
                     r"config=3e-05.*--config\.resume_with_changes=True"):
    check_resume(saved, changed, workdir=str(tmp_path), stage="diffusion", step=3)
  assert not os.path.exists(tmp_path / CHANGES_FILE)
  logged = []
  allowed = _config(**{"diffusion.optim.learning_rate": 3e-5, "resume_with_changes": True})
  for step in (3, 6):  # appended per resume
    check_resume(saved, allowed, workdir=str(tmp_path), stage="diffusion", step=step,
                 log=logged.append)
  entries = json.loads((tmp_path / CHANGES_FILE).read_text())
  assert [e["step"] for e in entries] == [3, 6]
  assert entries[0]["changes"] == [{"key": "diffusion.optim.learning_rate", "checkpoint": 1e-5,
                                    "config": 3e-5, "kind": "meaning"}]
  assert "learning_rate" in logged[0]
  harmless = []
  check_resume(saved, _config(**{"train.log_every": 1}), workdir=str(tmp_path),
               stage="diffusion", step=9, log=harmless.append)
  assert harmless == [] and len(json.loads((tmp_path / CHANGES_FILE).read_text())) == 2


def test_trainer_refuses_a_changed_learning_rate_and_resumes_with_the_flag(  # noqa: F811
    tiny_data, good_run, tmp_path):  # noqa: F811 - fixtures of test_training_loop
  run = str(tmp_path / "run")
  shutil.copytree(good_run, run)
  with pytest.raises(ValueError, match=r"diffusion\.optim\.learning_rate: checkpoint=1e-05, "
                     r"config=2e-05"):
    Trainer(make_config(tiny_data, train__steps=6, diffusion__optim__learning_rate=2e-5),
            run).run()
  assert complete_steps(run) == [3]
  # a harmless change (logging, checkpoint interval, a longer constant schedule): silent
  summary = Trainer(make_config(tiny_data, train__steps=4, train__log_every=2,
                                checkpoint__every_steps=4), run).run()
  assert summary["start_step"] == 3 and summary["step"] == 4
  assert not os.path.exists(os.path.join(run, CHANGES_FILE))
  summary = Trainer(make_config(tiny_data, train__steps=5, diffusion__optim__learning_rate=2e-5,
                                resume_with_changes=True), run).run()
  assert summary["start_step"] == 4 and summary["step"] == 5
  entry, = json.loads(open(os.path.join(run, CHANGES_FILE)).read())
  assert entry["step"] == 4 and {c["key"] for c in entry["changes"]} == \
      {"diffusion.optim.learning_rate"}
