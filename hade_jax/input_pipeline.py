"""Grain pipelines from prepared TFDS records (see data_pipelines/) to fixed-shape batches.

Legend: B: batch, S: audio samples (crop seconds x rate), M: tokens per caption,
Kt/Kf: SpecAugment time/frequency stripes, N: log-mel frames, F: mel bins.

Training (`make_train_loader`), per process:
  records --shuffle (a new permutation every epoch)--> repeat --per record, seeded by
  (seed, position in the global stream)--> random crop / pad, one caption sampled, tokenised,
  SpecAugment stripes sampled --> batches of `batch_size` --> every `shard_count`-th batch
  from `shard_index`. Because the randomness is a function of the global position, the
  batches do not depend on the number of worker processes, and `shard_count` processes see
  disjoint clips of each epoch: the k-th batches of processes 0..n-1, concatenated in process
  order (as `jax.make_array_from_process_local_data` lays them out), are the elements
  [k G, (k + 1) G) of the global stream, G = n x batch_size, in order, whatever n is. The
  iterator's `get_state()` / `set_state()` (Grain `DatasetIterator`; saved by orbax through
  `grain.checkpoint.CheckpointSave`) restore the exact stream; the state counts batches, so
  it is the same in every process and carries over to another process count with the same G.

  Batch (numpy): audio float32 [B, S] in [-1, 1); audio_length int32 [B] (samples that are
  not zero padding); input_ids int32 [B, M]; attention_mask int32 [B, M]; clip_id int32 [B]
  (the record's stable `clip_index`: captions of one clip share it); caption_index int32 [B];
  with SpecAugment: specaug_time int32 [B, Kt, 2] and specaug_freq int32 [B, Kf, 2] as
  (start, width) rows, applied on device to the log-mel by `apply_spec_augment`; from a
  labels folder (`label_index` >= 0): group_id int32 [B], the clip's class index, so that
  clips of one class are positives for each other (`positive_ids`).

Evaluation is deterministic and covers every clip and every caption:
  `make_eval_audio_loader`: audio rows [B, S] in record order with clip_id, window_index and
  valid (0 on padding rows of the last batch, and on the rows a process adds so that every
  process yields the same number of batches). Clips longer than S follow `eval_crop`:
  'head' (first S samples), 'center' (middle S samples) or 'windows' (S-sample windows
  every `window_hop_seconds`, the last one aligned to the clip's end: `policy.window_starts`;
  one row each, so the evaluator pools them per clip_id). Shorter clips are padded by
  `pad_mode`, as in training.
  `eval_captions`: every caption, tokenised, with the clip_id it belongs to.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Iterator

import grain
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds
from absl import flags

from data_pipelines import policy
from hade_jax import tokenizer as tokenizer_lib

_INT16_SCALE = 1.0 / 32768.0


@dataclasses.dataclass(frozen=True)
class SpecAugmentConfig:
  """SpecAugment stripes (docs/method.md §7: 2 time stripes of up to 64 frames, 2 of up to 8 bins).

  Attributes:
    num_frames: N, log-mel frames the model's front end makes of S samples.
    num_mel_bins: F.
    num_time_stripes: Kt.
    time_stripe_width: maximum stripe width in frames (width ~ U{0..max}).
    num_freq_stripes: Kf.
    freq_stripe_width: maximum stripe width in mel bins.
  """

  num_frames: int
  num_mel_bins: int
  num_time_stripes: int = 2
  time_stripe_width: int = 64
  num_freq_stripes: int = 2
  freq_stripe_width: int = 8


@dataclasses.dataclass(frozen=True)
class InputConfig:
  """What the pipelines read and how (built from `config.data` by `data.input_config`).

  Attributes:
    data_dir: the TFDS data dir given to `python -m data_pipelines.prepare --data_dir`.
    dataset: 'clotho', 'audiocaps' or 'synthcaps'.
    config: the builder config, e.g. '32k' or 'demo_32k'.
    sample_rate: Hz; must equal the prepared records' rate (checked).
    crop_seconds: S = round(crop_seconds * sample_rate).
    tokenizer_path: folder with the text tower's tokenizer files.
    max_text_len: M, tokens per caption including special tokens.
    pad_mode: clips shorter than S: 'zeros' (pad at the end) or 'repeat' (tile the clip).
    eval_crop: 'head', 'center' or 'windows' (module docstring).
    window_hop_seconds: seconds between window starts with 'windows' (0 = crop_seconds).
    eval_max_windows: cap on windows per clip with 'windows' (None = no cap).
    specaug: SpecAugment stripes for training, None = off.
    num_threads: threads per process (or per worker process), each assembling a batch.
    prefetch_batches: batches buffered per process / worker (at least num_threads).
  """

  data_dir: str
  dataset: str
  config: str
  sample_rate: int
  tokenizer_path: str
  crop_seconds: float = 10.0
  max_text_len: int = 32
  pad_mode: str = "zeros"
  eval_crop: str = "head"
  window_hop_seconds: float = 0.0
  eval_max_windows: int | None = None
  specaug: SpecAugmentConfig | None = None
  num_threads: int = 2
  prefetch_batches: int = 2

  @property
  def num_samples(self) -> int:
    return int(round(self.crop_seconds * self.sample_rate))

  def __post_init__(self):
    if self.pad_mode not in policy.PAD_MODES:
      raise ValueError(f"pad_mode must be one of {policy.PAD_MODES}, got {self.pad_mode!r}")
    if self.eval_crop not in policy.EVAL_CROPS:
      raise ValueError(f"eval_crop must be one of {policy.EVAL_CROPS}, got {self.eval_crop!r}")


def dataset_dir(data_dir: os.PathLike | str, dataset: str, config: str) -> pathlib.Path:
  """The newest prepared version folder, or a FileNotFoundError saying how to prepare it."""
  root = pathlib.Path(data_dir) / dataset / config
  versions = []
  if root.is_dir():
    for p in root.iterdir():
      if tfds.core.Version.is_valid(p.name) and (p / "dataset_info.json").is_file():
        versions.append(tfds.core.Version(p.name))
  if not versions and dataset == "folder":  # the config name is a hash of the folder_* fields
    raise FileNotFoundError(
        f"no prepared {dataset}/{config} in {data_dir}: expected {root}/<version>/"
        "dataset_info.json. Let the training prepare your folder "
        "(--config.data.prepare_if_missing=True with config.data.manual_dir), or run "
        f"python -m data_pipelines.prepare --dataset=folder --config={config.split('_')[-1]} "
        f"--manual_dir=/path/to/your/folder --data_dir={data_dir} with --folder_* flags equal "
        "to the config's folder_* fields")
  if not versions:
    manual = "" if dataset == "synthcaps" else " --manual_dir=/path/to/your/download"
    raise FileNotFoundError(
        f"no prepared {dataset}/{config} in {data_dir}: expected "
        f"{root}/<version>/dataset_info.json and {dataset}-<split>.array_record-* files. "
        f"Prepare it with:\n  python -m data_pipelines.prepare --dataset={dataset} "
        f"--config={config}{manual} --data_dir={data_dir}")
  return root / str(max(versions))


class ClipSource(grain.sources.RandomAccessDataSource):
  """A prepared split as a picklable random-access source of decoded clip dicts.

  Opens the TFDS array_record files lazily in each process (Grain workers get a pickled
  copy). Items: clip_id int, captions list[str], audio int16 [L] (absent when
  `with_audio=False`, which skips decoding it), clip_name str, file_name str, metadata dict,
  label str and label_index int ('' and -1 unless the records come from a labels folder).
  `classes` is the dataset's sorted class list (`label_index` indexes it; [] without labels).
  """

  def __init__(self, data_dir: os.PathLike | str, dataset: str, config: str, split: str,
               *, with_audio: bool = True):
    self.path = dataset_dir(data_dir, dataset, config)
    self.split = split
    self.with_audio = with_audio
    info = json.loads((self.path / "dataset_info.json").read_text(encoding="utf-8"))
    splits = {s["name"]: s for s in info.get("splits", [])}
    if split not in splits:
      raise ValueError(f"{self.path} has no split {split!r}; it has {sorted(splits)}. "
                       "Prepare that split (its CSV must be in --manual_dir).")
    self._len = sum(int(n) for n in splits[split].get("shardLengths", []))
    metadata = self.path / "metadata.json"
    metadata = json.loads(metadata.read_text()) if metadata.is_file() else {}
    self.sample_rate = metadata.get("sample_rate")
    self.classes = list(metadata.get("classes", []))
    self._source = None

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_source"] = None
    return state

  def _open(self):
    if self._source is None:
      builder = tfds.builder_from_directory(str(self.path))
      decoders = None if self.with_audio else {"audio": tfds.decode.SkipDecoding()}
      self._source = builder.as_data_source(split=self.split, decoders=decoders)
    return self._source

  def __len__(self) -> int:
    return self._len

  def without_audio(self) -> ClipSource:
    """The same records with the audio left undecoded (raw bytes) and dropped."""
    copy = ClipSource.__new__(ClipSource)
    copy.__dict__.update(self.__getstate__())
    copy.with_audio = False
    return copy

  def _convert(self, record: dict) -> dict:
    out = {
        "clip_id": int(record["clip_index"]),
        "captions": [c.decode("utf-8") for c in record["captions"]],
        "clip_name": record["clip_id"].decode("utf-8"),
        "file_name": record["file_name"].decode("utf-8"),
        "metadata": json.loads(record["metadata"].decode("utf-8") or "{}"),
        "label": record["label"].decode("utf-8") if "label" in record else "",
        "label_index": int(record.get("label_index", -1)),
    }
    if self.with_audio:
      out["audio"] = record["audio"]
    return out

  def __getitem__(self, index) -> dict:
    return self._convert(self._open()[int(index)])

  def __getitems__(self, indices) -> list[dict]:
    return [self._convert(r) for r in self._open().__getitems__([int(i) for i in indices])]

  def __repr__(self) -> str:
    return f"ClipSource({self.path}, split={self.split!r})"


def open_source(cfg: InputConfig, split: str, *, with_audio: bool = True) -> ClipSource:
  """The split's records, checked against the configured sample rate."""
  source = ClipSource(cfg.data_dir, cfg.dataset, cfg.config, split, with_audio=with_audio)
  if source.sample_rate is not None and source.sample_rate != cfg.sample_rate:
    raise ValueError(
        f"{source.path} holds audio at {source.sample_rate} Hz but the input config asks for "
        f"{cfg.sample_rate} Hz; use a config prepared at that rate (e.g. "
        f"--config={policy.rate_name(cfg.sample_rate)}) or change sample_rate")
  return source


