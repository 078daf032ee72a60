"""A portable model folder: a trained HADE without its training run (no orbax, TFDS or Grain).

  DIR/config.json        what inference needs (see `inference_config`) + the files' sha256
  DIR/model.safetensors  every parameter and batch-norm statistic, float32, flat names
                         ('audio_encoder.batch_norm.mean', 'heads.logit_scale', ...)
  DIR/<tokenizer files>  the text tower's tokenizer (`tokenizer.FILES` that the run had)

`save` writes one from a model in memory; `load` reads one back into a model replicated on a
mesh. config.json is written last and records the sha256 of every other file: a damaged or
changed file is refused with `CorruptCheckpointError` naming it (the policy of training
checkpoints, `checkpoints.integrity`), and a folder interrupted while being written has no
config.json yet, so it is not taken for a model folder.

Legend: none (no tensor code).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hade_jax import config_schema, hade, tokenizer, validation
from hade_jax.checkpoints import integrity

log = logging.getLogger("hade_jax.model_folder")

FORMAT = "hade_jax model folder"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
KIND = "model folder"  # what `api.Hade.kind` says of a model loaded from one
# config.data keys that stay behind: the training machine's paths and the training pipeline's
# knobs. Everything else (crop, padding, text length, the stored rate, and any evaluation
# field added later) travels with the model.
DATA_KEYS_LEFT_OUT = (
    "data_dir", "manual_dir", "tokenizer_dir", "train_split", "eval_split", "test_split",
    "num_workers", "spec_augment", "spec_time_stripes", "spec_time_width", "spec_freq_stripes",
    "spec_freq_width", "num_threads", "prepare_if_missing", "synth_size")


class FolderError(ValueError):
  """A folder is not a model folder this hade_jax can read (the message names the file)."""


def is_model_folder(path: str | os.PathLike) -> bool:
  """Whether `path` is a folder with a hade_jax config.json (not a training workdir)."""
  config_path = pathlib.Path(path).expanduser() / CONFIG_FILE
  if not config_path.is_file():
    return False
  try:
    return json.loads(config_path.read_text(encoding="utf-8")).get("format") == FORMAT
  except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
    return False


# ---------------------------------------------------------------------------------------------
# Writing.


def inference_config(config: Mapping[str, Any]) -> dict:
  """The part of a training config that inference reads: model, run settings, config.data
  without `DATA_KEYS_LEFT_OUT`."""
  full = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  out = {"model": full["model"]}
  for f in dataclasses.fields(config_schema.RunConfig):
    if f.name in full:
      out[f.name] = full[f.name]
  out["data"] = {k: v for k, v in dict(full.get("data") or {}).items()
                 if k not in DATA_KEYS_LEFT_OUT}
  return json.loads(json.dumps(out))  # tuples -> lists, as the folder will give them back


def flat_weights(model: hade.HadeModel) -> dict[str, np.ndarray]:
  """{'audio_encoder.batch_norm.mean': array, ...}: every variable of the model, on the host."""
  pure = nnx.to_pure_dict(nnx.state(model))
  return {_name(path): np.asarray(jax.device_get(leaf))
          for path, leaf in jax.tree_util.tree_leaves_with_path(pure)}


def save(model: hade.HadeModel, config: Mapping[str, Any], out_dir: str | os.PathLike, *,
         tokenizer_dir: str | os.PathLike | None = None, source: Mapping[str, Any] | None = None,
         overwrite: bool = False) -> pathlib.Path:
  """Writes `model` as a model folder.

  Args:
    model: the model (weights anywhere; they are gathered to the host).
    config: its config (`inference_config` is saved).
    out_dir: the folder: absent or empty, or (with `overwrite`) a folder whose files of the
      same names are replaced.
    tokenizer_dir: the tokenizer folder to copy (default config.data.tokenizer_dir).
    source: where the weights came from (recorded in config.json, e.g. the step directory).
    overwrite: replace the files of an existing non-empty folder.

  Returns:
    The folder.

  Raises:
    FileExistsError: `out_dir` holds files and `overwrite` is False.
    FileNotFoundError: no tokenizer files in the tokenizer folder.
  """
  from safetensors import numpy as safetensors_numpy  # only writing and reading need it

  out = pathlib.Path(out_dir).expanduser().absolute()
  if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
    raise FileExistsError(f"{out} exists and is not an empty folder: choose a new folder, or "
                          "pass overwrite=True (--overwrite) to replace its model files")
  tok_files = _tokenizer_files(tokenizer_dir if tokenizer_dir is not None
                               else config["data"]["tokenizer_dir"])
  out.mkdir(parents=True, exist_ok=True)
  (out / CONFIG_FILE).unlink(missing_ok=True)  # until the new one: not a model folder
  for f in tok_files:
    shutil.copyfile(f, out / f.name)
  safetensors_numpy.save_file(flat_weights(model), str(out / WEIGHTS_FILE),
                              metadata={"format": FORMAT})
  names = [WEIGHTS_FILE, *(f.name for f in tok_files)]
  record = {"format": FORMAT, "format_version": FORMAT_VERSION,
            "config": inference_config(config),
            "sha256": {name: file_sha256(out / name) for name in names},
            "source": dict(source or {})}
  tmp = out / f".{CONFIG_FILE}.tmp"
  tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
  tmp.replace(out / CONFIG_FILE)
  return out


def _tokenizer_files(tokenizer_dir: str | os.PathLike) -> list[pathlib.Path]:
  if not tokenizer_dir:
    raise FileNotFoundError("config.data.tokenizer_dir is empty: pass the text tower's "
                            "tokenizer folder (tokenizer_dir=... / --tokenizer_dir=...)")
  folder = pathlib.Path(tokenizer_dir).expanduser()
  tokenizer.Tokenizer(folder, 8)  # refuses a folder without usable tokenizer files, naming it
  return [folder / name for name in tokenizer.FILES if (folder / name).is_file()]


# ---------------------------------------------------------------------------------------------
# Reading.


def read_record(folder: str | os.PathLike) -> dict:
  """config.json of a model folder, its format checked, and every file checked against the
  sha256 it records.

  Raises:
    FolderError: config.json is missing, not JSON, or of another format.
    integrity.CorruptCheckpointError: a file is missing or does not match its sha256.
  """
  folder = pathlib.Path(folder).expanduser()
  path = folder / CONFIG_FILE
  try:
    record = json.loads(path.read_text(encoding="utf-8"))
  except FileNotFoundError:
    raise FolderError(f"{folder} has no {CONFIG_FILE}: not a model folder (write one with "
                      "python -m hade_jax.export)") from None
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise FolderError(f"{path} is not valid JSON ({e}): export the model again") from None
  if not isinstance(record, dict) or record.get("format") != FORMAT:
    raise FolderError(f"{path} is not a hade_jax model folder's config (no \"format\": "
                      f"\"{FORMAT}\"); a Hugging Face folder imports with init.clap")
  if record.get("format_version") != FORMAT_VERSION:
    raise FolderError(f"{path} has format_version {record.get('format_version')!r}; this "
                      f"hade_jax reads {FORMAT_VERSION}: upgrade hade_jax or export again")
  sums = record.get("sha256") or {}
  if WEIGHTS_FILE not in sums:
    raise integrity.CorruptCheckpointError(f"{path} records no sha256 of {WEIGHTS_FILE}: the "
                                           "folder is incomplete; export the model again")
  for name, want in sorted(sums.items()):
    f = folder / name
    if not f.is_file():
      raise integrity.CorruptCheckpointError(
          f"{f} is missing (listed in {path}): copy the whole folder again from its source, or "
          "export the model again (python -m hade_jax.export)")
    if file_sha256(f) != want:
      raise integrity.CorruptCheckpointError(
          f"{f} does not match the sha256 recorded in {path}: the file is damaged or was "
          "changed. Copy the folder again from its source, or export the model again "
          "(python -m hade_jax.export)")
  return record


def folder_config(folder: str | os.PathLike, record: Mapping[str, Any]
                  ) -> ml_collections.ConfigDict:
  """The saved inference config completed with the schema's defaults; its tokenizer is the
  folder's own."""
  saved = record["config"]
  run = {f.name: f.default for f in dataclasses.fields(config_schema.RunConfig)}
  data = {f.name: f.default for f in dataclasses.fields(config_schema.DataConfig)}
  config = {**run, **{k: v for k, v in saved.items() if k != "data"},
            "data": {**data, **saved.get("data", {})}}
  folder = pathlib.Path(folder).expanduser().absolute()
  has_tokenizer = any((folder / name).is_file() for name in tokenizer.FILES)
  config["data"]["tokenizer_dir"] = str(folder) if has_tokenizer else ""
  return ml_collections.ConfigDict(config)


