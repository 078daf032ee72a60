"""User API: load a trained HADE, embed audio and text deterministically, score, search.

  from hade_jax import api
  hade = api.Hade.load("/tmp/hade_demo")                # a workdir (its best step) or a step dir
  clips = hade.embed_audio(["a.wav", "b.flac"])         # any format soundfile reads
  clips = hade.embed_audio([wave], sample_rate=44_100)  # or arrays ([samples] or [samples, ch])
  texts = hade.embed_text(["a dog barks", "rain on a roof"])
  scores_AxT = hade.score(clips, texts)                 # the full HADE score of every pair
  hits = hade.search(["a dog barks"], api.MemoryIndex(clips, ["a.wav", "b.flac"]), k=5)

Audio is made to look exactly like evaluation input (`input_pipeline`): decoded to mono at the
model's rate (`data_pipelines.audio_io`: downmix, soxr resampling, int16), then ONE crop of
`config.data.crop_seconds` per clip by `config.data.eval_crop` ('head': the first seconds,
'center': the middle ones) and shorter clips padded by `config.data.pad_mode` ('zeros' at the
end, or 'repeat'). Nothing is random: the same input always gives the same features.

Legend: A: audios, T: texts, S: samples, L: clip length, Q: queries.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
import pathlib
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
import soxr
from flax import nnx
from jax.sharding import Mesh

from data_pipelines import audio_io
from hade_jax import checkpoints, hade, retrieval, tokenizer, trainer, validation
from hade_jax import heads as hade_heads

MemoryIndex = retrieval.MemoryIndex
AudioItem = str | os.PathLike | np.ndarray


# ---------------------------------------------------------------------------------------------
# Checkpoints -> model.


def load_model(path: str | os.PathLike, config: ml_collections.ConfigDict | None = None, *,
               which: str = "best", mesh: Mesh | None = None
               ) -> tuple[hade.HadeModel, ml_collections.ConfigDict, pathlib.Path]:
  """(model, config, step directory) of a checkpoint; weights land replicated on `mesh`.

  Only the parameters and batch-norm statistics are read (not the optimizer state). `config`
  defaults to the one saved with the checkpoint.
  """
  step_dir = checkpoints.step_dir(path, which)
  if config is None:
    config = ml_collections.ConfigDict(checkpoints.saved_config(step_dir))
  validation.validate_config(config, training=False)  # a clear error before building anything
  cfg = trainer.model_config(config)
  abstract = nnx.eval_shape(lambda: hade.HadeModel(cfg, rngs=nnx.Rngs(0)))
  graphdef, params, rest = trainer.split_model(abstract)
  mesh = mesh if mesh is not None else retrieval.device_mesh()
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                        {"params": params, "rest": rest})
  restored = checkpoints.load(step_dir, target)
  return nnx.merge(graphdef, restored["params"], restored["rest"]), config, step_dir


def fingerprint(model: hade.HadeModel) -> str:
  """sha256 of every parameter and statistic: tells whether two models are the same."""
  digest = hashlib.sha256()
  leaves = jax.tree_util.tree_leaves_with_path(nnx.state(model))
  for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    x = np.asarray(leaf)
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(str((x.shape, x.dtype)).encode())
    digest.update(np.ascontiguousarray(x).tobytes())
  return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Waveforms: decode and the fixed crop policy.


def check_crop_policy(crop: str, pad_mode: str) -> None:
  """Raises ValueError unless (crop, pad_mode) is a one-crop-per-clip policy `fit_clip` knows."""
  if crop not in ("head", "center"):
    raise ValueError(f"config.data.eval_crop={crop!r}: embedding takes one crop per clip, "
                     "'head' or 'center' ('windows' gives several rows per clip and is only "
                     "for the TFDS evaluation pipeline)")
  if pad_mode not in ("zeros", "repeat"):
    raise ValueError(f"config.data.pad_mode={pad_mode!r}: expected 'zeros' or 'repeat'")


def fit_clip(wave_L: np.ndarray, num_samples: int, crop: str = "head",
             pad_mode: str = "zeros") -> np.ndarray:
  """One crop of `num_samples` per clip, the evaluation pipeline's policy (no randomness).

  Longer clips: the first ('head') or middle ('center', start (L - S) // 2) samples;
  shorter clips: zeros at the end ('zeros') or the clip tiled ('repeat').
  """
  check_crop_policy(crop, pad_mode)
  wave_L = np.asarray(wave_L, np.float32)
  n = len(wave_L)
  if n >= num_samples:
    start = 0 if crop == "head" else (n - num_samples) // 2
    return wave_L[start:start + num_samples]
  if pad_mode == "repeat" and n > 0:
    return np.tile(wave_L, -(-num_samples // n))[:num_samples]
  out = np.zeros(num_samples, np.float32)
  out[:n] = wave_L
  return out


def array_to_mono(wave: np.ndarray, sample_rate: int, target_rate: int) -> np.ndarray:
  """An array ([samples] or [samples, channels], float or int16) -> float32 mono at the rate."""
  x = np.asarray(wave)
  if x.dtype == np.int16:
    x = x.astype(np.float32) / 32768.0
  x = x.astype(np.float32)
  if x.ndim == 2:
    x = x.mean(axis=1)  # soundfile's layout; the mean keeps a correlated pair's level
  if x.ndim != 1 or x.size == 0:
    raise ValueError(f"expected a non-empty [samples] or [samples, channels] array, got shape "
                     f"{np.shape(wave)}")
  if not np.isfinite(x).all():
    raise ValueError("the waveform holds NaN or Inf samples")
  if sample_rate != target_rate:
    x = soxr.resample(x, sample_rate, target_rate, quality="HQ").astype(np.float32)
  return x


def load_audio(item: AudioItem, *, sample_rate: int, num_samples: int, crop: str = "head",
               pad_mode: str = "zeros", item_rate: int | None = None) -> np.ndarray:
  """One file or array -> the [num_samples] float32 waveform a model at `sample_rate` sees.

  Args:
    item: a path (any format soundfile reads) or an array ([samples] or [samples, channels]).
    sample_rate: the model's rate.
    num_samples: the crop length.
    crop: 'head' or 'center' (`fit_clip`).
    pad_mode: 'zeros' or 'repeat' (`fit_clip`).
    item_rate: an array's rate (default `sample_rate`); files carry their own.

  Raises:
    audio_io.AudioError: a file that is unreadable, empty, holds NaN/Inf or has a source rate
        below 1 kHz (names the file).
  """
  if isinstance(item, np.ndarray):
    wave = array_to_mono(item, item_rate or sample_rate, sample_rate)
  else:
    # Decoded as the prepare step stores clips (int16 at the model's rate), so a file gives
    # the features its prepared record gives in evaluation.
    wave = audio_io.decode(item, sample_rate).samples.astype(np.float32) / 32768.0
  return fit_clip(wave, num_samples, crop, pad_mode)


@dataclasses.dataclass(frozen=True)
class Hit:
  """One search result."""

  name: str
  score: float
  row: int


class Hade:
  """A trained HADE ready for embedding, scoring and search (see the module docstring).

  Attributes:
    model: the HadeModel (weights replicated on the mesh).
    config: the training config (data.* gives tokenizer, crop and padding; eval_* the sizes).
    encoder: the jitted, sharded encoders (`retrieval.Encoder`).
    checkpoint: the step directory the weights came from ('' when built in memory).
  """

  def __init__(self, model: hade.HadeModel, config: ml_collections.ConfigDict, *,
               mesh: Mesh | None = None, checkpoint: str | os.PathLike = ""):
    self.model, self.config = model, config
    self.encoder = retrieval.Encoder(model, mesh)
    self.checkpoint = str(checkpoint)
    d = config.data
    self.sample_rate = model.cfg.mel.sample_rate
    self.num_samples = int(round(d.crop_seconds * self.sample_rate))
    self.crop, self.pad_mode = d.eval_crop, d.pad_mode
    check_crop_policy(self.crop, self.pad_mode)
    self.batch_size = int(config.get("eval_batch_size", 64))
    self.tile = int(config.get("eval_tile", 256))
    self._tokenizer = None
    self._fingerprint = None
    self._searcher: retrieval.Searcher | None = None

  @classmethod
  def load(cls, path: str | os.PathLike, config: ml_collections.ConfigDict | None = None, *,
           which: str = "best", mesh: Mesh | None = None) -> Hade:
    """From a workdir, a checkpoints folder or a step folder (`checkpoints.step_dir`)."""
    mesh = mesh if mesh is not None else retrieval.device_mesh()
    model, config, step_dir = load_model(path, config, which=which, mesh=mesh)
    return cls(model, config, mesh=mesh, checkpoint=step_dir)

  @property
  def tokenizer(self) -> tokenizer.Tokenizer:
    if self._tokenizer is None:
      path = self.config.data.tokenizer_dir
      if not path:
        raise ValueError("config.data.tokenizer_dir is empty: point it at the text tower's "
                         "tokenizer folder (tokenizer.json or vocab.txt)")
      self._tokenizer = tokenizer.Tokenizer(pathlib.Path(path).expanduser(),
                                            self.config.data.max_text_len)
    return self._tokenizer

  def fingerprint(self) -> str:
    if self._fingerprint is None:
      self._fingerprint = fingerprint(self.model)
    return self._fingerprint

  def settings(self) -> dict:
    """What makes two embeddings of the same audio comparable (stored with an index)."""
    return {"sample_rate": self.sample_rate, "num_samples": self.num_samples,
            "crop": self.crop, "pad_mode": self.pad_mode}

  # -- embedding -------------------------------------------------------------------------------

  def load_audio(self, item: AudioItem, sample_rate: int | None = None) -> np.ndarray:
    """One file or array -> the [S] float32 waveform the model sees (see `load_audio`)."""
    return load_audio(item, item_rate=sample_rate, **self.settings())

  def load_audios(self, items: Sequence[AudioItem], sample_rate: int | None = None, *,
                  num_threads: int = 4) -> list[np.ndarray]:
    """`load_audio` over many items, decoded in threads (soundfile and soxr release the GIL)."""
    if num_threads <= 1 or len(items) <= 1:
      return [self.load_audio(x, sample_rate) for x in items]
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
      return list(pool.map(lambda x: self.load_audio(x, sample_rate), items))

  def embed_waves(self, waves: Sequence[np.ndarray], batch_size: int | None = None
                  ) -> hade_heads.AudioFeatures:
    """[S] waveforms (already `load_audio`ed) -> cached audio features (numpy)."""
    return self.encoder.audio(waves, batch_size or self.batch_size)

  def embed_audio(self, items: Sequence[AudioItem], *, sample_rate: int | None = None,
                  batch_size: int | None = None) -> hade_heads.AudioFeatures:
    """Files (any format soundfile reads) or arrays -> cached audio features, in order.

    Args:
      items: paths, or arrays [samples] / [samples, channels] (float in [-1, 1] or int16).
      sample_rate: the arrays' rate (default: the model's); files carry their own.
      batch_size: clips per encoder call (default config.eval_batch_size); results do not
        depend on it.
    """
    items = list(items)
    if not items:
      raise ValueError("embed_audio got no audio")
    batch_size = batch_size or self.batch_size
    out = []
    for start in range(0, len(items), batch_size):
      waves = self.load_audios(items[start:start + batch_size], sample_rate)
      out.append(self.embed_waves(waves, batch_size))
    return retrieval.concat_features(out)

  def embed_text(self, texts: Sequence[str], *, batch_size: int | None = None
                 ) -> hade_heads.TextFeatures:
    """Texts -> cached text features (tokenised as in training: config.data.max_text_len)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
      raise ValueError("embed_text got no text")
    ids_TxM, mask_TxM = self.tokenizer(texts)
    return self.encoder.text(ids_TxM, mask_TxM, batch_size or self.batch_size)

  # -- scoring and search ----------------------------------------------------------------------

  def score(self, audio: hade_heads.AudioFeatures, text: hade_heads.TextFeatures, *,
            tile: int | None = None) -> np.ndarray:
    """[A, T] full HADE scores of all pairs, in memory-bounded tiles (config.eval_tile)."""
    return self.encoder.score(audio, text, tile=tile or self.tile)

  def searcher(self, index: retrieval.ClipIndex) -> retrieval.Searcher:
    """The searcher of `index`; the last one is kept, so repeated queries of one index put its
    global embeddings on the devices once."""
    if self._searcher is None or self._searcher.index is not index:
      self._searcher = retrieval.Searcher(self.encoder, index)
    return self._searcher

  def search(self, queries: Sequence[str] | str, index: retrieval.ClipIndex, k: int = 10, *,
             shortlist: int | None = 1000) -> list[list[Hit]]:
    """The k best clips of `index` for each text query, best first.

    Args:
      queries: texts.
      index: a `MemoryIndex` or a `search.Index` (on disk) embedded with this model.
      k: results per query.
      shortlist: clips kept by the global cosine and re-ranked with the full score; None or
        0 scores every clip (exhaustive).
    """
    queries = [queries] if isinstance(queries, str) else list(queries)
    text = self.embed_text(queries)
    searcher = self.searcher(index)
    if shortlist:
      result = searcher.search(text, k, shortlist)
    else:
      result = searcher.exhaustive(text, k, tile=self.tile)
    names = getattr(index, "names", None)
    return [[Hit(names[r] if names is not None else str(r), float(s), int(r))
             for r, s in zip(rows, scores, strict=True)]
            for rows, scores in zip(result.rows_QxK, result.scores_QxK, strict=True)]
