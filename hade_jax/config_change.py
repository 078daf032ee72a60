"""What changed between the config saved with a checkpoint and the one resuming it.

Without this check a changed model reads as damaged checkpoints ("unreadable ... move the folder
away"), and a user may delete good checkpoints. Three kinds of change:

  structure   the model (`model.*`) or the optimizer state's shape (`optim.groups`,
              `optim.frozen`, `optim.accum_steps`): the checkpoint cannot restore into it.
              Refused, the fields listed, nothing touched.
  training    the same arrays, but a different run from here on (`seed`, `dropout_rng`, the rest of
              `optim.*`, `loss.*`, `compute_dtype`, what the training data is): refused unless
              `config.allow_config_change=True`, then logged.
  other       logging, evaluation, checkpoint cadence, mesh, paths, the length of the run
              (`total_steps`/`num_epochs`: the learning-rate schedule follows the new length):
              logged.

`batch_size` is left to the trainer's own check (the data position does not carry over).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from hade_jax import validation

log = logging.getLogger(__name__)

STRUCTURE = ("model.", "optim.groups", "optim.frozen", "optim.accum_steps")
TRAINING = ("seed", "dropout_rng", "optim.", "loss.", "compute_dtype", "data.dataset",
            "data.builder_config",
            "data.synth_size", "data.train_split", "data.crop_seconds", "data.max_text_len",
            "data.spec_", "data.pad_mode", "data.folder_")
IGNORED = ("batch_size", "total_steps_resolved", "allow_config_change")


class ConfigChangeError(validation.ConfigError):
  """The config differs from the checkpoint's in a way that cannot (or may not) resume."""

  def __init__(self, message: str, changes: list[tuple[str, Any, Any]]):
    self.problems = [f"config.{k}: {_short(old)} -> {_short(new)}" for k, old, new in changes]
    ValueError.__init__(self, message)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}; tuples and lists compare as JSON lists."""
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out |= flatten(v, f"{prefix}{k}.")
    return out
  return {prefix[:-1]: json.loads(json.dumps(tree))}


def differences(saved: dict, requested: dict) -> dict[str, list[tuple[str, Any, Any]]]:
  """{'structure'|'training'|'other': [(field, saved value, requested value)]}.

  A field the saved config lacks (saved by a hade_jax before the field existed) counts as its
  default, so a new field left at its default changes nothing.
  """
  a, b = flatten(saved), flatten(requested)
  missing = "<absent>"
  defaults = flatten_defaults()
  out = {"structure": [], "training": [], "other": []}
  for key in sorted(a.keys() | b.keys()):
    old, new = a.get(key, missing), b.get(key, missing)
    if old == missing and key in defaults and defaults[key] == new:
      continue
    if old == new or key in IGNORED:
      continue
    kind = ("structure" if key.startswith(STRUCTURE)
            else "training" if key.startswith(TRAINING) else "other")
    out[kind].append((key, old, new))
  return out


def flatten_defaults() -> dict[str, Any]:
  """The sections' field defaults as `flatten` spells values (JSON lists for tuples)."""
  return {k: json.loads(json.dumps(v)) for k, v in validation.field_defaults().items()
          if _is_json(v)}


def _is_json(value: Any) -> bool:
  try:
    json.dumps(value)
  except TypeError:
    return False
  return True


def _lines(changes: list[tuple[str, Any, Any]]) -> str:
  return "\n".join(f"  {k}: {_short(old)} -> {_short(new)}" for k, old, new in changes)


def _short(value: Any) -> str:
  text = json.dumps(value) if not isinstance(value, str) or value == "<absent>" else repr(value)
  return text if len(text) <= 80 else text[:77] + "..."


def check_resume(saved: dict, requested: dict, *, step_dir: str, allow: bool) -> None:
  """Refuses (ConfigChangeError, a validation.ConfigError) or logs what `requested` changes."""
  diff = differences(saved, requested)
  if diff["structure"]:
    raise ConfigChangeError(
        f"the checkpoint {step_dir} holds a model of another shape than this config asks for; "
        f"it cannot resume (the checkpoints are fine and were not touched):\n"
        f"{_lines(diff['structure'])}\nUse the saved values to resume, or a new --workdir "
        f"(with --config.init.resume={step_dir} only if the shapes match).", diff["structure"])
  if diff["training"] and not allow:
    raise ConfigChangeError(
        f"this config changes how training continues from the checkpoint {step_dir}:\n"
        f"{_lines(diff['training'])}\nThe run would no longer be the one its earlier steps "
        "belong to. Use the saved values, a new --workdir, or "
        "--config.allow_config_change=True to continue with the change anyway.", diff["training"])
  if diff["training"]:
    log.warning("resuming %s with training changes (allow_config_change=True):\n%s",
                step_dir, _lines(diff["training"]))
  if diff["other"]:
    log.info("resuming %s with these config changes:\n%s", step_dir, _lines(diff["other"]))
