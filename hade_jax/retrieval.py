"""Corpus encoding and memory-bounded all-pairs scoring with HADE's pairwise score.

S(a, t) reads both sides (CA sees an audio factor and a text factor together), so retrieval is
not one matrix product: each modality is encoded ONCE into cached features, then S is evaluated
over tiles of (audio, text) pairs whose size bounds the memory of the [A, T, M, N] token
interactions. Tiles are jit-compiled once per tile shape (the last tile is padded).

Legend: A: audios, T: texts, S: samples, M: words.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hade_jax import hade
from hade_jax import heads as hade_heads


def _pad_rows(x: np.ndarray, n: int) -> np.ndarray:
  if x.shape[0] == n:
    return x
  pad = np.zeros((n - x.shape[0],) + x.shape[1:], x.dtype)
  return np.concatenate([x, pad])


def _concat(features: list) -> object:
  return jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs]), *features)


def _take(features, start: int, stop: int, size: int):
  """Rows [start, stop) of a features pytree, padded to `size` rows."""
  return jax.tree.map(lambda x: _pad_rows(np.asarray(x[start:stop]), size), features)


class Encoder:
  """Jitted per-modality encoders over a (graphdef, state) model, compiled once per shape."""

  def __init__(self, model: hade.HadeModel):
    self.graphdef, self.state = nnx.split(model)

    @jax.jit
    def audio_fn(state, wave_AxS):
      return nnx.merge(self.graphdef, state).encode_audio(wave_AxS)

    @jax.jit
    def text_fn(state, ids_TxM, mask_TxM):
      return nnx.merge(self.graphdef, state).encode_text(ids_TxM, mask_TxM)

    @jax.jit
    def score_fn(state, a, t):
      return nnx.merge(self.graphdef, state).score(a, t)["total"]

    self._audio, self._text, self._score = audio_fn, text_fn, score_fn

  def audio(self, waves: Iterable[np.ndarray], batch_size: int) -> hade_heads.AudioFeatures:
    """Encodes waveforms [S] (all one length) in fixed-size batches (the last is padded)."""
    return self._batched(list(waves), batch_size, lambda w: self._audio(self.state, w))

  def audio_batches(self, batches: Iterable[dict], clip_ids_A: np.ndarray
                    ) -> hade_heads.AudioFeatures:
    """Encodes evaluation batches {audio [B, S], clip_id [B], valid [B]} (fixed B).

    Returns features in the order of `clip_ids_A`; every clip must appear exactly once
    (one crop per clip: 'head' or 'center').
    """
    position = {int(c): i for i, c in enumerate(clip_ids_A)}
    feats, order = [], []
    batch_size = None
    for batch in batches:
      audio = np.asarray(batch["audio"], np.float32)
      batch_size = batch_size or len(audio)
      ids = np.asarray(batch["clip_id"])
      keep = np.flatnonzero(np.asarray(batch["valid"]).astype(bool)
                            & np.isin(ids, np.asarray(clip_ids_A)))
      if not len(keep):
        continue
      out = self._audio(self.state, _pad_rows(audio, batch_size))
      feats.append(jax.tree.map(lambda x, keep=keep: np.asarray(x)[keep], out))
      order += [position[int(c)] for c in ids[keep]]
    if sorted(order) != list(range(len(clip_ids_A))):
      raise ValueError(f"evaluation batches held {len(order)} clip rows for {len(clip_ids_A)} "
                       "clips; each clip must appear exactly once (eval_crop 'head' or 'center')")
    inverse = np.argsort(np.asarray(order))
    return jax.tree.map(lambda x: x[inverse], _concat(feats))

  def text(self, ids_TxM: np.ndarray, mask_TxM: np.ndarray, batch_size: int
           ) -> hade_heads.TextFeatures:
    out = []
    for start in range(0, len(ids_TxM), batch_size):
      stop = min(start + batch_size, len(ids_TxM))
      ids = _pad_rows(ids_TxM[start:stop], batch_size)
      mask = _pad_rows(mask_TxM[start:stop], batch_size)
      mask[stop - start:, 0] = 1  # padded rows: one valid token, discarded below
      feats = self._text(self.state, ids, mask)
      out.append(jax.tree.map(lambda x, n=stop - start: np.asarray(x[:n]), feats))
    return _concat(out)

  def _batched(self, items: list[np.ndarray], batch_size: int, fn: Callable):
    out = []
    for start in range(0, len(items), batch_size):
      chunk = np.stack(items[start:start + batch_size]).astype(np.float32)
      n = len(chunk)
      feats = fn(_pad_rows(chunk, batch_size))
      out.append(jax.tree.map(lambda x, n=n: np.asarray(x[:n]), feats))
    return _concat(out)

  def score(self, audio: hade_heads.AudioFeatures, text: hade_heads.TextFeatures, *,
            tile: int = 256) -> np.ndarray:
    return score_tiled(lambda a, t: self._score(self.state, a, t), audio, text, tile=tile)


def score_tiled(score_fn: Callable, audio, text, *, tile_audio: int | None = None,
                tile_text: int | None = None, tile: int = 256) -> np.ndarray:
  """[A, T] scores computed tile by tile; `score_fn(a_tile, t_tile) -> [tA, tT]`.

  Every tile has the same shape (the last ones are padded and cropped), so a jitted
  `score_fn` compiles once.
  """
  num_a = jax.tree.leaves(audio)[0].shape[0]
  num_t = jax.tree.leaves(text)[0].shape[0]
  ta = min(tile_audio or tile, num_a)
  tt = min(tile_text or tile, num_t)
  out = np.zeros((num_a, num_t), np.float32)
  for a0 in range(0, num_a, ta):
    a_tile = _take(audio, a0, min(a0 + ta, num_a), ta)
    for t0 in range(0, num_t, tt):
      t_tile = _take(text, t0, min(t0 + tt, num_t), tt)
      s = np.asarray(score_fn(a_tile, t_tile))
      out[a0:a0 + ta, t0:t0 + tt] = s[: min(ta, num_a - a0), : min(tt, num_t - t0)]
  return out


def score_untiled(model: hade.HadeModel, audio, text) -> np.ndarray:
  return np.asarray(model.score(jax.tree.map(jnp.asarray, audio),
                                jax.tree.map(jnp.asarray, text))["total"])