def load(folder: str | os.PathLike, config: ml_collections.ConfigDict | None = None, *,
         mesh: Mesh | None = None) -> tuple[hade.HadeModel, ml_collections.ConfigDict]:
  """(model, config) of a model folder; the weights land replicated on `mesh` (default: the
  first device).

  Args:
    folder: the model folder.
    config: another config for the same model (default: the folder's own).
    mesh: where the weights go.

  Raises:
    FolderError: not a model folder, or its weights do not fit its config (names the file).
    integrity.CorruptCheckpointError: a file does not match its recorded sha256.
  """
  from safetensors import numpy as safetensors_numpy

  folder = pathlib.Path(folder).expanduser().absolute()
  record = read_record(folder)
  config = folder_config(folder, record) if config is None else config
  validation.validate_config(config, training=False)
  cfg = hade.model_config(config)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: hade.HadeModel(cfg, rngs=nnx.Rngs(0))))
  weights_path = folder / WEIGHTS_FILE
  tensors = safetensors_numpy.load_file(str(weights_path))
  pure = nnx.to_pure_dict(abstract)
  want = {_name(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(pure)}
  _check_names(weights_path, want, tensors)
  if mesh is None:
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  else:
    sharding = NamedSharding(mesh, PartitionSpec())
  filled = jax.tree_util.tree_map_with_path(
      lambda p, leaf: jax.device_put(tensors[_name(p)].astype(leaf.dtype), sharding), pure)
  nnx.replace_by_pure_dict(abstract, filled)
  return nnx.merge(graphdef, abstract), config


def _check_names(path: pathlib.Path, want: Mapping[str, Any],
                 tensors: Mapping[str, np.ndarray]) -> None:
  def listed(names: list[str]) -> str:
    return ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")

  missing = sorted(want.keys() - tensors.keys())
  unused = sorted(tensors.keys() - want.keys())
  problems = [f"{k}: {tuple(tensors[k].shape)}, the config builds {tuple(want[k].shape)}"
              for k in sorted(want.keys() & tensors.keys())
              if tuple(tensors[k].shape) != tuple(want[k].shape)][:5]
  if missing:
    problems.insert(0, f"missing {listed(missing)}")
  if unused:
    problems.insert(0, f"not in the model: {listed(unused)}")
  if problems:
    raise FolderError(f"{path} does not fit the model its {CONFIG_FILE} describes ("
                      + "; ".join(problems) + "): export the model again")


def _name(path) -> str:
  return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def file_sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      digest.update(block)
  return digest.hexdigest()
