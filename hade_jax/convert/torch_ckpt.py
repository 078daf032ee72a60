"""Reads original (non-HF) checkpoint files: pickled `.pt` / `.pth` / `.ckpt` / `.bin`, or
`.safetensors`, as numpy arrays.

Pickles are read with `torch.load(path, map_location='cpu', weights_only=True)` only: that
loader rebuilds tensors and plain containers and refuses anything else, so a file whose
pickle holds code objects (an argparse Namespace, a config module, a custom class) is refused
with a message, never unpickled unsafely. torch is needed for pickles alone (imported lazily);
`.safetensors` files are read with numpy.

The training scripts these files come from wrap the weights: LAION-CLAP saves
`{'epoch', 'name', 'state_dict', 'optimizer'}` with DistributedDataParallel's `module.` on
every key, the original HTS-AT a Lightning `{'state_dict': {'sed_model.*': ...}, ...}`, WavCaps
`{'model', 'optimizer', 'config', 'epoch'}`. `read` unwraps all three.
"""

from __future__ import annotations

import dataclasses
import pathlib
import pickle
from collections.abc import Mapping
from typing import Any

import numpy as np

from hade_jax.convert import common

# Top-level entries that hold the weights, most common first.
WRAPPERS = ("state_dict", "model", "module")
# Top-level entries not worth keeping in `Checkpoint.meta` (large, training-only).
_DROPPED = ("optimizer", "optimizer_states", "lr_schedulers", "scaler", "callbacks")
TORCH_PIN = "torch==2.13.0"
_SAFE_CONVERSION = (
    "If you trust the file, convert it once where it can be unpickled:\n"
    "  python -c \"import torch, safetensors.torch as st; c = torch.load('IN', "
    "map_location='cpu', weights_only=False); c = c.get('state_dict', c.get('model', c)); "
    "st.save_file({k: v.contiguous() for k, v in c.items() if torch.is_tensor(v)}, "
    "'OUT.safetensors')\"\n"
    "and import OUT.safetensors instead (the key names stay the same).")


@dataclasses.dataclass
class Checkpoint:
  """The weights of one checkpoint file and the small entries saved next to them."""

  path: pathlib.Path
  tensors: dict[str, np.ndarray]  # key -> array, wrapper and `module.` prefix removed.
  meta: dict[str, Any]  # other top-level entries (epoch, WavCaps' config, ...), optimizer dropped.


def _torch():
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"reading PyTorch pickles (.pt/.pth/.ckpt/.bin) needs torch: "
                      f"pip install {TORCH_PIN} (or convert the file to .safetensors)") from e
  return torch


def _to_numpy(value, torch) -> np.ndarray:
  value = value.detach().cpu()
  if value.dtype == torch.bfloat16:  # numpy has no bfloat16
    value = value.float()
  return value.numpy()


def _torch_load(path: pathlib.Path) -> Any:
  torch = _torch()
  try:
    return torch.load(str(path), map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    # torch reports the first global it refused ("Unsupported global: GLOBAL argparse...").
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise common.ConversionError(
        f"{path} cannot be read with torch.load(weights_only=True): it pickles objects other "
        f"than tensors and plain containers ({first}). hade_jax does not unpickle such files "
        f"(that could run code from the file).\n{_SAFE_CONVERSION}") from None
  except (RuntimeError, EOFError, OSError) as e:
    raise common.ConversionError(f"{path} is not a readable PyTorch checkpoint: {e}") from None


def _unwrap(obj: Any, path: pathlib.Path) -> tuple[Mapping[str, Any], dict[str, Any]]:
  """(the weights mapping, the other top-level entries)."""
  if not isinstance(obj, Mapping):
    raise common.ConversionError(f"{path} holds a {type(obj).__name__}, not a state dict")
  for key in WRAPPERS:
    inner = obj.get(key)
    if isinstance(inner, Mapping) and inner:
      meta = {k: v for k, v in obj.items() if k != key and k not in _DROPPED}
      return inner, meta
  return obj, {}


def _strip_module(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  # DistributedDataParallel saves `module.<key>`; LAION-CLAP's files keep it.
  if tensors and all(k.startswith("module.") for k in tensors):
    return {k[len("module."):]: v for k, v in tensors.items()}
  return tensors


def read(path: str | pathlib.Path) -> Checkpoint:
  """Reads a checkpoint file's tensors as numpy arrays (safely; see the module docstring).

  Args:
    path: a `.safetensors` file, or a torch pickle (`.pt`, `.pth`, `.ckpt`, `.bin`).

  Returns:
    A Checkpoint. Non-tensor entries inside the state dict are dropped.

  Raises:
    FileNotFoundError: no such file.
    ImportError: a pickle and torch is not installed.
    common.ConversionError: a pickle that `weights_only=True` refuses, or no tensors.
  """
  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise FileNotFoundError(f"checkpoint file {path} does not exist")
  if path.suffix == ".safetensors":
    from safetensors.numpy import load_file

    return Checkpoint(path, _strip_module(dict(load_file(str(path)))), {})
  torch = _torch()
  weights, meta = _unwrap(_torch_load(path), path)
  tensors = {str(k): _to_numpy(v, torch) for k, v in weights.items() if torch.is_tensor(v)}
  if not tensors:
    raise common.ConversionError(f"{path} holds no tensors (top-level keys: "
                                 f"{', '.join(map(str, list(weights)[:10]))})")
  return Checkpoint(path, _strip_module(tensors), meta)


Source = str | pathlib.Path | Mapping[str, np.ndarray] | Checkpoint


def tensors_of(source: Source) -> tuple[Mapping[str, np.ndarray], str]:
  """(tensors, a name for messages) of a file path, a Checkpoint or a state dict."""
  if isinstance(source, Checkpoint):
    return source.tensors, str(source.path)
  if isinstance(source, Mapping):
    return source, "state dict"
  return read(source).tensors, str(source)