def crop_or_pad(audio_L: np.ndarray, num_samples: int, start: int,
                pad_mode: str = "zeros") -> tuple[np.ndarray, int]:
  """int16 clip -> (float32 [S] from `start`, samples that are not zero padding).

  The crop/pad policy is `data_pipelines.policy.fit_clip`; only the int16 scaling is here.
  """
  audio_S, valid = policy.fit_clip(audio_L, num_samples, start=start, pad_mode=pad_mode)
  return audio_S.astype(np.float32) * _INT16_SCALE, valid


def sample_stripes(rng: np.random.Generator, count: int, max_width: int,
                   size: int) -> np.ndarray:
  """`count` (start, width) rows, width ~ U{0..max_width}, start ~ U{0..size - width}."""
  width = rng.integers(0, min(max_width, size) + 1, size=count)
  start = rng.integers(0, size - width + 1)
  return np.stack([start, width], axis=-1).astype(np.int32)


class TrainTransform(grain.transforms.RandomMap):
  """Record -> training example (random crop, one caption, SpecAugment stripes)."""

  def __init__(self, cfg: InputConfig, tokenizer: tokenizer_lib.Tokenizer):
    self.cfg = cfg
    self.tokenizer = tokenizer

  def random_map(self, record: dict, rng: np.random.Generator) -> dict:
    cfg = self.cfg
    s = cfg.num_samples
    audio = record["audio"]
    start = policy.crop_start(len(audio), s, "random", rng)
    audio_S, length = crop_or_pad(audio, s, start, cfg.pad_mode)
    k = int(rng.integers(len(record["captions"])))
    ids_M, mask_M = self.tokenizer.encode_one(record["captions"][k])
    out = {"audio": audio_S, "audio_length": np.int32(length), "input_ids": ids_M,
           "attention_mask": mask_M, "clip_id": np.int32(record["clip_id"]),
           "caption_index": np.int32(k)}
    if record["label_index"] >= 0:
      out["group_id"] = np.int32(record["label_index"])
    if cfg.specaug is not None:
      a = cfg.specaug
      out["specaug_time"] = sample_stripes(rng, a.num_time_stripes, a.time_stripe_width,
                                           a.num_frames)
      out["specaug_freq"] = sample_stripes(rng, a.num_freq_stripes, a.freq_stripe_width,
                                           a.num_mel_bins)
    return out


