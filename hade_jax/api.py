"""User API: load a trained HADE, embed audio and text deterministically, score, search.

  from hade_jax import api
  hade = api.Hade.load("/tmp/hade_demo")                # a workdir (its best step) or a step dir
  hade.save("/tmp/hade_model")                          # a portable model folder (model_folder)
  hade = api.Hade.load("/tmp/hade_model")               # ... loads without orbax, TFDS or Grain
  clips = hade.embed_audio(["a.wav", "b.flac"])         # any format soundfile reads
  clips = hade.embed_audio([wave], sample_rate=44_100)  # or arrays (rate required)
  texts = hade.embed_text(["a dog barks", "rain on a roof"])
  scores_AxT = hade.score(clips, texts)                 # the full HADE score of every pair
  hits = hade.search(["a dog barks"], api.MemoryIndex(clips, ["a.wav", "b.flac"]), k=5)
  ranked = hade.classify(["a.wav"], ["dog", "rain", "siren"])  # zero-shot: hade_jax/zero_shot.py

Audio is made to look exactly like evaluation input (`input_pipeline`): decoded to mono at the
model's rate (`data_pipelines.audio_io`: downmix, soxr resampling, int16), then cropped to
`config.data.crop_seconds` by `config.data.eval_crop` ('head': the first seconds, 'center': the
middle ones, 'windows': every `config.data.window_hop_seconds`, each window encoded and the
clip's features pooled, docs/method.md §9) and shorter clips padded by `config.data.pad_mode`
('zeros' at the end, or 'repeat'). Nothing is random: the same input always gives the same
features. `embed_audio(..., crop='windows')` overrides the config's crop for one call.

Legend: A: audios, T: texts, S: samples, L: clip length, Q: queries.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import logging
import os
import pathlib
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
import soxr
from flax import nnx
from jax.sharding import Mesh

from data_pipelines import audio_io, policy
from hade_jax import (
  checkpoints,
  hade,
  metrics,
  model_folder,
  retrieval,
  tokenizer,
  validation,
  zero_shot,
)
from hade_jax import heads as hade_heads

log = logging.getLogger("hade_jax.api")

MemoryIndex = retrieval.MemoryIndex
CHECKPOINT_KIND = "training checkpoint"  # `Hade.kind` of weights read from a training run
AudioItem = str | os.PathLike | np.ndarray


# ---------------------------------------------------------------------------------------------
# Checkpoints -> model.


def load_model(path: str | os.PathLike, config: ml_collections.ConfigDict | None = None, *,
               which: str = "best", mesh: Mesh | None = None
               ) -> tuple[hade.HadeModel, ml_collections.ConfigDict, pathlib.Path]:
  """(model, config, step directory) of a checkpoint; weights land replicated on `mesh`.

  Only the parameters and batch-norm statistics are read (not the optimizer state). `config`
  defaults to the one saved with the checkpoint. A portable model folder (`model_folder`)
  loads too (`which` does not apply; its folder takes the step directory's place).
  """
  mesh = mesh if mesh is not None else retrieval.device_mesh()
  if model_folder.is_model_folder(path):
    model, config = model_folder.load(path, config, mesh=mesh)
    return model, config, pathlib.Path(path).expanduser().absolute()
  step_dir = checkpoints.step_dir(path, which)
  if config is None:
    config = ml_collections.ConfigDict(checkpoints.saved_config(step_dir))
  validation.validate_config(config, training=False)  # a clear error before building anything
  cfg = hade.model_config(config)
  abstract = nnx.eval_shape(lambda: hade.HadeModel(cfg, rngs=nnx.Rngs(0)))
  graphdef, params, rest = hade.split_model(abstract)
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
# Waveforms: decode, then the crop policy of data_pipelines/policy.py.


# Channel counts accepted in an array, and how much longer than the channel axis the sample
# axis must be for the layout ([samples, channels] or [channels, samples]) to be unambiguous.
MAX_ARRAY_CHANNELS = 8
_MIN_SAMPLES_PER_CHANNEL_AXIS = 16
# Integer sample formats: (offset, scale) mapping their full range to [-1, 1).
_INT_SCALES = {np.dtype(np.int16): (0.0, 32768.0), np.dtype(np.int32): (0.0, 2.0 ** 31),
               np.dtype(np.int8): (0.0, 128.0), np.dtype(np.uint8): (128.0, 128.0)}


def _channels_last(x: np.ndarray) -> np.ndarray:
  """[samples, channels] from a 2-D array in either layout, or ValueError when ambiguous."""
  rows, cols = x.shape
  if cols <= MAX_ARRAY_CHANNELS and rows >= _MIN_SAMPLES_PER_CHANNEL_AXIS * cols:
    return x
  if rows <= MAX_ARRAY_CHANNELS and cols >= _MIN_SAMPLES_PER_CHANNEL_AXIS * rows:
    return x.T  # [channels, samples], the layout of librosa and torchaudio
  raise ValueError(
      f"a 2-D waveform of shape {x.shape} is ambiguous: expected [samples, channels] or "
      f"[channels, samples] with at most {MAX_ARRAY_CHANNELS} channels and at least "
      f"{_MIN_SAMPLES_PER_CHANNEL_AXIS} times more samples than channels; pass one clip as "
      "[samples] (mono) or in one of those layouts")


def array_to_mono(wave: np.ndarray, sample_rate: int, target_rate: int) -> np.ndarray:
  """An array -> float32 mono at `target_rate`.

  Args:
    wave: [samples], [samples, channels] or [channels, samples] (at most
      `MAX_ARRAY_CHANNELS` channels; the longer axis is time); float in [-1, 1], or int16 /
      int32 / int8 scaled by their range, or uint8 centred at 128 (8-bit WAV).
    sample_rate: the array's rate in Hz (at least `audio_io.MIN_SOURCE_RATE`).
    target_rate: the model's rate.

  Raises:
    ValueError: the shape, dtype, rate or samples (NaN/Inf) cannot be used.
  """
  if isinstance(sample_rate, bool) or not isinstance(sample_rate, int | np.integer) or (
      sample_rate < audio_io.MIN_SOURCE_RATE):
    raise ValueError(f"sample_rate={sample_rate!r}: an array's rate must be an integer of at "
                     f"least {audio_io.MIN_SOURCE_RATE} Hz, as for files")
  x = np.asarray(wave)
  if x.dtype in _INT_SCALES:
    offset, scale = _INT_SCALES[x.dtype]
    x = (x.astype(np.float64) - offset) / scale
  elif not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f"a waveform of dtype {x.dtype}: expected float in [-1, 1] or int16, "
                     "int32, int8, uint8 PCM")
  x = x.astype(np.float32)
  if x.ndim == 2:
    x = _channels_last(x).mean(axis=1)  # the mean keeps a correlated pair's level
  if x.ndim != 1 or x.size == 0:
    raise ValueError(f"expected a non-empty [samples], [samples, channels] or [channels, "
                     f"samples] array, got shape {np.shape(wave)}")
  if not np.isfinite(x).all():
    raise ValueError("the waveform holds NaN or Inf samples")
  if sample_rate != target_rate:
    x = soxr.resample(x, int(sample_rate), target_rate, quality="HQ").astype(np.float32)
  return x


def load_audio(item: AudioItem, *, sample_rate: int, num_samples: int, crop: str = "head",
               pad_mode: str = "zeros", item_rate: int | None = None,
               window_hop: int | None = None) -> np.ndarray:
  """One file or array -> the float32 waveform a model at `sample_rate` sees: [num_samples],
  or [W, num_samples] windows with crop='windows'.

  Args:
    item: a path (str or os.PathLike; any format soundfile reads) or an array (see
      `array_to_mono`).
    sample_rate: the model's rate.
    num_samples: the crop length.
    crop: 'head', 'center' (`data_pipelines.policy.crop_start`) or 'windows'
      (`policy.fit_windows`, the whole file decoded).
    pad_mode: one of `data_pipelines.policy.PAD_MODES` (`policy.fit_clip`).
    item_rate: an array's rate (required for arrays: a wrong guess gives wrong features
      without a word); files carry their own.
    window_hop: samples between window starts (crop='windows'; default `num_samples`).

  Raises:
    audio_io.AudioError: a file that is missing, unreadable, empty, holds NaN/Inf or has a
      source rate below 1 kHz (names the file).
    ValueError: an array without `item_rate`, or one `array_to_mono` refuses.
  """
  policy.check_crop_policy(crop, pad_mode)
  if isinstance(item, np.ndarray):
    if item_rate is None:
      raise ValueError(f"an audio array of shape {item.shape} needs its rate: pass "
                       f"sample_rate=... (the model's rate is {sample_rate} Hz)")
    wave = array_to_mono(item, item_rate, sample_rate)
  elif isinstance(item, str | os.PathLike):
    # Decoded as the prepare step stores clips (int16 at the model's rate), so a file gives
    # the features its prepared record gives in evaluation; only the crop's frames are read.
    path = pathlib.Path(item)
    decoded = (audio_io.decode(path, sample_rate) if crop == "windows" else
               audio_io.decode_crop(path, sample_rate, num_samples, crop))
    wave = decoded.samples.astype(np.float32) / 32768.0
  else:
    raise TypeError(f"an audio item must be a path (str or os.PathLike) or a numpy array, got "
                    f"{type(item).__name__}")
  if crop == "windows":
    return policy.fit_windows(np.asarray(wave, np.float32), num_samples,
                              window_hop or num_samples, pad_mode=pad_mode)
  start = policy.crop_start(len(wave), num_samples, crop)
  return policy.fit_clip(np.asarray(wave, np.float32), num_samples, start=start,
                         pad_mode=pad_mode)[0]


@dataclasses.dataclass(frozen=True)
class Skipped:
  """An item `Hade.embed_audio(..., on_error='skip')` left out."""

  position: int  # in the items given
  item: str  # the path, or a description of the array
  reason: str


def _describe(item: AudioItem) -> str:
  if isinstance(item, np.ndarray):
    return f"array{list(item.shape)} {item.dtype}"
  return str(item)


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
    checkpoint: the step directory or model folder the weights came from ('' when built in
      memory).
    kind: where the weights came from: `CHECKPOINT_KIND`, `model_folder.KIND` or 'in memory'.
  """

  def __init__(self, model: hade.HadeModel, config: ml_collections.ConfigDict, *,
               mesh: Mesh | None = None, checkpoint: str | os.PathLike = "",
               kind: str = "in memory"):
    self.model, self.config, self.kind = model, config, kind
    self.encoder = retrieval.Encoder(model, mesh)
    self.checkpoint = str(checkpoint)
    d = config.data
    self.sample_rate = model.cfg.mel.sample_rate
    self.num_samples = int(round(d.crop_seconds * self.sample_rate))
    self.crop, self.pad_mode = d.eval_crop, d.pad_mode
    policy.check_crop_policy(self.crop, self.pad_mode)
    self.window_hop = policy.hop_samples(self.num_samples, d.get("window_hop_seconds", 0.0),
                                         self.sample_rate)
    self.batch_size = int(config.get("eval_batch_size", 64))
    self.tile = int(config.get("eval_tile", 256))
    self._tokenizer = None
    self._fingerprint = None
    self._searcher: retrieval.Searcher | None = None

  @classmethod
  def load(cls, path: str | os.PathLike, config: ml_collections.ConfigDict | None = None, *,
           which: str = "best", mesh: Mesh | None = None) -> Hade:
    """From a portable model folder (`save`), or a training run: a workdir, a checkpoints
    folder or a step folder (`checkpoints.step_dir`; `which`: 'best', 'latest' or a step).

    `kind` tells which it was (`model_folder.KIND` or `CHECKPOINT_KIND`).
    """
    mesh = mesh if mesh is not None else retrieval.device_mesh()
    kind = model_folder.KIND if model_folder.is_model_folder(path) else CHECKPOINT_KIND
    model, config, source = load_model(path, config, which=which, mesh=mesh)
    log.info("loaded a %s from %s", kind, source)
    return cls(model, config, mesh=mesh, checkpoint=source, kind=kind)

  def save(self, out_dir: str | os.PathLike, *, tokenizer_dir: str | os.PathLike | None = None,
           overwrite: bool = False) -> pathlib.Path:
    """Writes a portable model folder (`model_folder`): config.json, model.safetensors and
    the tokenizer files (default config.data.tokenizer_dir), no optimizer state."""
    source = {"kind": self.kind, "path": self.checkpoint}
    if self.kind == CHECKPOINT_KIND and pathlib.Path(self.checkpoint).name.isdigit():
      source["step"] = int(pathlib.Path(self.checkpoint).name)
    return model_folder.save(self.model, self.config, out_dir, tokenizer_dir=tokenizer_dir,
                             source=source, overwrite=overwrite)

  def save_clap(self, out_dir: str | os.PathLike, *,
                tokenizer_dir: str | os.PathLike | None = None,
                overwrite: bool = False) -> pathlib.Path:
    """Writes a Hugging Face `ClapModel` folder of the towers and projections
    (`convert.clap.export_clap`); raises `convert.clap.NotClapShapedError` listing what
    differs when the model is not CLAP-shaped."""
    from hade_jax.convert import clap as convert_clap  # only exports need the rename tables

    d = self.config.data
    return convert_clap.export_clap(
        self.model, out_dir, crop_seconds=d.crop_seconds, pad_mode=d.pad_mode,
        tokenizer_dir=d.tokenizer_dir if tokenizer_dir is None else tokenizer_dir,
        overwrite=overwrite)

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

  def settings(self, crop: str | None = None) -> dict:
    """What makes two embeddings of the same audio comparable (stored with an index);
    `crop` overrides the config's eval_crop."""
    crop = crop or self.crop
    policy.check_crop_policy(crop, self.pad_mode)
    out = {"sample_rate": self.sample_rate, "num_samples": self.num_samples,
           "crop": crop, "pad_mode": self.pad_mode}
    if crop == "windows":  # only then: indexes of one-crop policies keep their settings
      out["window_hop"] = self.window_hop
    return out

  # -- embedding -------------------------------------------------------------------------------

  def load_audio(self, item: AudioItem, sample_rate: int | None = None, *,
                 crop: str | None = None) -> np.ndarray:
    """One file or array -> the float32 waveform the model sees: [S], or [W, S] windows with
    crop 'windows' (see `load_audio`)."""
    return load_audio(item, item_rate=sample_rate, **self.settings(crop))

  def load_audios(self, items: Sequence[AudioItem], sample_rate: int | None = None, *,
                  num_threads: int = 4, on_error: str = "raise", crop: str | None = None
                  ) -> list[np.ndarray | ValueError]:
    """`load_audio` over many items, decoded in threads (soundfile and soxr release the GIL).

    With on_error='skip', an item that cannot be used gives its error (an `AudioError` or
    ValueError naming the problem) in its place instead of raising.
    """
    if on_error not in ("raise", "skip"):
      raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")

    def one(x):
      try:
        return self.load_audio(x, sample_rate, crop=crop)
      except ValueError as e:
        if on_error == "raise":
          raise
        return e

    if num_threads <= 1 or len(items) <= 1:
      return [one(x) for x in items]
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
      return list(pool.map(one, items))

  def embed_waves(self, waves: Sequence[np.ndarray], batch_size: int | None = None, *,
                  crop: str | None = None) -> hade_heads.AudioFeatures:
    """Waveforms already `load_audio`ed -> cached audio features (numpy): [S] each, or with
    crop 'windows' [W, S] each (a [S] wave is one window), pooled per clip."""
    if (crop or self.crop) == "windows":
      return self.encoder.audio_windows(waves, batch_size or self.batch_size)
    return self.encoder.audio(waves, batch_size or self.batch_size)

  def embed_audio(self, items: AudioItem | Sequence[AudioItem], *,
                  sample_rate: int | None = None, batch_size: int | None = None,
                  on_error: str = "raise", crop: str | None = None
                  ) -> hade_heads.AudioFeatures | tuple[hade_heads.AudioFeatures | None,
                                                        list[Skipped]]:
    """Files (any format soundfile reads) or arrays -> cached audio features, in order.

    Args:
      items: one path (str or os.PathLike) or 1-D array, or a sequence of paths and arrays
        (see `array_to_mono` for the array layouts and dtypes).
      sample_rate: the arrays' rate (required when there are arrays); files carry their own.
      batch_size: clips per encoder call (default config.eval_batch_size); results do not
        depend on it.
      on_error: 'raise' (the first unusable item raises, naming it) or 'skip'.
      crop: 'head', 'center' or 'windows' for this call (default config.data.eval_crop).

    Returns:
      The features; with on_error='skip', (features of the usable items in order, or None
      when there is none; the `Skipped` items with their reasons).
    """
    if isinstance(items, str | os.PathLike):
      items = [items]
    elif isinstance(items, np.ndarray):
      if items.ndim != 1:
        raise ValueError(f"embed_audio got one array of shape {items.shape}: pass a list of "
                         "clips ([array]) so its axes are not taken for separate clips")
      items = [items]
    items = list(items)
    if not items:
      raise ValueError("embed_audio got no audio")
    batch_size = batch_size or self.batch_size
    out, skipped = [], []
    for start in range(0, len(items), batch_size):
      waves = []
      loaded = self.load_audios(items[start:start + batch_size], sample_rate, on_error=on_error,
                                crop=crop)
      for i, wave in enumerate(loaded, start):
        if isinstance(wave, ValueError):
          skipped.append(Skipped(i, _describe(items[i]), str(wave)))
        else:
          waves.append(wave)
      if waves:
        out.append(self.embed_waves(waves, batch_size, crop=crop))
    features = retrieval.concat_features(out) if out else None
    # NaN embeddings would rank first in every search: refuse them naming the items.
    if features is not None:
      left_out = {s.position for s in skipped}
      kept = [_describe(x) for i, x in enumerate(items) if i not in left_out]
      metrics.check_finite_embeddings(features, kept, "audio")
    return (features, skipped) if on_error == "skip" else features

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

  # -- zero-shot classification ----------------------------------------------------------------

  def label_scores(self, audio: hade_heads.AudioFeatures, labels: Sequence[str],
                   templates: Sequence[str] = zero_shot.DEFAULT_TEMPLATES) -> np.ndarray:
    """[A, L] prompt-ensembled full HADE scores of embedded clips for labels
    (`zero_shot.label_scores`: every label in every template, the mean over templates)."""
    return zero_shot.label_scores(self.encoder, self.tokenizer, audio, labels, templates,
                                  batch_size=self.batch_size, tile=self.tile)

  def classify(self, audio: AudioItem | Sequence[AudioItem] | hade_heads.AudioFeatures,
               labels: Sequence[str], *,
               templates: Sequence[str] = zero_shot.DEFAULT_TEMPLATES,
               top_k: int | None = None, sample_rate: int | None = None
               ) -> list[list[zero_shot.LabelScore]]:
    """Zero-shot classification: per clip, the labels ranked best first with their scores.

    Args:
      audio: what `embed_audio` accepts (paths, arrays with `sample_rate`), or features it
        returned (embed once, classify with several label sets).
      labels: class labels (unique, non-empty); '_' reads as a space in the prompts.
      templates: prompt templates with one '{}' each (default `zero_shot.DEFAULT_TEMPLATES`).
      top_k: labels kept per clip (default: all).
      sample_rate: the arrays' rate (as `embed_audio`).

    Returns:
      One list of `zero_shot.LabelScore` (label, score, probability) per clip, in input order,
      ranked by `zero_shot.RANK_ORDER`.
    """
    labels = zero_shot.check_labels(labels)  # before any audio is decoded
    templates = zero_shot.check_templates(templates)
    if not isinstance(audio, hade_heads.AudioFeatures):
      audio = self.embed_audio(audio, sample_rate=sample_rate)
    scores_AxL = self.label_scores(audio, labels, templates)
    scale = float(self.model.heads.logit_scale_value())
    return zero_shot.rank(scores_AxL, labels, scale, top_k)
