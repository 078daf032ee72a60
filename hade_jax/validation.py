"""Checks a config before anything is built or compiled: `validate_config(config)`.

Validating is building: every section of `config_schema` (and the model's own dataclasses) is
built from the ConfigDict, each checking itself in `__post_init__`, and every problem of every
section is collected into one `ConfigError`, each line naming the field
(`config.optim.lr.backbone: ...`). What no single section can know is checked here: the mel
front end runs at the rate of the prepared data, max_text_len fits the text tower, the mesh fits
the devices, the global batch divides over the mesh's data x fsdp axes and the processes, and
the batch's activations fit a device.

Nothing here touches a device array, the file system or the data: the checks are about the
config alone, so a typo costs a second, not a compile.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections

from hade_jax import bert, config_schema, fields, frontend, hade, heads, htsat, losses, sharding

ConfigError = fields.ConfigError
best_metric_names = config_schema.best_metric_names
SAVED_KEYS = config_schema.SAVED_KEYS
# Estimated activation bytes of one device's share of the batch above which training is
# refused (no accelerator holds 1 TiB: batch_size=1e9 should fail here, not in the allocator).
MAX_ACTIVATION_BYTES = 2**40
_MODEL_SECTIONS = {"audio": htsat.HtsatConfig, "text": bert.BertConfig,
                   "heads": heads.HeadsConfig, "mel": frontend.LogMelConfig}


def field_defaults() -> dict[str, Any]:
  """{'loss.global_nce_weight': 0.0, 'model.heads.level_sim': 'tokens', ...}: the default of
  every field of every section, by its flat config key (top-level sections unprefixed)."""
  prefixed = ([("", cls) for cls in config_schema.TOP_SECTIONS]
              + list(config_schema.SECTIONS.items()) + [("loss", losses.LossConfig)]
              + [(f"model.{k}", cls) for k, cls in _MODEL_SECTIONS.items()])
  out = {}
  for prefix, cls in prefixed:
    for f in dataclasses.fields(cls):
      if f.default is not dataclasses.MISSING:
        out[f"{prefix}.{f.name}".lstrip(".")] = f.default
  return out


@dataclasses.dataclass(frozen=True)
class Sections:
  """A config built into its checked sections (`config_schema`; None: not built, eval mode)."""

  run: config_schema.RunConfig
  data: config_schema.DataConfig
  model: hade.HadeConfig
  loss: losses.LossConfig
  train: config_schema.TrainConfig | None = None
  mesh: config_schema.MeshConfig | None = None
  init: config_schema.InitConfig | None = None
  optim: config_schema.OptimConfig | None = None


def validate_config(config: ml_collections.ConfigDict, *, num_devices: int | None = None,
                    num_processes: int | None = None, training: bool = True) -> Sections:
  """Builds every section of `config`; raises one `ConfigError` listing every problem.

  Args:
    config: a config of the `configs/base.py` schema (locked or not, or loaded from JSON).
    num_devices: devices the mesh is built on (default `jax.device_count()`).
    num_processes: processes sharing the global batch (default `jax.process_count()`).
    training: False for evaluation / search with a trained model: the optimizer, checkpoint,
      mesh and batch sections are not built (evaluation pads its batches to any device
      count), and keys the schema gained or lost since the checkpoint was saved are not
      problems (missing ones take their defaults).

  Returns:
    The built sections.

  Raises:
    ConfigError: the config has problems (all of them are listed, each naming its field).
  """
  b = _Builder(config, training)
  if not isinstance(config, Mapping | ml_collections.ConfigDict):
    raise ConfigError([f"config: expected a ConfigDict, got {fields.type_name(config)}"])
  b.unknown_top_keys()
  built = {cls: b.section(cls, config, "") for cls in config_schema.TOP_SECTIONS
           if training or cls not in config_schema.TRAINING_ONLY}
  for name, cls in config_schema.SECTIONS.items():
    if training or cls not in config_schema.TRAINING_ONLY:
      built[name] = b.section(cls, b.node(name), name)
  model = b.model()
  loss = b.section(losses.LossConfig, b.node("loss"), "loss")
  b.cross_checks(built.get("data"), model)
  if training:
    num_devices = jax.device_count() if num_devices is None else num_devices
    num_processes = jax.process_count() if num_processes is None else num_processes
    b.device_checks(built.get(config_schema.MeshConfig), model, built.get("data"), num_devices,
                    num_processes)
  if b.problems:
    raise ConfigError(b.problems)
  return Sections(run=built[config_schema.RunConfig], data=built["data"], model=model,
                  loss=loss, train=built.get(config_schema.TrainConfig),
                  mesh=built.get(config_schema.MeshConfig), init=built.get("init"),
                  optim=built.get("optim"))


# ---------------------------------------------------------------------------------------------


def _plain(value):
  """ConfigDict / mapping -> dict, list -> tuple (a config saved as JSON has lists)."""
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, list | tuple):
    return tuple(_plain(v) for v in value)
  return value


class _Builder:
  """Builds sections, collecting 'config.path: problem' lines."""

  def __init__(self, config, training: bool):
    self.config = config
    self.training = training
    self.problems: list[str] = []

  def add(self, path: str, message: str) -> None:
    self.problems.append(f"config.{path}: {message}" if path else f"config: {message}")

  def node(self, name: str):
    return self.config[name] if name in self.config else None

  def unknown_top_keys(self) -> None:
    if not self.training:  # a saved config may hold keys since removed
      return
    known = {f.name for cls in config_schema.TOP_SECTIONS for f in dataclasses.fields(cls)}
    known |= {*config_schema.SECTIONS, "model", "loss", *config_schema.SAVED_KEYS}
    for key in self.config:
      if key not in known:
        self.add(key, "unknown key (not in configs/base.py; a typo?)")

  def section(self, cls, node, path: str, whole: str | None = None):
    """`cls` built from `node` (None, with the problems added, when it cannot be).

    A problem of the section as a whole is reported at `path`, or at `whole` with the class
    name ('config.model: HeadsConfig: ...') when given.
    """
    prefix = f"{path}." if path else ""
    if node is None and path:
      if self.training:
        self.add(path, "missing (every key of configs/base.py is required)")
        return None
      node = {}  # an older saved config: the defaults
    if not isinstance(node, Mapping | ml_collections.ConfigDict):
      self.add(path, f"expected a ConfigDict, got {fields.type_name(node)} {node!r}")
      return None
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: _plain(node[k]) for k in names if k in node}
    if self.training:
      for key in sorted(names - set(kwargs)):
        self.add(prefix + key, "missing (every key of configs/base.py is required)")
      if path:
        for key in node:
          if key not in names:
            self.add(prefix + key, "unknown key (not in configs/base.py; a typo?)")
      if names - set(kwargs):
        return None
    try:
      built = cls(**kwargs)
    except ConfigError as e:
      for field, message in e.items:
        if field:
          self.add(prefix + field, message)
        else:
          self.add(whole or path, f"{cls.__name__}: {message}" if whole else message)
      return None
    except (TypeError, ValueError) as e:
      self.add(path, f"{cls.__name__} refuses it: {type(e).__name__}: {e}")
      return None
    if cls is losses.LossConfig:  # a dataclass without checks of its own
      p = fields.Problems(built)
      p.types()
      for field, message in p.items:
        self.add(prefix + field, message)
    return built

  def model(self) -> hade.HadeConfig | None:
    """The model sections, each checked alone, then `HadeConfig` (levels within the towers)."""
    node = self.node("model")
    if node is None or not isinstance(node, Mapping | ml_collections.ConfigDict):
      return self.section(hade.HadeConfig, node, "model")  # reports missing / not a mapping
    if self.training:
      for key in node:
        if key not in _MODEL_SECTIONS:
          self.add(f"model.{key}", "unknown key (not in configs/base.py; a typo?)")
    parts, before = {}, len(self.problems)
    for name, cls in _MODEL_SECTIONS.items():
      sub = node[name] if name in node else None
      if sub is None and not self.training:
        parts[name] = cls()  # an older saved config: the model dataclasses' defaults
        continue
      if name == "mel" and isinstance(sub, Mapping | ml_collections.ConfigDict):
        # Keys removed in #12 that saved configs still hold: dropped, not problems.
        sub = {k: v for k, v in _plain(sub).items() if k not in frontend.RETIRED_KEYS}
      parts[name] = self.section(cls, sub, f"model.{name}", whole="model")
    if len(self.problems) > before:
      return None
    try:
      return hade.HadeConfig(**parts)
    except (TypeError, ValueError) as e:
      self.add("model", f"the model dataclasses refuse it: {type(e).__name__}: {e}")
      return None

  def cross_checks(self, data: config_schema.DataConfig | None,
                   model: hade.HadeConfig | None) -> None:
    if data is None or model is None:
      return
    if data.sample_rate is not None and model.mel.sample_rate != data.sample_rate:
      self.add("model.mel.sample_rate", f"{model.mel.sample_rate} Hz, but "
               f"config.data.builder_config={data.builder_config!r} stores audio at "
               f"{data.sample_rate} Hz; the front end must run at the rate of the prepared data")
    if data.max_text_len > model.text.max_length:
      self.add("data.max_text_len", f"{data.max_text_len} tokens exceed the text tower's "
               f"{model.text.max_length} positions")
    if self.training:
      for name in ("train_split", "eval_split"):
        if getattr(data, name) == "":
          self.add(f"data.{name}", "is empty; the trainer reads this split (and validates on "
                   "eval_split at the last step)")

  def device_checks(self, mesh: config_schema.MeshConfig | None, model: hade.HadeConfig | None,
                    data: config_schema.DataConfig | None, num_devices: int,
                    num_processes: int) -> None:
    # Read from the config itself: a section that failed for another field (keep_checkpoints,
    # best_metric, a sharding rule) must not hide a batch or mesh that does not fit.
    shape = None
    if not any(p.startswith("config.mesh:") for p in self.problems):
      try:
        shape = sharding.mesh_shape(_plain(self.config.get("mesh")), num_devices)
      except ValueError as e:
        self.add("mesh", str(e))
    if mesh is not None and shape is not None:
      for i, (_, spec) in enumerate(mesh.sharding_rules):
        if fields.is_seq(spec) and (unknown := [a for a in spec if a and a not in shape]):
          self.add(f"sharding_rules[{i}]", f"spec {spec!r} names axes {unknown} that the mesh "
                   f"{shape} does not have")
    batch = self.config.get("batch_size")
    if not fields.is_int(batch) or batch <= 0:
      return  # reported by TrainConfig
    batch_devices = 1
    if shape is not None:
      batch_devices = math.prod(shape[a] for a in sharding.BATCH_AXES if a in shape)
      if batch % batch_devices:
        self.add("batch_size", f"{batch} does not divide over the {batch_devices} devices of "
                 f"the mesh's data x fsdp axes {shape} ({num_devices} devices)")
    if batch % num_processes:
      self.add("batch_size", f"{batch} does not divide over {num_processes} processes")
    if model is not None and data is not None:
      per_device = -(-batch // batch_devices) * activation_bytes(model, data.max_text_len)
      if per_device > MAX_ACTIVATION_BYTES:
        self.add("batch_size", f"{batch} clips: about {fields.human_bytes(per_device)} of "
                 f"activations per device (estimate) exceed the "
                 f"{fields.human_bytes(MAX_ACTIVATION_BYTES)} cap; lower config.batch_size")


def activation_bytes(model: hade.HadeConfig, max_text_len: int) -> int:
  """A rough upper estimate of the float32 activations one training example keeps.

  Each Swin block keeps about 16 arrays of its token map (tokens x width) for the backward
  pass, each BERT block about 16 of [max_text_len, hidden_size]; attention maps are included
  in that margin at these window and text lengths.
  """
  audio = model.audio
  grid_h, grid_w = audio.grid_size
  tokens = 0
  for i, depth in enumerate(audio.depths):
    tokens += depth * (grid_h // 2**i) * (grid_w // 2**i) * audio.stage_widths[i]
  words = model.text.num_hidden_layers * max_text_len * model.text.hidden_size
  return 16 * fields.BYTES_PER_PARAM * (tokens + words)
