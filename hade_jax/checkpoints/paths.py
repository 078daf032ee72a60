"""Where a checkpoint is, and its small JSON items (config, meta), read without orbax.

A step directory (`<workdir>/checkpoints/<step>` or `<workdir>/best/<step>`) holds the orbax
items `state/` (arrays), `config/` and `meta/` (JSON, see `integrity`) and `data/` (the Grain
iterator position, one JSON file per process).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib

from hade_jax.checkpoints import integrity

log = logging.getLogger("hade_jax.checkpoints")

# The named steps of a workdir `step_dir` accepts (besides a step number); 'latest' = 'last'.
WHICH = ("best", "last", "latest")


def step_dir(path: str | os.PathLike, which: str = "best") -> pathlib.Path:
  """The step directory a workdir, a manager directory or a step directory points at.

  Args:
    path: a training workdir (holding `best/` and `checkpoints/`), a manager directory
      (`.../checkpoints` or `.../best`) or one step directory (`.../checkpoints/1200`).
    which: for a workdir, 'best' (the best validation step; the last step when the run kept
      no best), 'last' (or 'latest'), or a step number (`checkpoints/<step>`, else
      `best/<step>`; in a manager directory, `<step>`).
  """
  path = pathlib.Path(path).expanduser().absolute()
  which = str(which)
  if which not in WHICH and not which.isdigit():
    raise ValueError(f"which must be one of {', '.join(WHICH)} or a step number, got {which!r}")
  if (path / "state").is_dir():
    return path
  if which.isdigit():
    return _numbered_step(path, int(which))
  if (path / "checkpoints").is_dir() or (path / "best").is_dir():
    order = ("best", "checkpoints") if which == "best" else ("checkpoints", "best")
    for sub in order:
      found = latest_step(path / sub)
      if found is not None:
        return found
  else:
    found = latest_step(path)
    if found is not None:
      return found
  raise FileNotFoundError(
      f"no checkpoint in {path}: expected a training workdir (best/<step>/state or "
      "checkpoints/<step>/state), a checkpoints folder (<step>/state), a step folder "
      "(state/, config/) or a model folder (config.json, model.safetensors: python -m "
      "hade_jax.export); train one with python -m hade_jax.train --workdir=...")


def _numbered_step(path: pathlib.Path, step: int) -> pathlib.Path:
  """Step `step` of a workdir (checkpoints/ first, then best/) or of a manager directory."""
  managers = [path / "checkpoints", path / "best"]
  if not any(d.is_dir() for d in managers):
    managers = [path]
  for directory in managers:
    if (directory / str(step) / "state").is_dir():
      return directory / str(step)
  have = sorted({int(p.name) for d in managers if d.is_dir() for p in d.iterdir()
                 if p.name.isdigit() and (p / "state").is_dir()})
  raise FileNotFoundError(
      f"no step {step} in {path}: the finished steps there are {have or 'none'} (pass one of "
      "them, or 'best' / 'latest')")


def latest_step(directory: pathlib.Path) -> pathlib.Path | None:
  """The newest finished step directory in a manager directory (None: there is none)."""
  # Orbax writes a step to '<step>.orbax-checkpoint-tmp-*' and renames it when complete, so
  # only all-digit names are finished steps ('<step>.unreadable' are set aside).
  if not directory.is_dir():
    return None
  steps = [int(p.name) for p in directory.iterdir()
           if p.name.isdigit() and (p / "state").is_dir()]
  return directory / str(max(steps)) if steps else None


def saved_config(step: str | os.PathLike) -> dict:
  """The resolved config the trainer saved with a step directory, checked against its meta."""
  step = pathlib.Path(step)
  config = _json_item(step, "config")
  if config is None:
    raise FileNotFoundError(f"no saved config in {step / 'config'}; pass the training "
                            "config explicitly (config=... / --config=...)")
  meta = read_meta(step)
  if meta is not None:
    integrity.verify(step, meta, config=config)
  return config


def read_meta(step: str | os.PathLike) -> dict | None:
  """The checksums and counters saved with a step; None (with a warning) for a step written
  by a hade_jax without them."""
  step = pathlib.Path(step)
  meta = _json_item(step, "meta")
  if meta is None:
    log.warning("checkpoint %s has no checksums (written by an older hade_jax); its contents "
                "are not verified", step)
  return meta


def _json_item(step: pathlib.Path, name: str) -> dict | None:
  # Orbax's JsonSave writes `<item>/metadata`; older versions wrote `<item>/<name>.json`.
  for path in [step / name / "metadata", *sorted(step.glob(f"{name}/*.json"))]:
    if path.is_file():
      return json.loads(path.read_text())
  return None
