"""Checks a config before anything is built or compiled: `validate_config(config)`.

Every problem found is collected and raised at once as one `ConfigError`, each line naming the
field (`config.optim.lr.backbone: ...`). Checked:
- types against the schema (`configs/base.py`: each value's type is the type of its default;
  ints are not floats, bools are not ints, tuples may be lists as in a config saved as JSON),
  and keys the schema does not have;
- values: positive sizes and steps, training length, learning rates and weight decays,
  dtype names, dataset and builder config names, pad/crop modes, `best_metric`;
- cross-field facts: optimizer groups named in lr / weight_decay / frozen exist in
  optim.groups (and every trained group has a learning rate), regexes compile, the mel
  front end runs at the rate of the prepared data, the model's dataclasses accept
  `config.model` (THA levels within the towers, ...), max_text_len fits the text tower;
- devices: the mesh fits `num_devices`, and the global batch divides over the mesh's
  data x fsdp axes and over the processes.

Nothing here touches a device array, the file system or the data: the checks are about the
config alone, so a typo costs a second, not a compile.
"""

from __future__ import annotations

import logging
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections

from hade_jax import hade, metrics, sharding

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")
DATASETS = ("clotho", "audiocaps", "synthcaps")
# Stored sample rate of each builder config name (data_pipelines.builders.RATES; a test keeps
# the two equal). Names may carry a suffix ('48k_v2') or a synthcaps prefix ('custom1234_16k').
RATES = {"16k": 16_000, "22k": 22_050, "32k": 32_000, "44k": 44_100, "48k": 48_000}
SYNTH_SIZES = ("", "tiny", "demo", "full")  # data_pipelines.builders._SYNTH_SIZES, '' = none.
PAD_MODES = ("zeros", "repeat")  # input_pipeline.InputConfig
EVAL_CROPS = ("head", "center", "windows")
# Keys that a config saved with a checkpoint adds to the schema.
SAVED_KEYS = ("total_steps_resolved",)
# Sub-configs whose keys are names chosen by the user (optimizer group names).
_FREE_KEYS = ("optim.lr", "optim.weight_decay")


class ConfigError(ValueError):
  """A config that cannot run; `problems` lists each as 'config.field: what is wrong'."""

  def __init__(self, problems: Sequence[str]):
    self.problems = list(problems)
    count = f"{len(self.problems)} problem" + ("s" if len(self.problems) != 1 else "")
    super().__init__(f"invalid config ({count}):\n" + "\n".join(f"  {p}" for p in self.problems))


def best_metric_names() -> tuple[str, ...]:
  """The validation metrics the trainer logs whose maximum makes a best checkpoint.

  `trainer.run_eval` logs 'val/' + `metrics.retrieval_metrics` keys and `trainer.rsum`'s
  'val/{t2a,a2t}/R@1+R@5+R@10'; ranks are left out (lower is better, the best checkpoint
  keeps the maximum).
  """
  names = []
  for direction in ("t2a", "a2t"):
    names += [f"val/{direction}/R@{k}" for k in metrics.KS] + [f"val/{direction}/mAP@10"]
    names.append(f"val/{direction}/" + "+".join(f"R@{k}" for k in metrics.KS))
  return tuple(names)


