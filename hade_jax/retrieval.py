"""Corpus encoding, memory-bounded all-pairs scoring and two-stage search with HADE's score.

S(a, t) reads both sides (CA sees an audio factor and a text factor together), so retrieval is
not one matrix product: each modality is encoded ONCE into cached features, then S is evaluated
over tiles of (audio, text) pairs whose size bounds the memory of the [A, T, M, N] token
interactions (docs/method.md §6). Tiles are jit-compiled once per tile shape (the last tile is
padded), and their audio rows are split over the devices of a 1-D mesh ('data'): each device
scores its rows against the whole text tile, and the [tA, tT] result comes back replicated so
that every process can read it.

Search over a corpus far larger than an eval split is two-stage: a shortlist by the cosine of
the global embeddings (one matrix product and a top-k), then the full S on the shortlist only.
`Searcher.exhaustive` scores every clip, to measure what the shortlist loses.

Legend: A: audios, T: texts, S: samples or shortlist, M: words, N: corpus clips, Q: queries,
K: results per query, D: joint width.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from hade_jax import hade
from hade_jax import heads as hade_heads

ROWS = "data"  # the mesh axis that tiles' audio rows (and encoder batches) are split over


def device_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over `devices` (default: all of them), axis 'data'."""
  return Mesh(np.asarray(jax.devices() if devices is None else list(devices)), (ROWS,))


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _pad_rows(x: np.ndarray, n: int) -> np.ndarray:
  """`x` grown to `n` rows by repeating its last row.

  Repeating (not zeros) keeps padded rows valid inputs: an all-False token mask would make the
  token-weight softmax NaN, which is harmless once cropped but trips NaN debugging.
  """
  if x.shape[0] == n:
    return x
  return np.concatenate([x, np.repeat(x[-1:], n - x.shape[0], axis=0)])


def _pad_frames(x: np.ndarray, frames: int) -> np.ndarray:
  """[A, N, ...] grown to `frames` on axis 1 with zeros (False for masks: padding is masked)."""
  x = np.asarray(x)
  if x.ndim < 2 or x.shape[1] == frames:
    return x
  widths = [(0, 0), (0, frames - x.shape[1])] + [(0, 0)] * (x.ndim - 2)
  return np.pad(x, widths)


def concat_features(features: list) -> object:
  """Row-wise concatenation of feature pytrees (numpy).

  Windowed clips (`pool_windows`) hold more frames per level than one crop: level arrays of
  different frame counts are padded to the longest, the padding masked.
  """
  def cat(*xs):
    xs = [np.asarray(x) for x in xs]
    frames = max(x.shape[1] for x in xs) if xs[0].ndim >= 2 else None
    return np.concatenate([_pad_frames(x, frames) for x in xs] if frames else xs)

  return jax.tree.map(cat, *features)


def pool_windows(windows: hade_heads.AudioFeatures, counts_A: Sequence[int], level_sim: str
                 ) -> hade_heads.AudioFeatures:
  """The features of A clips from the features of their windows (docs/method.md §9).

  Args:
    windows: features of sum(counts_A) windows: clip 0's windows in time order, then clip 1's...
    counts_A: windows per clip (at least 1 each).
    level_sim: the heads' `level_sim` ('tokens' or 'pooled').

  Global: the mean of the windows' projected embeddings, before normalisation (the cosine
  normalises afterwards), so a window counts by its embedding's length as a clip-level pool
  would. DCR factors are the pooled global's: the factor split (and the optional DCR linear
  map) is affine, so the mean of the windows' factors IS the factors of the mean. THA
  'tokens' levels: every window's frames, concatenated in time order with their masks and
  token logits (clips with fewer windows are padded, masked); 'pooled' levels: the
  normalised mean of the windows' unit vectors. One window per clip returns its features.
  """
  counts_A = [int(c) for c in counts_A]
  if min(counts_A, default=1) < 1 or sum(counts_A) != num_rows(windows):
    raise ValueError(f"pool_windows: {num_rows(windows)} window rows for counts {counts_A}")
  w = jax.tree.map(np.asarray, windows)
  if all(c == 1 for c in counts_A):
    return w
  bounds = np.cumsum([0] + counts_A)
  clips = [slice(bounds[i], bounds[i + 1]) for i in range(len(counts_A))]

  def mean(x):
    return None if x is None else np.stack([x[c].mean(axis=0) for c in clips])

  def frames(x_WxN):  # [W, N, ...] -> [1, W*N, ...] per clip, padded to the longest clip
    return concat_features([x_WxN[c].reshape(1, -1, *x_WxN.shape[2:]) for c in clips])

  if level_sim == "tokens":
    levels, masks, logits = (tuple(frames(x) for x in xs) for xs in
                             (w.levels, w.level_masks, w.level_logits))
  else:  # 'pooled': one unit vector per window and level
    levels = tuple(np.asarray(hade_heads.normalize(mean(x))) for x in w.levels)
    masks = tuple(np.ones(x.shape[:2], bool) for x in levels)
    logits = tuple(np.zeros(x.shape[:2], x.dtype) for x in levels)
  return hade_heads.AudioFeatures(mean(w.global_AxD), levels, masks, logits,
                                  mean(w.factors_AxKxd))