def positive_ids(batch: dict):
  """[B] ids whose equal values make (audio, caption) rows positives of each other: the class
  (`group_id`) in a labels folder's batches, else the clip (`clip_id`)."""
  return batch["group_id"] if "group_id" in batch else batch["clip_id"]


def make_train_dataset(cfg: InputConfig, *, seed: int, batch_size: int,
                       split: str = "train", shard_index: int = 0, shard_count: int = 1,
                       num_workers: int = 0, num_epochs: int | None = None,
                       source: ClipSource | None = None) -> grain.IterDataset:
  """The training pipeline as a Grain `IterDataset` (see the module docstring).

  Args:
    cfg: the input config.
    seed: the pipeline's seed, in [0, 2**32).
    batch_size: examples per batch of this process.
    split: the split to train on.
    shard_index: this process (`jax.process_index()`).
    shard_count: the number of processes (`jax.process_count()`).
    num_workers: Grain worker processes (0 = threads in this process); the batches do not
      depend on it.
    num_epochs: None = repeat forever.
    source: the records (default: `open_source(cfg, split)`).

  Returns:
    An IterDataset of batches; `iter()` gives a checkpointable `grain.DatasetIterator`.
  """
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
  source = source if source is not None else open_source(cfg, split)
  if len(source) == 0:
    raise ValueError(f"{source} is empty")
  tok = tokenizer_lib.Tokenizer(cfg.tokenizer_path, cfg.max_text_len)
  ds = grain.MapDataset.source(source).seed(seed)
  ds = ds.shuffle().repeat(num_epochs)
  # Randomness before sharding: a record's crop and caption depend on its place in the
  # global stream, not on how many processes share it.
  ds = ds.random_map(TrainTransform(cfg, tok))
  # Batch, then deal whole batches to processes: a global batch is a contiguous block of the
  # stream in the same order for any number of processes (dropout masks follow the row).
  ds = ds.batch(batch_size, drop_remainder=True)
  if num_epochs is not None:
    # Every process must yield the same number of batches.
    ds = ds[:len(ds) // shard_count * shard_count]
  ds = ds[shard_index::shard_count]
  return _prefetch(ds, cfg, num_workers)


def _prefetch(ds: grain.MapDataset, cfg: InputConfig, num_workers: int) -> grain.IterDataset:
  # The batch is the unit of work of a thread and of a worker process, so batches are the
  # same whatever num_threads and num_workers are.
  ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=cfg.num_threads,
      prefetch_buffer_size=max(cfg.num_threads, cfg.prefetch_batches)))
  if num_workers > 0:
    if not flags.FLAGS.is_parsed():
      # Grain's worker processes read absl flags (profiling switches); a program that never
      # ran absl's app.run (a test, a notebook) gets the flag defaults.
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=cfg.prefetch_batches))
  return ds