def mesh_shape(axes: Any, num_devices: int) -> dict[str, int]:
  """The axis sizes `sharding.make_mesh(axes)` builds on `num_devices` devices.

  Raises:
    ValueError: the same cases as `make_mesh`, plus malformed axes (names, sizes).
  """
  if isinstance(axes, str) or not isinstance(axes, Sequence) or not axes:
    raise ValueError(f"expected a non-empty sequence of (axis name, size) pairs, got {axes!r}")
  names, sizes = [], []
  for item in axes:
    if isinstance(item, str) or not isinstance(item, Sequence) or len(item) != 2:
      raise ValueError(f"expected (axis name, size) pairs, got {item!r}")
    name, size = item
    if not isinstance(name, str) or not name:
      raise ValueError(f"axis name {name!r} is not a non-empty string")
    if not _is_int(size) or not (size >= 1 or size == -1):
      raise ValueError(f"axis {name!r}: size {size!r} is not a positive integer or -1 "
                       "(the remaining devices)")
    names.append(name)
    sizes.append(int(size))
  if len(set(names)) != len(names):
    raise ValueError(f"axis names {names} repeat")
  if sizes.count(-1) > 1:
    raise ValueError(f"{list(axes)}: at most one axis may have size -1")
  known = math.prod(s for s in sizes if s != -1)
  if num_devices % known:
    raise ValueError(f"{list(axes)} does not divide the {num_devices} available devices "
                     f"(the fixed axes need a multiple of {known})")
  used = num_devices if -1 in sizes else known
  sizes = [used // known if s == -1 else s for s in sizes]
  return dict(zip(names, sizes, strict=True))


def validate_config(config: ml_collections.ConfigDict, *, num_devices: int | None = None,
                    num_processes: int | None = None, training: bool = True) -> None:
  """Raises one `ConfigError` listing every problem of `config`; returns None when clean.

  Args:
    config: a config of the `configs/base.py` schema (locked or not, or loaded from JSON).
    num_devices: devices the mesh is built on (default `jax.device_count()`).
    num_processes: processes sharing the global batch (default `jax.process_count()`).
    training: False for evaluation / search with a trained model: the optimizer, checkpoint,
      mesh and batch checks are skipped (evaluation pads its batches to any device count), and
      keys the schema gained or lost since the checkpoint was saved are not problems.

  Raises:
    ConfigError: the config has problems (all of them are listed, each naming its field).
  """
  v = _Validator(config)
  v.check_schema(training)
  v.check_data()
  v.check_model()
  v.check_eval()
  if training:
    v.check_training()
    if num_devices is None:
      num_devices = jax.device_count()
    if num_processes is None:
      num_processes = jax.process_count()
    v.check_devices(num_devices, num_processes)
  if v.problems:
    raise ConfigError(v.problems)


# ---------------------------------------------------------------------------------------------


def _is_int(x) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_seq(x) -> bool:
  return isinstance(x, Sequence) and not isinstance(x, str | bytes)


def _type_name(x) -> str:
  if isinstance(x, bool):
    return "bool"
  if _is_int(x):
    return "int"
  if _is_real(x):
    return "float"
  if isinstance(x, str):
    return "str"
  if _is_seq(x):
    return "tuple"
  if isinstance(x, Mapping):
    return "ConfigDict"
  return type(x).__name__


def _same_type(value, default) -> bool:
  if default is None:
    return True
  if isinstance(default, bool):
    return isinstance(value, bool)
  if _is_int(default):
    return _is_int(value)
  if _is_real(default):
    return _is_real(value)
  if isinstance(default, str):
    return isinstance(value, str)
  if _is_seq(default):
    return _is_seq(value)
  return True


class _Validator:
  """Collects 'config.path: problem' lines."""

  def __init__(self, config):
    self.config = config
    self.problems: list[str] = []

  def add(self, path: str, message: str) -> None:
    self.problems.append(f"config.{path}: {message}")

  def reported(self, path: str) -> bool:
    return any(p.startswith(f"config.{path}:") for p in self.problems)

  def get(self, path: str, default=None):
    node = self.config
    for key in path.split("."):
      if not isinstance(node, Mapping | ml_collections.ConfigDict) or key not in node:
        return default
      node = node[key]
    return node

  def has(self, path: str) -> bool:
    sentinel = object()
    return self.get(path, sentinel) is not sentinel

  # -- types against the schema ----------------------------------------------------------------
  def check_schema(self, training: bool) -> None:
    try:  # the schema; configs depends on hade_jax, so import late
      from configs import base
    except ImportError:  # configs/ is not importable (an installed hade_jax used elsewhere)
      log.warning("configs.base is not importable: config types not checked against it")
      return
    self._walk(base.get_config(), self.config, "", training)

  def _walk(self, schema, node, prefix: str, training: bool) -> None:
    if not isinstance(node, Mapping | ml_collections.ConfigDict):
      self.add(prefix.rstrip("."), f"expected a ConfigDict, got {_type_name(node)} {node!r}")
      return
    for key in schema:
      path = prefix + key
      if key not in node:
        if training:  # an older saved config may lack keys added since; eval has defaults
          self.add(path, "missing (every key of configs/base.py is required)")
        continue
      default, value = schema[key], node[key]
      if isinstance(default, ml_collections.ConfigDict):
        if path in _FREE_KEYS:
          if training:  # the optimizer is not built for evaluation
            self._check_mapping(path, value)
        elif not (path.startswith("model.") and value is None):
          self._walk(default, value, path + ".", training)
      elif value is None and default is not None and not path.startswith("model."):
        # The model dataclasses accept None for some fields; check_model catches the rest.
        self.add(path, f"is None; expected {_type_name(default)} like {default!r}")
      elif value is not None and not _same_type(value, default):
        self.add(path, f"expected {_type_name(default)} (like the default {default!r}), got "
                 f"{_type_name(value)} {value!r}")
    for key in node if training else ():  # a saved config may hold keys since removed
      if key not in schema and not (prefix == "" and key in SAVED_KEYS):
        self.add(prefix + key, "unknown key (not in configs/base.py; a typo?)")

  def _check_mapping(self, path: str, value) -> None:
    if not isinstance(value, Mapping | ml_collections.ConfigDict):
      self.add(path, f"expected a ConfigDict of group name -> number, got {value!r}")
      return
    for group, x in value.items():
      if not _is_real(x) or not math.isfinite(x):
        self.add(f"{path}.{group}", f"expected a finite number, got {_type_name(x)} {x!r}")
      elif x < 0:
        self.add(f"{path}.{group}", f"must be >= 0, got {x!r}")

  # -- value checks ----------------------------------------------------------------------------
  def _choice(self, path: str, allowed: Sequence[str]) -> None:
    value = self.get(path)
    if isinstance(value, str) and value not in allowed:
      self.add(path, f"{value!r} is not one of {', '.join(map(repr, allowed))}")

  def _positive(self, path: str, *, allow_zero: bool = False, integer: bool = True) -> None:
    value = self.get(path)
    ok_type = _is_int(value) if integer else _is_real(value)
    if not ok_type:
      return  # reported by the schema walk
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
      self.add(path, f"must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")

  def check_data(self) -> None:
    self._choice("data.dataset", DATASETS)
    self._choice("data.pad_mode", PAD_MODES)
    self._choice("data.eval_crop", EVAL_CROPS)
    self._positive("data.crop_seconds", integer=False)
    for path in ("data.num_workers", "data.spec_time_stripes", "data.spec_time_width",
                 "data.spec_freq_stripes", "data.spec_freq_width"):
      self._positive(path, allow_zero=True)
    self._positive("data.num_threads")
    max_text_len = self.get("data.max_text_len")
    if _is_int(max_text_len) and max_text_len < 3:
      self.add("data.max_text_len", f"must be >= 3 ([CLS], one token, [SEP]), got "
               f"{max_text_len}")
    if self.get("data.dataset") == "synthcaps":
      self._choice("data.synth_size", SYNTH_SIZES)
    builder = self.get("data.builder_config")
    if isinstance(builder, str):
      rate = builder_rate(builder)
      mel_rate = self.get("model.mel.sample_rate")
      if rate is None:
        self.add("data.builder_config", f"{builder!r} names no sample rate; known: "
                 f"{', '.join(RATES)} (or '<rate>_v2' for AudioCaps 2.0 captions)")
      elif _is_real(mel_rate) and mel_rate != rate:
        self.add("model.mel.sample_rate", f"{mel_rate} Hz, but config.data.builder_config="
                 f"{builder!r} stores audio at {rate} Hz; the front end must run at the rate "
                 "of the prepared data")

  def check_model(self) -> None:
    for path in ("compute_dtype", "model.audio.dtype", "model.text.dtype"):
      value = self.get(path)
      if value is not None and value not in DTYPES and not self.reported(path):
        self.add(path, f"{value!r} is not one of {', '.join(DTYPES)}")
    for flag in ("use_global", "use_tha", "use_dcr"):
      path, value = f"model.heads.{flag}", self.get(f"model.heads.{flag}")
      if value is not None and not isinstance(value, bool) and not self.reported(path):
        self.add(path, f"ablation flags are True/False, got {value!r}")
    model = self.get("model")
    if not isinstance(model, Mapping | ml_collections.ConfigDict):
      return
    try:
      as_dict = model.to_dict() if isinstance(model, ml_collections.ConfigDict) else dict(model)
      cfg = hade.HadeConfig.from_config(as_dict)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
      self.add("model", f"the model dataclasses refuse it: {type(e).__name__}: {e}")
      return
    max_text_len = self.get("data.max_text_len")
    if _is_int(max_text_len) and max_text_len > cfg.text.max_length:
      self.add("data.max_text_len", f"{max_text_len} tokens exceed the text tower's "
               f"{cfg.text.max_length} positions")

  def check_eval(self) -> None:
    for path in ("eval_batch_size", "eval_tile"):
      self._positive(path)
    self._positive("eval_max_clips", allow_zero=True)

  def check_training(self) -> None:
    self._positive("batch_size")
    for path in ("data.train_split", "data.eval_split"):
      if self.get(path) == "":
        self.add(path, "is empty; the trainer reads this split (and validates on eval_split "
                 "at the last step)")
    total_steps, num_epochs = self.get("total_steps"), self.get("num_epochs")
    if _is_int(total_steps) and _is_real(num_epochs):
      if not math.isfinite(num_epochs):
        self.add("num_epochs", f"must be finite, got {num_epochs!r}")
      elif total_steps <= 0 and num_epochs <= 0:
        self.add("num_epochs", f"{num_epochs} with config.total_steps={total_steps}: no "
                 "training length (set num_epochs > 0, or total_steps > 0)")
    self._positive("checkpoint_every_steps")
    self._positive("log_every_steps")
    self._positive("eval_every_steps", allow_zero=True)
    self._positive("max_steps_per_run", allow_zero=True)
    self._positive("max_consecutive_skips", allow_zero=True)
    keep = self.get("keep_checkpoints")
    if _is_int(keep) and keep < 1:
      self.add("keep_checkpoints", f"must be >= 1 (the last step is needed to resume), got "
               f"{keep}")
    best = self.get("best_metric")
    if isinstance(best, str) and best and best not in best_metric_names():
      self.add("best_metric", f"{best!r} is not a validation metric the trainer maximises; "
               f"choose one of {', '.join(best_metric_names())} (or '' for none)")
    self._check_optim()

  def _check_optim(self) -> None:
    groups = self.get("optim.groups")
    names: set[str] = set()
    if _is_seq(groups):
      if not groups:
        self.add("optim.groups", "is empty; every parameter needs a group")
      for i, rule in enumerate(groups):
        if not _is_seq(rule) or len(rule) != 2:
          self.add(f"optim.groups[{i}]", f"expected a (regex, group name) pair, got {rule!r}")
          continue
        pattern, name = rule
        self._regex(f"optim.groups[{i}]", pattern)
        if not isinstance(name, str) or not name:
          self.add(f"optim.groups[{i}]", f"group name {name!r} is not a non-empty string")
        else:
          names.add(name)
    if not names:
      return
    known = ", ".join(sorted(names))
    frozen = self.get("optim.frozen")
    frozen = set(frozen) if _is_seq(frozen) else set()
    for group in sorted(frozen - names, key=str):
      self.add("optim.frozen", f"{group!r} is not a group of config.optim.groups ({known})")
    for path in ("optim.lr", "optim.weight_decay"):
      mapping = self.get(path)
      if isinstance(mapping, Mapping | ml_collections.ConfigDict):
        for group in mapping:
          if group not in names:
            self.add(f"{path}.{group}", f"unknown group; config.optim.groups has {known}")
    lr = self.get("optim.lr")
    if isinstance(lr, Mapping | ml_collections.ConfigDict):
      for group in sorted(names - frozen - set(lr)):
        self.add("optim.lr", f"no learning rate for group {group!r} (trained: it is not in "
                 "config.optim.frozen)")
    for path, lo, hi in (("optim.b1", 0, 1), ("optim.b2", 0, 1)):
      value = self.get(path)
      if _is_real(value) and not lo <= value < hi:
        self.add(path, f"must be in [{lo}, {hi}), got {value!r}")
    self._positive("optim.eps", integer=False)
    for path in ("optim.warmup_epochs", "optim.end_factor", "optim.clip_norm"):
      self._positive(path, allow_zero=True, integer=False)

  def _regex(self, path: str, pattern) -> None:
    if not isinstance(pattern, str):
      self.add(path, f"regex {pattern!r} is not a string")
      return
    try:
      re.compile(pattern)
    except re.error as e:
      self.add(path, f"invalid regex {pattern!r}: {e}")

  def check_devices(self, num_devices: int, num_processes: int) -> None:
    try:
      shape = mesh_shape(self.get("mesh"), num_devices)
    except ValueError as e:
      self.add("mesh", str(e))
      shape = None
    rules = self.get("sharding_rules")
    if _is_seq(rules):
      for i, rule in enumerate(rules):
        if not _is_seq(rule) or len(rule) != 2:
          self.add(f"sharding_rules[{i}]", f"expected a (regex, spec) pair, got {rule!r}")
          continue
        pattern, spec = rule
        self._regex(f"sharding_rules[{i}]", pattern)
        if spec is None or spec in ("fsdp", "replicate"):
          continue
        if not _is_seq(spec) or not all(a is None or isinstance(a, str) for a in spec):
          self.add(f"sharding_rules[{i}]", f"spec {spec!r} is not 'fsdp', 'replicate' or a "
                   "tuple of mesh axis names / None")
        elif shape is not None and (unknown := [a for a in spec if a and a not in shape]):
          self.add(f"sharding_rules[{i}]", f"spec {spec!r} names axes {unknown} that the mesh "
                   f"{shape} does not have")
    batch = self.get("batch_size")
    if not _is_int(batch) or batch <= 0:
      return
    if shape is not None:
      batch_devices = math.prod(shape[a] for a in sharding.BATCH_AXES if a in shape)
      if batch % batch_devices:
        self.add("batch_size", f"{batch} does not divide over the {batch_devices} devices of "
                 f"the mesh's data x fsdp axes {shape} ({num_devices} devices)")
    if batch % num_processes:
      self.add("batch_size", f"{batch} does not divide over {num_processes} processes")


def builder_rate(name: str) -> int | None:
  """Sample rate of a builder config name: '48k', '48k_v2', 'demo_16k', '8000hz' -> Hz."""
  for part in name.split("_"):
    if part in RATES:
      return RATES[part]
    if m := re.fullmatch(r"([1-9][0-9]*)hz", part):
      return int(m.group(1))
  return None
