"""From `config.data` to the Grain pipelines of `input_pipeline` (training and evaluation).

The trainer, `eval` and the tests get their data here, so the config -> InputConfig wiring and
the "dataset missing" message exist once.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib

import jax
import ml_collections
import numpy as np

from hade_jax import config_schema, hade, input_pipeline
from hade_jax import tokenizer as tokenizer_lib

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Dataset:
  """A prepared dataset: its InputConfig, its splits and their sizes."""

  input_cfg: input_pipeline.InputConfig
  splits: dict[str, int]  # split -> number of clips

  @property
  def num_train_clips(self) -> int:
    return self.splits.get("train", 0)


def builder_config_name(config: ml_collections.ConfigDict) -> str:
  if config.data.dataset == "synthcaps" and config.data.synth_size:
    return f"{config.data.synth_size}_{config.data.builder_config}"
  if config.data.dataset == "folder":
    return data_config(config).folder_spec().config_name(config.data.builder_config)
  return config.data.builder_config


def data_config(config: ml_collections.ConfigDict) -> config_schema.DataConfig:
  """config.data as its checked dataclass."""
  return config_schema.DataConfig(**config.data.to_dict())


def input_config(config: ml_collections.ConfigDict, cfg: hade.HadeConfig
                 ) -> input_pipeline.InputConfig:
  d = config.data
  specaug = None
  if d.spec_augment:
    num_samples = int(round(d.crop_seconds * cfg.mel.sample_rate))
    specaug = input_pipeline.SpecAugmentConfig(
        num_frames=cfg.mel.num_frames(num_samples), num_mel_bins=cfg.mel.n_mels,
        num_time_stripes=d.spec_time_stripes, time_stripe_width=d.spec_time_width,
        num_freq_stripes=d.spec_freq_stripes, freq_stripe_width=d.spec_freq_width)
  if not d.tokenizer_dir:
    raise ValueError("config.data.tokenizer_dir is empty: point it at the text tower's "
                     "tokenizer folder (tokenizer.json or vocab.txt)")
  return input_pipeline.InputConfig(
      data_dir=str(pathlib.Path(d.data_dir).expanduser()), dataset=d.dataset,
      config=builder_config_name(config), sample_rate=cfg.mel.sample_rate,
      tokenizer_path=str(pathlib.Path(d.tokenizer_dir).expanduser()),
      crop_seconds=d.crop_seconds, max_text_len=d.max_text_len, pad_mode=d.pad_mode,
      eval_crop=d.eval_crop, window_hop_seconds=d.window_hop_seconds, specaug=specaug,
      num_threads=d.num_threads)


def open_dataset(config: ml_collections.ConfigDict, cfg: hade.HadeConfig) -> Dataset:
  """Opens the prepared dataset; prepares synthcaps first when the config allows it.

  A missing dataset fails at once with the folder looked in, the files expected and the
  prepare command (input_pipeline.dataset_dir).
  """
  icfg = input_config(config, cfg)
  try:
    input_pipeline.dataset_dir(icfg.data_dir, icfg.dataset, icfg.config)
  except FileNotFoundError:
    if not (config.data.prepare_if_missing and icfg.dataset in ("synthcaps", "folder")):
      raise
    if icfg.dataset == "folder":
      _prepare_folder(config, icfg)
    else:
      _prepare_synthcaps(config, icfg)
  splits = {}
  for split in (config.data.train_split, config.data.eval_split, config.data.test_split):
    if split:
      try:
        splits[split] = len(input_pipeline.open_source(icfg, split, with_audio=False))
      except ValueError:
        if split == config.data.train_split:
          raise
  return Dataset(icfg, splits)


def _prepare_synthcaps(config, icfg: input_pipeline.InputConfig) -> None:
  from data_pipelines import builders  # lazily: only the demo prepares data in-process

  log.info("preparing synthcaps/%s in %s (first run only)", icfg.config, icfg.data_dir)
  rate_name = config.data.builder_config
  b = builders.prepare(
      "synthcaps", builders.synth_config(config.data.synth_size, builders.RATES[rate_name]),
      data_dir=icfg.data_dir)
  if getattr(b, "summary", None):
    log.info("synthcaps prepared: %s", {k: v for k, v in b.summary.items()
                                        if isinstance(v, int | float | str)})


def _prepare_folder(config, icfg: input_pipeline.InputConfig) -> None:
  from data_pipelines import builders  # lazily: only a config that asks prepares in-process

  d = config.data
  if not d.manual_dir:
    raise ValueError("config.data.manual_dir is empty: point it at the folder holding your "
                     "audio and CSV(s) (dataset='folder')")
  manual_dir = pathlib.Path(d.manual_dir).expanduser()
  log.info("preparing folder/%s from %s in %s (first run only)", icfg.config, manual_dir,
           icfg.data_dir)
  b = builders.prepare("folder", builders.folder_config(data_config(config).folder_spec(),
                                                        icfg.sample_rate),
                       data_dir=icfg.data_dir, manual_dir=manual_dir, progress=False)
  if getattr(b, "summary", None):
    counts = {s: v["clips"] for s, v in b.summary["splits"].items()}
    log.info("folder prepared: clips %s, problems %s (%s)", counts, b.summary["issue_counts"],
             pathlib.Path(b.data_path) / builders.REPORT_FILENAME)


class TrainIterator:
  """The training batches of this process; `checkpointable` goes into orbax checkpoints."""

  def __init__(self, config: ml_collections.ConfigDict, ds: Dataset, local_batch: int):
    self.checkpointable = input_pipeline.make_train_loader(
        ds.input_cfg, seed=config.seed, batch_size=local_batch, split=config.data.train_split,
        shard_index=jax.process_index(), shard_count=jax.process_count(),
        num_workers=config.data.num_workers)

  def __iter__(self):
    return self

  def close(self) -> None:
    """Stops the Grain threads and worker processes (they outlive the run otherwise)."""
    self.checkpointable.close()

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self.checkpointable)
    return {k: batch[k] for k in ("audio", "input_ids", "attention_mask", "clip_id",
                                  "group_id", "specaug_time", "specaug_freq") if k in batch}


@dataclasses.dataclass
class EvalSplit:
  """What evaluation needs of a split: audio batches (re-iterable), captions, clip order."""

  audio_batches: object  # callable () -> iterator of {audio, clip_id, valid}
  input_ids: np.ndarray  # [T, M]
  attention_mask: np.ndarray  # [T, M]
  caption_clip: np.ndarray  # [T] index of each caption's clip in `clip_ids` order
  clip_ids: np.ndarray  # [A]
  clip_names: list[str]
  texts: list[str]
  # A labels folder: A class names in clip order (zero-shot classification reads them), the
  # dataset's sorted class list, and [A] class indices into it; T2A is then class-level.
  labels: list[str] | None = None
  classes: list[str] = dataclasses.field(default_factory=list)
  tokenize: object = None  # a labels split: the text tower's tokenizer, for zero-shot prompts

  @property
  def clip_group(self) -> np.ndarray | None:
    """[A] each clip's class index in `classes` (None without labels): clips of a class
    are all relevant to a caption of it (`metrics.retrieval_metrics(clip_group_A=...)`)."""
    if self.labels is None:
      return None
    index = {name: i for i, name in enumerate(self.classes)}
    return np.array([index[name] for name in self.labels], np.int64)


def eval_split(config: ml_collections.ConfigDict, ds: Dataset, split: str, *,
               max_clips: int = 0) -> EvalSplit:
  icfg = ds.input_cfg
  source = input_pipeline.open_source(icfg, split)
  captions = input_pipeline.eval_captions(icfg, split=split, source=source)
  clip_ids = captions.clip_ids
  names = list(captions.clip_names)
  keep_T = np.ones(len(captions.texts), bool)
  if max_clips and max_clips < len(clip_ids):
    clip_ids, names = clip_ids[:max_clips], names[:max_clips]
    keep_T = np.isin(captions.clip_id, clip_ids)
  position = {int(c): i for i, c in enumerate(clip_ids)}
  caption_clip = np.array([position[int(c)] for c in captions.clip_id[keep_T]], np.int64)
  batch_size = config.eval_batch_size

  def audio_batches():
    loader = input_pipeline.make_eval_audio_loader(
        icfg, split=split, batch_size=batch_size, source=source)
    wanted, it = {int(c) for c in clip_ids}, iter(loader)
    try:
      for batch in it:
        yield batch
        # Rows come in record order (a clip's windows together): a row of a later clip means
        # every wanted clip's rows have been read.
        ids = np.asarray(batch["clip_id"])[np.asarray(batch["valid"]).astype(bool)]
        if max_clips and any(int(c) not in wanted for c in ids):
          break
    finally:  # its threads and workers stop with the pass, not when garbage collected
      it.close()

  labels = captions.labels[:len(names)] if captions.labels is not None else None
  return EvalSplit(audio_batches, captions.input_ids[keep_T], captions.attention_mask[keep_T],
                   caption_clip, np.asarray(clip_ids), names,
                   [t for t, k in zip(captions.texts, keep_T, strict=True) if k],
                   labels, list(captions.classes),
                   tokenizer_lib.Tokenizer(icfg.tokenizer_path, icfg.max_text_len)
                   if labels is not None else None)