def make_train_loader(cfg: InputConfig, **kwargs) -> grain.DatasetIterator:
  """`iter(make_train_dataset(cfg, **kwargs))`: a checkpointable iterator of train batches.

  Save `it.get_state()` (or pass `it` to orbax via `grain.checkpoint.CheckpointSave`) and
  restore it into a fresh iterator built with the same arguments with `it.set_state(state)`.
  """
  return iter(make_train_dataset(cfg, **kwargs))


@dataclasses.dataclass(frozen=True)
class _Row:
  position: int  # record index in the split; -1 = padding row
  start: int
  window: int


class _EvalAudioRows(grain.sources.RandomAccessDataSource):
  """Evaluation rows (clip window) -> example dicts; picklable."""

  def __init__(self, source: ClipSource, rows: list[_Row], num_samples: int, pad_mode: str):
    self.source = source
    self.rows = rows
    self.num_samples = num_samples
    self.pad_mode = pad_mode

  def __len__(self) -> int:
    return len(self.rows)

  def __getitem__(self, index) -> dict:
    row = self.rows[int(index)]
    if row.position < 0:
      return {"audio": np.zeros(self.num_samples, np.float32), "audio_length": np.int32(0),
              "clip_id": np.int32(-1), "window_index": np.int32(0), "valid": np.int32(0)}
    record = self.source[row.position]
    audio_S, length = crop_or_pad(record["audio"], self.num_samples, row.start, self.pad_mode)
    return {"audio": audio_S, "audio_length": np.int32(length),
            "clip_id": np.int32(record["clip_id"]), "window_index": np.int32(row.window),
            "valid": np.int32(1)}


