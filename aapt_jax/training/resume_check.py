"""Resume only onto the run that was saved: the config diff against the checkpoint's.

A rerun resumes from the latest checkpoint; if its config differs from the
one the checkpoint was saved with, the run would silently train on another
recipe (a new learning rate, data set, seed ...). `config_changes` lists
every differing field with its kind:

  "meaning"   changes what the run computes (optimizer, schedule, seed, data,
              model, objectives, ...): every field not listed below;
  "harmless"  how it is run, logged or saved (HARMLESS_FIELDS); resumes
              silently;
  "schema"    present on one side only (a field added to or removed from
              configs/base.py since the save): reported, never refused,
              since a new field's default keeps the old behaviour.

`train.steps` is "harmless" (training on longer) unless an optimizer of the
run has a non-constant schedule, which decays to 0 at train.steps. Given the
stage, the sections of the stages after it are "harmless" too (a stage-1 run
never reads `consistency.*` or `adversarial.*`), so a finished stage 1 that a
pipeline or claims.py passes again with new stage-3 settings is not refused.
`check_resume` logs the changes and refuses (ValueError naming every key and
both values) a "meaning" change unless `config.resume_with_changes` is True;
then it appends the diff to `<workdir>/config_changes.json`.
"""
from __future__ import annotations

import datetime
import json
import os
from typing import Any
from collections.abc import Callable

from aapt_jax.checkpointing import config_to_dict, flatten_config

# Fields (or sections, ending in ".") that may change between a save and a resume
# without changing what the run computes: logging, checkpointing, devices,
# implementation choices with equal results, fields only read at a fresh start.
HARMLESS_FIELDS = (
    "train.log_every", "train.max_nonfinite",
    "checkpoint.",                      # every_steps, keep
    "mesh.", "distributed.",            # devices and processes (restores onto any mesh)
    "model.remat", "model.attention_backend", "adversarial.disc_clips_per_forward",
    "diffusion.sampler_steps",          # how the model streams, not how it trains
    "init_from", "disc_init_from",      # read only when a stage starts afresh
    "pipeline.",                        # its *_steps reach each stage as train.steps
    "resume_with_changes",
)
# the sections each post-training stage never reads: those of the stages after it
LATER_STAGE_SECTIONS = {
    "diffusion": ("consistency.", "adversarial."),
    "consistency": ("adversarial.",),
}
STEPS_FIELD = "train.steps"
CHANGES_FILE = "config_changes.json"


def _harmless(key: str, stage: str | None = None) -> bool:
  fields = HARMLESS_FIELDS + LATER_STAGE_SECTIONS.get(stage, ())
  return any(key == f or (f.endswith(".") and key.startswith(f)) for f in fields)


def _schedule_uses_steps(flat: dict[str, Any]) -> bool:
  """Whether an optimizer's schedule depends on train.steps (not constant)."""
  return any(k.endswith("optim.schedule") and v != "constant" for k, v in flat.items())


def config_changes(saved: dict, current: dict,
                   stage: str | None = None) -> list[tuple[str, Any, Any, str]]:
  """[(key, saved value, current value, kind)] for every field that differs
  between the checkpoint's config `saved` and `current` (dicts or
  ConfigDicts), sorted by key; kind is "meaning", "harmless" or "schema"
  (see the module docstring; `stage` makes later stages' sections
  harmless). Tuples and lists compare equal."""
  a, b = flatten_config(config_to_dict(saved)), flatten_config(config_to_dict(current))
  missing = object()
  changes = []
  for key in sorted(set(a) | set(b)):
    old, new = a.get(key, missing), b.get(key, missing)
    if old == new:
      continue
    if old is missing or new is missing:
      kind = "schema"
    elif key == STEPS_FIELD:
      kind = "meaning" if _schedule_uses_steps(a) or _schedule_uses_steps(b) else "harmless"
    else:
      kind = "harmless" if _harmless(key, stage) else "meaning"
    changes.append((key, None if old is missing else old, None if new is missing else new,
                    kind))
  return changes


def _describe(changes) -> str:
  return "\n".join(f"  {key}: checkpoint={old!r}, config={new!r}" for key, old, new, _ in changes)


def check_resume(saved: dict, config, *, workdir: str, stage: str, step: int,
                 log: Callable[[str], Any] = print, record: bool = True) -> list:
  """Checks a resume of `stage` at `step` with `config` against the
  checkpoint's config `saved`; returns `config_changes`. Logs the
  "meaning" and "schema" changes; raises ValueError (naming each key and
  both values, and the flag) on a "meaning" change unless
  `config.resume_with_changes`; then, with `record` (the main process),
  appends {time, stage, step, changes} to `<workdir>/config_changes.json`."""
  changes = config_changes(saved, config, stage)
  meaning = [c for c in changes if c[3] == "meaning"]
  schema = [c for c in changes if c[3] == "schema"]
  if schema:
    log(f"{stage}: config fields added or removed since the checkpoint of step {step} "
        f"(their defaults apply):\n{_describe(schema)}")
  if not meaning:
    return changes
  if not config.get("resume_with_changes", False):
    raise ValueError(
        f"{stage}: the config differs from the one the checkpoint of step {step} was saved "
        f"with, in fields that change what the run trains:\n{_describe(meaning)}\n"
        "Resume with the checkpoint's values, use a new --workdir, or pass "
        "--config.resume_with_changes=True to train on with the changes (recorded in "
        f"{os.path.join(workdir, CHANGES_FILE)}). Nothing was trained or saved.")
  log(f"{stage}: resuming from step {step} with config changes (resume_with_changes=True; "
      f"recorded in {CHANGES_FILE}):\n{_describe(meaning)}")
  if record:
    _record(workdir, {"time": datetime.datetime.now(datetime.UTC).isoformat(
        timespec="seconds"), "stage": stage, "step": int(step),
        "changes": [{"key": k, "checkpoint": o, "config": n, "kind": kind}
                    for k, o, n, kind in changes if kind != "harmless"]})
  return changes


def _record(workdir: str, entry: dict) -> None:
  """Appends `entry` to the JSON list in `<workdir>/config_changes.json` (atomically)."""
  path = os.path.join(os.path.abspath(workdir), CHANGES_FILE)
  entries = []
  if os.path.exists(path):
    with open(path) as f:
      entries = json.load(f)
  entries.append(entry)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(entries, f, indent=1, default=str)
  os.replace(path + ".tmp", path)