def _take(features, start: int, stop: int, size: int):
  """Rows [start, stop) of a features pytree, padded to `size` rows."""
  return jax.tree.map(lambda x: _pad_rows(np.asarray(x[start:stop]), size), features)


def _put(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A host array (the same on every process) as a global array with `sharding`."""
  x = np.asarray(x)
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  # Several processes: each puts the shards of its own devices.
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def num_rows(features) -> int:
  return jax.tree.leaves(features)[0].shape[0]


# All-pairs scoring orders the captions by length and cuts each text tile's word axis to its
# longest caption rounded up to WORD_BUCKET words: the word-frame products skip padding words.
# Exact, since padding words never count (they have weight 0 and never win a maximum; for
# 'attention' their softmax weight is exactly 0). A multiple of 8 bounds the compiled tile
# shapes to max_text_len / 8 and keeps the products' columns aligned. [choice]
WORD_BUCKET = 8


def text_widths(text: hade_heads.TextFeatures) -> np.ndarray:
  """[T] the last valid word's position + 1 over every level (at least 1)."""
  width_T = np.ones(num_rows(text), np.int64)
  for mask_TxM in text.level_masks:
    mask_TxM = np.asarray(mask_TxM)
    last_T = mask_TxM.shape[1] - np.argmax(mask_TxM[:, ::-1], axis=1)
    width_T = np.maximum(width_T, np.where(mask_TxM.any(axis=1), last_T, 1))
  return width_T


def length_order(text: hade_heads.TextFeatures) -> np.ndarray:
  """[T] the captions' order by `text_widths` (stable): the order all-pairs scoring tiles them."""
  return np.argsort(text_widths(text), kind="stable")


def cut_width(widths_T: np.ndarray) -> int:
  """The word width a text tile of these `text_widths` is cut to."""
  return _round_up(int(np.max(widths_T)), WORD_BUCKET)


def crop_words(text: hade_heads.TextFeatures) -> hade_heads.TextFeatures:
  """`text` with every level's word axis cut to its longest caption, rounded to WORD_BUCKET."""
  width = cut_width(text_widths(text))
  if all(x.shape[1] <= width for x in text.level_masks):
    return text
  cut = lambda levels: tuple(x[:, :width] for x in levels)  # noqa: E731
  return text.replace(levels=cut(text.levels), level_masks=cut(text.level_masks),
                      level_logits=cut(text.level_logits))


class _Structure:
  """A model's graphdef as a static jit argument: equal structures share compiled code."""

  def __init__(self, graphdef: nnx.GraphDef, cfg: hade.HadeConfig):
    self.graphdef, self._hash = graphdef, hash(repr(cfg))

  def __hash__(self) -> int:
    return self._hash

  def __eq__(self, other) -> bool:
    return (isinstance(other, _Structure) and self._hash == other._hash
            and self.graphdef == other.graphdef)


# Pure functions of (structure, output sharding, weights, inputs), compiled by jax.jit once per
# structure, mesh and input shape: every Encoder of the same model (the trainer's evaluator, a
# Hade per loaded checkpoint, evaluation and search) reuses them. Inputs arrive placed (rows
# split over the mesh, weights replicated); outputs are replicated so every process reads them.
@functools.partial(jax.jit, static_argnums=(0, 1))
def _audio_fn(static: _Structure, out: NamedSharding, state, wave_AxS):
  features = nnx.merge(static.graphdef, state).encode_audio(wave_AxS)
  return jax.lax.with_sharding_constraint(features, out)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _text_fn(static: _Structure, out: NamedSharding, state, ids_TxM, mask_TxM):
  features = nnx.merge(static.graphdef, state).encode_text(ids_TxM, mask_TxM)
  return jax.lax.with_sharding_constraint(features, out)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _score_fn(static: _Structure, out: NamedSharding, state, a, t):
  scores_AxT = nnx.merge(static.graphdef, state).score(a, t, blocked=True)["total"]
  return jax.lax.with_sharding_constraint(scores_AxT, out)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _rerank_fn(static: _Structure, out: NamedSharding, state, a_QxS, t_Qx1):
  model = nnx.merge(static.graphdef, state)
  scores_QxS = jax.vmap(lambda a, t: model.score(a, t)["total"][:, 0])(a_QxS, t_Qx1)
  return jax.lax.with_sharding_constraint(scores_QxS, out)


class Encoder:
  """Jitted per-modality encoders and tile scorer over a model, sharded over a 1-D mesh.

  Weights are replicated on the mesh; encoder batches and the audio rows of score tiles are
  split over it (padded to a multiple of its size). The encoder owns its jitted functions:
  they take the weights as an argument, so `load` points it at other weights of the same
  structure (a later training step) and nothing compiles again; each compiles once per shape.
  """

  def __init__(self, model: hade.HadeModel, mesh: Mesh | None = None):
    self.mesh = mesh if mesh is not None else device_mesh()
    self.rows = NamedSharding(self.mesh, P(ROWS))
    self.replicated = NamedSharding(self.mesh, P())
    self.graphdef, state = nnx.split(model)
    self.state = jax.device_put(state, self.replicated)
    self.level_sim = model.cfg.heads.level_sim  # how windows' THA levels pool
    # The jitted functions take the weights as an argument, so new weights of the same
    # structure (`load`, another Encoder of the same model) reuse what compiled.
    static = _Structure(self.graphdef, model.cfg)
    self._audio = functools.partial(_audio_fn, static, self.replicated)
    self._text = functools.partial(_text_fn, static, self.replicated)
    self._score = functools.partial(_score_fn, static, self.replicated)
    self._rerank = functools.partial(_rerank_fn, static, self.replicated)

  def load(self, model: hade.HadeModel) -> None:
    """Encodes and scores with `model`'s weights from now on (same structure, no recompile)."""
    graphdef, state = nnx.split(model)
    if graphdef != self.graphdef:
      raise ValueError("Encoder.load: the model's structure differs from the one this encoder "
                       "was built for; build a new retrieval.Encoder for it")
    self.state = jax.device_put(state, self.replicated)

  @property
  def num_devices(self) -> int:
    return self.mesh.size

  def _encode_rows(self, fn: Callable, *arrays: np.ndarray):
    """fn(state, *arrays) on rows padded to a multiple of the mesh; host features, cropped."""
    n = len(arrays[0])
    size = _round_up(n, self.num_devices)
    out = fn(self.state, *(_put(_pad_rows(np.asarray(x), size), self.rows) for x in arrays))
    return jax.tree.map(lambda x: np.asarray(x)[:n], out)

  def audio(self, waves: Iterable[np.ndarray], batch_size: int) -> hade_heads.AudioFeatures:
    """Encodes waveforms [S] (all one length) in fixed-size batches (the last is padded)."""
    waves = list(waves)
    out = []
    for start in range(0, len(waves), batch_size):
      chunk = np.stack(waves[start:start + batch_size]).astype(np.float32)
      n = len(chunk)
      feats = self._encode_rows(self._audio, _pad_rows(chunk, batch_size))
      out.append(jax.tree.map(lambda x, n=n: x[:n], feats))
    return concat_features(out)

  def audio_windows(self, windows: Sequence[np.ndarray], batch_size: int
                    ) -> hade_heads.AudioFeatures:
    """Encodes clips given as windows [W_i, S] (`policy.fit_windows`), pooled per clip
    (`pool_windows`); the windows of all clips share fixed-size batches."""
    windows = [np.atleast_2d(w) for w in windows]
    rows = self.audio([row for w in windows for row in w], batch_size)
    return pool_windows(rows, [len(w) for w in windows], self.level_sim)

  def audio_batches(self, batches: Iterable[dict], clip_ids_A: np.ndarray
                    ) -> hade_heads.AudioFeatures:
    """Encodes evaluation batches {audio [B, S], clip_id [B], valid [B], optional
    window_index [B]} (fixed B).

    Returns features in the order of `clip_ids_A`. A clip may have several rows (eval_crop
    'windows'), numbered 0..W-1 by window_index: they are pooled (`pool_windows`).
    """
    position = {int(c): i for i, c in enumerate(clip_ids_A)}
    feats, order = [], []
    batch_size = None
    for batch in batches:
      audio = np.asarray(batch["audio"], np.float32)
      batch_size = batch_size or len(audio)
      ids = np.asarray(batch["clip_id"])
      window = np.asarray(batch.get("window_index", np.zeros(len(ids), np.int64)))
      keep = np.flatnonzero(np.asarray(batch["valid"]).astype(bool)
                            & np.isin(ids, np.asarray(clip_ids_A)))
      if not len(keep):
        continue
      out = self._encode_rows(self._audio, _pad_rows(audio, batch_size))
      feats.append(jax.tree.map(lambda x, keep=keep: x[keep], out))
      order += [(position[int(c)], int(w)) for c, w in zip(ids[keep], window[keep], strict=True)]
    counts_A = np.bincount([p for p, _ in order], minlength=len(clip_ids_A))
    if counts_A.min(initial=1) < 1 or sorted(order) != [
        (p, w) for p in range(len(clip_ids_A)) for w in range(counts_A[p])]:
      raise ValueError(f"evaluation batches held {len(order)} rows for {len(clip_ids_A)} clips; "
                       "each clip must appear once, or once per window numbered 0..W-1")
    sort = sorted(range(len(order)), key=order.__getitem__)
    rows = jax.tree.map(lambda x: x[np.asarray(sort)], concat_features(feats))
    return pool_windows(rows, counts_A, self.level_sim)

  def text(self, ids_TxM: np.ndarray, mask_TxM: np.ndarray, batch_size: int
           ) -> hade_heads.TextFeatures:
    out = []
    for start in range(0, len(ids_TxM), batch_size):
      stop = min(start + batch_size, len(ids_TxM))
      ids = _pad_rows(np.asarray(ids_TxM[start:stop]), batch_size)
      mask = _pad_rows(np.asarray(mask_TxM[start:stop]), batch_size)
      feats = self._encode_rows(self._text, ids, mask)
      out.append(jax.tree.map(lambda x, n=stop - start: x[:n], feats))
    return concat_features(out)

  def score_tile(self, audio, text) -> jax.Array:
    """Dispatches one tile: [tA', tT] scores (tA' = tA padded to a multiple of the mesh).

    Returns without waiting for the device, so the caller can prepare the next tile.
    """
    size = _round_up(num_rows(audio), self.num_devices)
    a = jax.tree.map(lambda x: _put(_pad_rows(np.asarray(x), size), self.rows), audio)
    t = jax.tree.map(lambda x: _put(np.asarray(x), self.replicated),
                     crop_words(jax.tree.map(np.asarray, text)))
    return self._score(self.state, a, t)

  def score(self, audio: hade_heads.AudioFeatures, text: hade_heads.TextFeatures, *,
            tile: int = 256, tile_text: int | None = None) -> np.ndarray:
    """[A, T] scores of all pairs, in tiles of `tile` clips x `tile_text` (default `tile`)
    captions, the clips of a tile split over the devices; captions of similar length share a
    tile (WORD_BUCKET)."""
    order_T = length_order(text)
    text = jax.tree.map(lambda x: np.asarray(x)[order_T], text)
    scores_AxT = np.empty((num_rows(audio), len(order_T)), np.float32)
    scores_AxT[:, order_T] = score_tiled(self.score_tile, audio, text, tile_audio=tile,
                                         tile_text=tile_text or tile, align=self.num_devices)
    return scores_AxT

  def rerank(self, audio_QxS, text_Q) -> np.ndarray:
    """[Q, S] full scores of each query's own S clips (leaves [Q, S, ...] and [Q, ...])."""
    q, s = jax.tree.leaves(audio_QxS)[0].shape[:2]
    size = _round_up(s, self.num_devices)
    cols = NamedSharding(self.mesh, P(None, ROWS))

    def pad(x):  # repeat the last shortlisted clip, cropped below
      x = np.asarray(x)
      if size == s:
        return x
      return np.concatenate([x, np.repeat(x[:, -1:], size - s, axis=1)], axis=1)

    a = jax.tree.map(lambda x: _put(pad(x), cols), audio_QxS)
    t = jax.tree.map(lambda x: _put(np.asarray(x)[:, None], self.replicated), text_Q)
    return np.asarray(self._rerank(self.state, a, t))[:q, :s]


def score_tiled(score_fn: Callable, audio, text, *, tile_audio: int | None = None,
                tile_text: int | None = None, tile: int = 256, align: int = 1) -> np.ndarray:
  """[A, T] scores computed tile by tile; `score_fn(a_tile, t_tile) -> [>= tA, >= tT]`.

  Every tile has the same shape (the last ones are padded and cropped), so a jitted
  `score_fn` compiles once. The audio edge is rounded up to a multiple of `align` (the number
  of devices its rows are split over). Results are read one tile late: while the host copies
  one tile's scores, the device already computes the next.
  """
  num_a, num_t = num_rows(audio), num_rows(text)
  ta = _round_up(min(tile_audio or tile, num_a), align)
  tt = min(tile_text or tile, num_t)
  out = np.zeros((num_a, num_t), np.float32)

  def store(a0, t0, s):
    ra, rt = min(ta, num_a - a0), min(tt, num_t - t0)
    out[a0:a0 + ra, t0:t0 + rt] = np.asarray(s)[:ra, :rt]

  pending = None
  for a0 in range(0, num_a, ta):
    a_tile = _take(audio, a0, min(a0 + ta, num_a), ta)
    for t0 in range(0, num_t, tt):
      t_tile = _take(text, t0, min(t0 + tt, num_t), tt)
      s = score_fn(a_tile, t_tile)
      if pending is not None:
        store(*pending)
      pending = (a0, t0, s)
  if pending is not None:
    store(*pending)
  return out


def score_untiled(model: hade.HadeModel, audio, text) -> np.ndarray:
  return np.asarray(model.score(jax.tree.map(jnp.asarray, audio),
                                jax.tree.map(jnp.asarray, text))["total"])


# ---------------------------------------------------------------------------------------------
# Search: a corpus of clip features, text queries.


class ClipIndex(Protocol):
  """What search needs of a corpus: its global embeddings in memory, any rows on demand."""

  def __len__(self) -> int: ...

  @property
  def global_NxD(self) -> np.ndarray: ...

  def take(self, rows: np.ndarray) -> hade_heads.AudioFeatures: ...


class MemoryIndex:
  """Clip features held in memory (e.g. from `api.Hade.embed_audio`), with optional names."""

  def __init__(self, features: hade_heads.AudioFeatures, names: Sequence[str] | None = None):
    self.features = jax.tree.map(np.asarray, features)
    self.names = list(names) if names is not None else [str(i) for i in range(len(self))]
    if len(self.names) != len(self):
      raise ValueError(f"{len(self.names)} names for {len(self)} clips")

  def __len__(self) -> int:
    return num_rows(self.features)

  @property
  def global_NxD(self) -> np.ndarray:
    return self.features.global_AxD

  def take(self, rows: np.ndarray) -> hade_heads.AudioFeatures:
    return jax.tree.map(lambda x: x[np.asarray(rows)], self.features)


@dataclasses.dataclass(frozen=True)
class SearchResult:
  """The top K clips of each query, best first (ties: lower row first).

  Attributes:
    rows_QxK: corpus rows.
    scores_QxK: their full HADE scores.
    shortlist: clips re-ranked per query (the corpus size for exhaustive search).
  """

  rows_QxK: np.ndarray
  scores_QxK: np.ndarray
  shortlist: int


def _top_k(rows_QxS: np.ndarray, scores_QxS: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Per query, the k best (score descending, then row ascending)."""
  out_rows, out_scores = [], []
  for rows, scores in zip(rows_QxS, scores_QxS, strict=True):
    order = np.lexsort((rows, -scores))[:k]
    out_rows.append(rows[order])
    out_scores.append(scores[order])
  return np.stack(out_rows), np.stack(out_scores)


@functools.partial(jax.jit, static_argnames=("k",))
def _global_top_k(g_NxD: jax.Array, valid_N: jax.Array, t_QxD: jax.Array, k: int):
  sims_QxN = jnp.einsum("qd,nd->qn", hade_heads.normalize(t_QxD), g_NxD)
  sims_QxN = jnp.where(valid_N[None], sims_QxN, -jnp.inf)
  return jax.lax.top_k(sims_QxN, k)  # equal values: the lower index first


class Shortlister(Protocol):
  """An approximate stage 1 (`ann.Shortlister`): the S best rows of a corpus by global cosine."""

  def __len__(self) -> int: ...

  def search(self, t_QxD: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]: ...


class Searcher:
  """Two-stage and exhaustive text-to-audio search of one corpus with one model.

  The corpus's normalised global embeddings go to the devices once (rows split over the mesh),
  unless a `shortlister` (an approximate index of them, `ann.Shortlister`) makes stage 1; the
  per-level tokens and factors stay wherever the index keeps them (memory or disk) and only
  shortlisted rows are read.
  """

  def __init__(self, encoder: Encoder, index: ClipIndex, shortlister: Shortlister | None = None):
    self.encoder, self.index, self.shortlister = encoder, index, shortlister
    if shortlister is not None:  # approximate stage 1: the global embeddings stay off device
      if len(shortlister) != len(index):
        raise ValueError(f"the shortlister holds {len(shortlister)} clips, the index "
                         f"{len(index)}; rebuild it for this index")
      return
    g_NxD = hade_heads.normalize(jnp.asarray(index.global_NxD, jnp.float32))
    n = len(index)
    size = _round_up(max(n, 1), encoder.num_devices)
    self._g_NxD = _put(_pad_rows(np.asarray(g_NxD), size), encoder.rows)
    self._valid_N = _put(np.arange(size) < n, encoder.rows)

  def shortlist(self, text: hade_heads.TextFeatures, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Stage 1: ([Q, S] rows, [Q, S] global cosines) of the S best clips by global cosine
    (exact, or approximate through the shortlister)."""
    size = min(size, len(self.index))
    if self.shortlister is not None:
      return self.shortlister.search(np.asarray(text.global_TxD, np.float32), size)
    t_QxD = _put(np.asarray(text.global_TxD, np.float32), self.encoder.replicated)
    sims, rows = _global_top_k(self._g_NxD, self._valid_N, t_QxD, size)
    return np.asarray(rows), np.asarray(sims)

  def search(self, text: hade_heads.TextFeatures, k: int, shortlist: int,
             rerank_rows: int = 4096) -> SearchResult:
    """Two-stage: the `shortlist` best clips by global cosine, re-ranked by the full score.

    Queries are re-ranked in groups of about `rerank_rows` shortlisted clips (at least one
    query), which bounds the memory of their gathered tokens.
    """
    s = min(shortlist, len(self.index))
    k = min(k, s)
    query_batch = max(1, rerank_rows // max(s, 1))
    rows_out, scores_out = [], []
    for q0 in range(0, num_rows(text), query_batch):
      t = jax.tree.map(lambda x, q0=q0: np.asarray(x)[q0:q0 + query_batch], text)
      rows_QxS, _ = self.shortlist(t, s)
      a = self.index.take(rows_QxS.reshape(-1))
      a_QxS = jax.tree.map(lambda x, shape=rows_QxS.shape: x.reshape(shape + x.shape[1:]), a)
      scores_QxS = self.encoder.rerank(a_QxS, t)
      r, sc = _top_k(rows_QxS, scores_QxS, k)
      rows_out.append(r)
      scores_out.append(sc)
    return SearchResult(np.concatenate(rows_out), np.concatenate(scores_out), s)

  def exhaustive(self, text: hade_heads.TextFeatures, k: int, tile: int = 256,
                 chunk: int = 4096) -> SearchResult:
    """The full score of every clip: the reference two-stage search is measured against.

    The corpus is read `chunk` clips at a time and a running top-k is kept, so memory does
    not grow with the corpus.
    """
    n, q = len(self.index), num_rows(text)
    k = min(k, n)
    best_rows = np.zeros((q, 0), np.int64)
    best_scores = np.zeros((q, 0), np.float32)
    for c0 in range(0, n, chunk):
      rows = np.arange(c0, min(c0 + chunk, n))
      s_AxQ = self.encoder.score(self.index.take(rows), text, tile=tile)
      cand_rows = np.concatenate([best_rows, np.broadcast_to(rows, (q, len(rows)))], axis=1)
      cand_scores = np.concatenate([best_scores, s_AxQ.T], axis=1)
      best_rows, best_scores = _top_k(cand_rows, cand_scores, k)
    return SearchResult(best_rows, best_scores, n)
