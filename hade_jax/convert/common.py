"""Checkpoint import machinery shared by every importer.

hade_jax parameter paths mirror the HF checkpoint names (`encoder/layer/3/attention/self/query/
kernel` <-> `encoder.layer.3.attention.self.query.weight`), so an importer is a rename table:
a function from a hade_jax path to a source key. Everything here checks shapes strictly and
reports missing and unused keys; nothing needs torch unless the folder only has a `.bin` file.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from collections.abc import Callable, Iterable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from hade_jax import paths

Path = tuple[str | int, ...]

# Flax leaf name -> PyTorch leaf name.
_LEAF_RENAMES = {
    "kernel": "weight",
    "scale": "weight",
    "embedding": "weight",
    "mean": "running_mean",
    "var": "running_var",
}


class ConversionError(ValueError):
  """A checkpoint does not fit the model it is imported into."""


@dataclasses.dataclass
class ImportReport:
  """What an import did: loaded, missing (model side) and unused (checkpoint side) keys."""

  source: str
  loaded: list[str] = dataclasses.field(default_factory=list)
  missing: list[str] = dataclasses.field(default_factory=list)
  unused: list[str] = dataclasses.field(default_factory=list)
  # Source keys with no model counterpart by design (buffers such as relative_position_index,
  # num_batches_tracked): not consumed, and not a sign of a mismatch.
  expected_unused: list[str] = dataclasses.field(default_factory=list)

  def __str__(self) -> str:
    lines = [f"imported {len(self.loaded)} tensors from {self.source}"]
    for title, keys in (("missing (left as initialised)", self.missing), ("unused", self.unused),
                        ("unused as expected", self.expected_unused)):
      if keys:
        more = " ..." if len(keys) > 20 else ""
        lines.append(f"{len(keys)} {title}: " + ", ".join(keys[:20]) + more)
    return "\n".join(lines)


def load_hf_folder(folder: str | pathlib.Path) -> tuple[dict, dict[str, np.ndarray]]:
  """Reads `config.json` and the weights of a local HF checkpoint folder.

  Prefers `model.safetensors` (or a sharded `model.safetensors.index.json`), read with numpy
  only; falls back to `pytorch_model.bin`, which needs torch.
  """
  folder = pathlib.Path(folder).expanduser()
  if not folder.is_dir():
    raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
  config_path = folder / "config.json"
  if not config_path.is_file():
    raise FileNotFoundError(f"{folder} has no config.json (expected an HF checkpoint folder)")
  return read_config_json(config_path), load_state_dict(folder)


def read_config_json(path: pathlib.Path) -> dict:
  """An HF `config.json` as a dict, or a ConversionError naming the file.

  Its values are checked (types, ranges, parameter bytes) by the config dataclasses that
  `from_hf` builds, before any weight is allocated.
  """
  try:
    config = json.loads(path.read_text(encoding="utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ConversionError(f"{path} is not valid JSON: {e}") from None
  if not isinstance(config, dict):
    raise ConversionError(f"{path} holds a JSON {type(config).__name__}, not an object of "
                          "config fields")
  return config


def load_state_dict(folder: str | pathlib.Path) -> dict[str, np.ndarray]:
  """Loads all tensors of a checkpoint folder (or a single weights file) as numpy arrays."""
  folder = pathlib.Path(folder).expanduser()
  if folder.is_file():
    files = [folder]
  elif (folder / "model.safetensors").is_file():
    files = [folder / "model.safetensors"]
  elif (folder / "model.safetensors.index.json").is_file():
    index = json.loads((folder / "model.safetensors.index.json").read_text(encoding="utf-8"))
    # Names stay inside the folder; symlinks may leave it, as the Hugging Face cache links
    # snapshots/<rev>/*.safetensors to ../../blobs/.
    files = [paths.resolve_inside(folder, name, allow_symlinks_outside=True,
                                  what=f"{folder / 'model.safetensors.index.json'} weight_map")
             for name in sorted(set(index["weight_map"].values()))]
  elif (folder / "pytorch_model.bin").is_file():
    files = [folder / "pytorch_model.bin"]
  else:
    raise FileNotFoundError(
        f"{folder} holds no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
  state: dict[str, np.ndarray] = {}
  for path in files:
    if path.suffix == ".safetensors":
      from safetensors.numpy import load_file

      state.update(load_file(str(path)))
    else:
      state.update(_load_torch_bin(path))
  return state


def _load_torch_bin(path: pathlib.Path) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError as e:
    raise ImportError(
        f"{path} is a PyTorch pickle; reading it needs torch (pip install torch==2.13.0), "
        "or convert it to model.safetensors") from e
  raw = torch.load(str(path), map_location="cpu", weights_only=True)
  if "state_dict" in raw and isinstance(raw["state_dict"], Mapping):
    raw = raw["state_dict"]
  return {k: (v.detach().float() if v.is_floating_point() else v).numpy() for k, v in raw.items()}


def default_hf_name(path: Path) -> str:
  """`('encoder', 'layer', 0, ..., 'query', 'kernel')` -> `encoder.layer.0....query.weight`."""
  *prefix, leaf = (str(p) for p in path)
  return ".".join([*prefix, _LEAF_RENAMES.get(leaf, leaf)])


def to_flax_layout(leaf: str, value: np.ndarray) -> np.ndarray:
  """PyTorch tensor layout -> Flax layout, by leaf name and rank."""
  if leaf == "kernel":
    if value.ndim == 2:  # Linear: [out, in] -> [in, out]
      return value.T
    if value.ndim == 3:  # Conv1d: [out, in, w] -> [w, in, out]
      return value.transpose(2, 1, 0)
    if value.ndim == 4:  # Conv2d: [out, in, h, w] -> [h, w, in, out]
      return value.transpose(2, 3, 1, 0)
  return value


def import_params(
    module: nnx.Module,
    state_dict: Mapping[str, np.ndarray],
    *,
    name_fn: Callable[[Path], str | None] = default_hf_name,
    source: str = "checkpoint",
    allow_missing: Iterable[str] = (),
    strict: bool = True,
    consumed_prefixes: Iterable[str] = (),
    expected_unused: Iterable[str] = (),
) -> ImportReport:
  """Copies tensors from `state_dict` into `module` in place.

  Args:
    module: the hade_jax module (or sub-module) to fill.
    state_dict: source key -> array (PyTorch layout).
    name_fn: hade_jax path -> source key, or None for a variable that has no source.
    source: a name for messages.
    allow_missing: regexes over '/'-joined hade_jax paths that may lack a source tensor.
    strict: raise when a variable is missing (and not allowed to be).
    consumed_prefixes: only source keys under these prefixes count as "unused" when not
      consumed (a ClapModel checkpoint imported tower by tower); empty = all keys.
    expected_unused: regexes over source keys that have no model counterpart by design
      (buffers); unconsumed ones go to `report.expected_unused` instead of `report.unused`.

  Returns:
    An ImportReport. Shape mismatches always raise ConversionError naming both sides.
  """
  allow = [re.compile(p) for p in allow_missing]
  state = nnx.state(module)
  flat = nnx.to_flat_state(state)
  report = ImportReport(source=source)
  used: set[str] = set()
  errors: list[str] = []
  updates = []
  for path, var in flat:
    joined = "/".join(str(p) for p in path)
    key = name_fn(path)
    if key is None or key not in state_dict:
      if key is None or any(a.search(joined) for a in allow):
        continue
      report.missing.append(f"{joined} (expected {key})")
      continue
    value = to_flax_layout(str(path[-1]), np.asarray(state_dict[key]))
    target = var.get_value()
    if tuple(value.shape) != tuple(target.shape):
      errors.append(f"{key} {tuple(state_dict[key].shape)} -> {joined}: got {tuple(value.shape)}, "
                    f"model expects {tuple(target.shape)}")
      continue
    # An explicit copy: jnp.asarray can alias the source buffer (e.g. a torch tensor's
    # .numpy() view), which the source may later mutate in place.
    updates.append((path, var, jnp.array(value, dtype=target.dtype, copy=True)))
    used.add(key)
    report.loaded.append(key)
  if errors:
    raise ConversionError(f"shape mismatch importing {source}:\n  " + "\n  ".join(errors))
  if report.missing and strict:
    raise ConversionError(f"{source} lacks {len(report.missing)} tensors the model needs:\n  "
                          + "\n  ".join(report.missing[:50]))
  for _, var, value in updates:
    var.set_value(value)
  nnx.update(module, nnx.from_flat_state(flat))
  prefixes = tuple(consumed_prefixes)
  expected = [re.compile(p) for p in expected_unused]
  for k in sorted(state_dict):
    if k in used or (prefixes and not k.startswith(prefixes)):
      continue
    (report.expected_unused if any(e.search(k) for e in expected) else report.unused).append(k)
  return report


# ---------------------------------------------------------------------------------------------
# The reverse direction: hade_jax modules -> HF names and PyTorch layouts (exports).


def to_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
  """Flax layout -> PyTorch tensor layout: the inverse of `to_flax_layout`."""
  if leaf == "kernel":
    if value.ndim == 2:  # Linear: [in, out] -> [out, in]
      return value.T
    if value.ndim == 3:  # Conv1d: [w, in, out] -> [out, in, w]
      return value.transpose(2, 1, 0)
    if value.ndim == 4:  # Conv2d: [h, w, in, out] -> [out, in, h, w]
      return value.transpose(3, 2, 0, 1)
  return value


def export_params(module: nnx.Module, prefix: str,
                  name_fn: Callable[[Path], str] = default_hf_name) -> dict[str, np.ndarray]:
  """Every variable of `module` as {prefix + HF key: float32 array in PyTorch layout}: the
  inverse of `import_params` with the same rename table."""
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(module)):
    value = np.asarray(var.get_value(), dtype=np.float32)
    out[prefix + name_fn(path)] = np.ascontiguousarray(to_torch_layout(str(path[-1]), value))
  return out
