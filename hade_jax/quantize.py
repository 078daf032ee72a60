"""Re-ranking features stored compactly (bfloat16 or int8) and restored to float32 when read.

Two-stage search reads the full features (global embedding, per-level tokens and token logits,
DCR factors) of the shortlisted clips only, but every clip's must be stored: about 117 KB per
clip in float32 at the demo widths, mostly THA's 112 tokens x 256. `QuantizedIndex` keeps
them as

- 'bfloat16': every float array rounded to bfloat16 (half the bytes; 8 mantissa bits, so a
  relative error of at most 2^-9 per value);
- 'int8': the vectors (global embedding, each level token, each DCR factor) as int8 with one
  float32 scale per vector (symmetric, max |x| -> 127), the token logits as bfloat16 (they
  feed a softmax, where an error per clip-wide scale would shift every weight); a quarter of
  the bytes plus the scales.

Masks stay bool. The scores are computed in float32 from the restored values, so the only
change is the rounding (benchmarks/ann_search.py measures its effect on the full scores).

Legend: N: corpus clips, D: width.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import jax
import ml_dtypes
import numpy as np

from hade_jax import heads as hade_heads

DTYPES = ("float32", "bfloat16", "int8")
_VECTORS = ("global_AxD", "levels", "factors_AxKxd")  # int8 per vector; the rest as bfloat16
_LEVELS = ("levels", "level_masks", "level_logits")  # fields holding one array per THA level


class Int8Vectors(NamedTuple):
  """Vectors along the last axis as int8 codes times one float32 scale per vector."""

  q: np.ndarray
  scale: np.ndarray


def _encode_leaf(x: np.ndarray, dtype: str, vector: bool):
  x = np.asarray(x)
  if x.dtype == bool or dtype == "float32":
    return x
  if dtype == "bfloat16" or not vector:
    return x.astype(ml_dtypes.bfloat16)
  scale = np.abs(x).max(axis=-1, keepdims=True).astype(np.float32) / 127
  return Int8Vectors(np.rint(x / np.where(scale > 0, scale, 1)).astype(np.int8), scale)


def _decode_leaf(x, rows: np.ndarray | None):
  if x is None:
    return None
  if isinstance(x, Int8Vectors):
    q, scale = (x.q, x.scale) if rows is None else (x.q[rows], x.scale[rows])
    return q.astype(np.float32) * scale
  x = x if rows is None else x[rows]
  return x if x.dtype == bool else x.astype(np.float32)


def encode(features: hade_heads.AudioFeatures, dtype: str) -> dict:
  """{field: stored leaves} of `features` in `dtype` (one of DTYPES)."""
  if dtype not in DTYPES:
    raise ValueError(f"feature dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
  out = {}
  for field in (f.name for f in dataclasses.fields(hade_heads.AudioFeatures)):
    value, vector = getattr(features, field), field in _VECTORS
    if field in _LEVELS:
      out[field] = tuple(_encode_leaf(x, dtype, vector) for x in value)
    else:
      out[field] = None if value is None else _encode_leaf(value, dtype, vector)
  return out


def decode(stored: dict, rows: np.ndarray | None = None) -> hade_heads.AudioFeatures:
  """float32 features (of `rows` only, when given) from `encode`'s output."""
  return hade_heads.AudioFeatures(**{
      field: tuple(_decode_leaf(x, rows) for x in value) if field in _LEVELS
      else _decode_leaf(value, rows) for field, value in stored.items()})


def nbytes(stored: dict) -> int:
  """Bytes of `encode`'s output."""
  return sum(x.nbytes for x in jax.tree.leaves(stored))


class QuantizedIndex:
  """A `retrieval.ClipIndex` of features held in memory as bfloat16 or int8, read as float32."""

  def __init__(self, features: hade_heads.AudioFeatures, dtype: str,
               names: Sequence[str] | None = None):
    self.dtype = dtype
    self.stored = encode(jax.tree.map(np.asarray, features), dtype)
    self._n = len(np.asarray(features.global_AxD))
    self.names = list(names) if names is not None else [str(i) for i in range(self._n)]

  def __len__(self) -> int:
    return self._n

  @property
  def global_NxD(self) -> np.ndarray:
    return _decode_leaf(self.stored["global_AxD"], None)

  def take(self, rows: np.ndarray) -> hade_heads.AudioFeatures:
    return decode(self.stored, np.asarray(rows))

  def bytes_per_clip(self) -> float:
    return nbytes(self.stored) / max(self._n, 1)