def clip_lengths(source: ClipSource) -> np.ndarray:
  """Samples per clip (reads every record once; audio bytes are not decoded)."""
  raw = source.without_audio()._open()  # pylint: disable=protected-access
  return np.array([len(raw[i]["audio"]) // 2 for i in range(len(raw))], dtype=np.int64)


def eval_rows(lengths: np.ndarray, num_samples: int, crop: str,
              max_windows: int | None = None, hop: int | None = None) -> list[_Row]:
  """The deterministic (record, start, window) rows of the eval crop policy `crop`
  (`hop`: samples between window starts, default `num_samples`)."""
  rows = []
  for position, n in enumerate(lengths):
    n = int(n)
    if crop != "windows":
      rows.append(_Row(position, policy.crop_start(n, num_samples, crop), 0))
      continue
    starts = policy.window_starts(n, num_samples, hop or num_samples, max_windows)
    rows += [_Row(position, start, w) for w, start in enumerate(starts)]
  return rows


def _pad_and_shard(rows: list, batch_size: int, shard_index: int, shard_count: int,
                   pad) -> list:
  per_process = -(-len(rows) // shard_count)
  per_process = -(-per_process // batch_size) * batch_size
  rows = rows + [pad] * (per_process * shard_count - len(rows))
  return rows[shard_index::shard_count]


def make_eval_audio_loader(cfg: InputConfig, *, split: str, batch_size: int,
                           shard_index: int = 0, shard_count: int = 1,
                           num_workers: int = 0, source: ClipSource | None = None
                           ) -> grain.IterDataset:
  """Every clip of `split` (per `cfg.eval_crop`) in fixed-shape batches, deterministically.

  Returns:
    An IterDataset of batches {audio float32 [B, S], audio_length int32 [B], clip_id int32
    [B] (-1 on padding), window_index int32 [B], valid int32 [B]}. Every process yields
    the same number of batches; rows are dealt to processes round-robin.
  """
  source = source if source is not None else open_source(cfg, split)
  s = cfg.num_samples
  if cfg.eval_crop == "head":
    lengths = np.zeros(len(source), np.int64)  # 'head' needs no lengths
  else:
    lengths = clip_lengths(source)
  hop = policy.hop_samples(s, cfg.window_hop_seconds, cfg.sample_rate)
  rows = eval_rows(lengths, s, cfg.eval_crop, cfg.eval_max_windows, hop)
  rows = _pad_and_shard(rows, batch_size, shard_index, shard_count, _Row(-1, 0, 0))
  ds = grain.MapDataset.source(_EvalAudioRows(source, rows, s, cfg.pad_mode))
  ds = ds.batch(batch_size, drop_remainder=False)
  return _prefetch(ds, cfg, num_workers)


@dataclasses.dataclass(frozen=True)
class EvalCaptions:
  """Every caption of a split, in record order then caption order.

  Attributes:
    texts: T captions.
    clip_id: int32 [T], the stable clip id each caption belongs to.
    caption_index: int32 [T], the caption's position among its clip's captions.
    input_ids: int32 [T, M].
    attention_mask: int32 [T, M].
    clip_ids: int32 [A], the split's clip ids in record order (the audio side's order).
    clip_names: A clip names (Clotho file names, AudioCaps `{ytid}_{start}`), to log.
    labels: A class names in record order (a labels folder), or None.
    classes: the dataset's sorted class list ([] without labels).
  """

  texts: list[str]
  clip_id: np.ndarray
  caption_index: np.ndarray
  input_ids: np.ndarray
  attention_mask: np.ndarray
  clip_ids: np.ndarray
  clip_names: list[str]
  labels: list[str] | None = None
  classes: list[str] = dataclasses.field(default_factory=list)


def eval_captions(cfg: InputConfig, *, split: str,
                  source: ClipSource | None = None) -> EvalCaptions:
  """All captions of `split`, tokenised (small enough to hold: 5,225 x M for Clotho)."""
  source = (source if source is not None else open_source(cfg, split)).without_audio()
  tok = tokenizer_lib.Tokenizer(cfg.tokenizer_path, cfg.max_text_len)
  texts, clip_id, caption_index, clip_ids, names, labels = [], [], [], [], [], []
  for i in range(len(source)):
    record = source[i]
    clip_ids.append(record["clip_id"])
    names.append(record["clip_name"])
    labels.append(record["label"] if record["label_index"] >= 0 else None)
    for k, text in enumerate(record["captions"]):
      texts.append(text)
      clip_id.append(record["clip_id"])
      caption_index.append(k)
  ids_TxM, mask_TxM = tok(texts)
  return EvalCaptions(texts, np.array(clip_id, np.int32), np.array(caption_index, np.int32),
                      ids_TxM, mask_TxM, np.array(clip_ids, np.int32), names,
                      labels if labels and None not in labels else None, source.classes)


def eval_caption_batches(captions: EvalCaptions, batch_size: int, *, shard_index: int = 0,
                         shard_count: int = 1) -> Iterator[dict]:
  """Fixed-shape text batches {input_ids, attention_mask, clip_id, caption_row, valid}.

  `caption_row` indexes `captions.texts` (-1 on padding); every process yields the same
  number of batches.
  """
  rows = _pad_and_shard(list(range(len(captions.texts))), batch_size, shard_index,
                        shard_count, -1)
  for b in range(0, len(rows), batch_size):
    idx = np.array(rows[b:b + batch_size])
    valid = idx >= 0
    safe = np.where(valid, idx, 0)
    yield {"input_ids": np.where(valid[:, None], captions.input_ids[safe], 0),
           "attention_mask": np.where(valid[:, None], captions.attention_mask[safe], 0),
           "clip_id": np.where(valid, captions.clip_id[safe], -1).astype(np.int32),
           "caption_row": idx.astype(np.int32), "valid": valid.astype(np.int32)}


def apply_spec_augment(mel_BxNxF, specaug_time_BxKx2, specaug_freq_BxKx2,
                       fill_value: float = 0.0):
  """Masks the stripes (sampled on host, see `SpecAugmentConfig`) of a log-mel on device.

  Args:
    mel_BxNxF: log-mel, frames by mel bins.
    specaug_time_BxKx2: (start frame, width) rows; width 0 masks nothing.
    specaug_freq_BxKx2: (start bin, width) rows.
    fill_value: the value of masked cells (0 as in torchlibrosa's SpecAugmentation).

  Returns:
    The masked log-mel, same shape and dtype.
  """
  n_N = jnp.arange(mel_BxNxF.shape[1])
  f_F = jnp.arange(mel_BxNxF.shape[2])

  def stripes(pos, rows_BxKx2):
    start_BxKx1 = rows_BxKx2[..., 0:1]
    end_BxKx1 = start_BxKx1 + rows_BxKx2[..., 1:2]
    return ((pos >= start_BxKx1) & (pos < end_BxKx1)).any(axis=1)

  time_BxN = stripes(n_N, specaug_time_BxKx2)
  freq_BxF = stripes(f_F, specaug_freq_BxKx2)
  masked_BxNxF = time_BxN[:, :, None] | freq_BxF[:, None, :]
  return jnp.where(masked_BxNxF, jnp.asarray(fill_value, mel_BxNxF.dtype), mel_BxNxF)
