"""The config schema: one frozen dataclass per section, each checking itself in `__post_init__`.

`configs/base.py` builds its defaults from these dataclasses (the field comments live here);
`validation.validate_config` builds every section from a ConfigDict and collects every problem.
The model sections are the modules' own dataclasses (`htsat.HtsatConfig`, `bert.BertConfig`,
`heads.HeadsConfig`, `frontend.LogMelConfig`, `losses.LossConfig`).

Top-level keys are split by who needs them: `RunConfig` (training and inference),
`TrainConfig` and `MeshConfig` (training only: not checked when a trained model is loaded).
"""

from __future__ import annotations

import dataclasses
import math
import re

from data_pipelines import folder, policy
from hade_jax import fields, metrics


def best_metric_names() -> tuple[str, ...]:
  """The validation metrics the trainer logs whose maximum makes a best checkpoint.

  `trainer.run_eval` logs 'val/' + `metrics.retrieval_metrics` keys and `trainer.rsum`'s
  'val/{t2a,a2t}/R@1+R@5+R@10'; ranks are left out (lower is better, the best checkpoint
  keeps the maximum).
  """
  names = []
  for direction in ("t2a", "a2t"):
    names += [f"val/{direction}/R@{k}" for k in metrics.KS] + [f"val/{direction}/mAP@10"]
    names.append(f"val/{direction}/" + "+".join(f"R@{k}" for k in metrics.KS))
  return tuple(names)


def _regex(p: fields.Problems, field: str, pattern) -> None:
  if not isinstance(pattern, str):
    p.add(field, f"regex {pattern!r} is not a string")
    return
  try:
    re.compile(pattern)
  except re.error as e:
    p.add(field, f"invalid regex {pattern!r}: {e}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """config.data: what the input pipelines read and how."""

  dataset: str = "clotho"  # 'clotho', 'audiocaps', 'synthcaps' or 'folder' (TFDS builder name).
  data_dir: str = "~/tensorflow_datasets"  # where prepared TFDS datasets live.
  manual_dir: str = ""  # the raw download (only used by the prepare hint / demo auto-prepare).
  builder_config: str = "48k"  # TFDS builder config = stored sample rate; must match model.mel.
  train_split: str = "train"
  eval_split: str = "validation"  # used for periodic validation and best-model selection.
  test_split: str = "test"  # used by the final evaluation.
  crop_seconds: float = 10.0  # training: random crops (pad shorter clips); eval: see eval_crop.
  max_text_len: int = 32  # tokens per caption incl. special tokens.
  tokenizer_dir: str = ""  # folder with tokenizer.json (or vocab.txt) of the text tower.
  num_workers: int = 2  # Grain worker processes (0 = in the main process).
  spec_augment: bool = True  # SpecAugment on the log-mel (stripes sampled on host).
  spec_time_stripes: int = 2
  spec_time_width: int = 64  # max frames per time stripe.
  spec_freq_stripes: int = 2
  spec_freq_width: int = 8  # max mel bins per frequency stripe.
  # Clips shorter than the crop: 'zeros' (pad at end), 'repeat' or 'repeatpad' (policy.py).
  pad_mode: str = "zeros"
  eval_crop: str = "head"  # eval: 'head', 'center' or 'windows' of longer clips (policy.py).
  # 'windows': seconds between window starts (0 = crop_seconds: windows do not overlap).
  window_hop_seconds: float = 0.0
  num_threads: int = 2  # threads per process (or worker) assembling batches.
  prepare_if_missing: bool = False  # demo: generate + prepare synthcaps when absent.
  synth_size: str = ""  # synthcaps size ('tiny', 'demo', 'full'): builder '<size>_<rate>'.
  # dataset='folder': your own folder at manual_dir (data_pipelines/folder.py); prepared as
  # builder config '<folder_name>_<hash of the folder_* fields>_<builder_config>'.
  folder_name: str = folder.FolderSpec.name  # names the prepared set: lower-case letters, digits.
  folder_csv: str = ""  # the one CSV of all splits (rows assigned by folder_split_column)...
  folder_split_csvs: dict = dataclasses.field(  # ...or split -> its own CSV ('' = none).
      default_factory=folder.default_split_csvs)
  folder_audio_dir: str = ""  # audio folder under manual_dir ('' = manual_dir itself).
  folder_file_column: str = folder.FolderSpec.file_column  # CSV column of audio file names.
  folder_split_column: str = folder.FolderSpec.split_column  # e.g. 'fold' for ESC-50.
  folder_split_values: dict = dataclasses.field(  # split -> values of folder_split_column.
      default_factory=folder.default_split_values)
  folder_label_column: str = ""  # labels: the class-name column ('' = a captions CSV).
  folder_templates: tuple = folder.DEFAULT_TEMPLATES  # labels -> captions, '{}' = the label.

  def __post_init__(self):
    p = fields.Problems(self)
    p.types()
    p.choice("dataset", policy.DATASETS)
    p.choice("pad_mode", policy.PAD_MODES)
    p.choice("eval_crop", policy.EVAL_CROPS)
    if p.positive("crop_seconds") and p.at_least("window_hop_seconds", 0.0):
      p.at_most("window_hop_seconds", self.crop_seconds,
                "crop_seconds: longer hops would skip audio; 0 = the crop")
    for name in ("num_workers", "spec_time_stripes", "spec_time_width", "spec_freq_stripes",
                 "spec_freq_width"):
      p.at_least(name, 0)
    p.positive("num_threads")
    if fields.is_int(self.max_text_len) and self.max_text_len < 3:
      p.add("max_text_len", f"must be >= 3 ([CLS], one token, [SEP]), got {self.max_text_len}")
    if self.dataset == "synthcaps":
      p.choice("synth_size", ("", *policy.SYNTH_SIZES))
    if self.dataset == "folder" and not any(p.bad(f.name) for f in dataclasses.fields(self)
                                            if f.name.startswith("folder_")):
      try:
        self.folder_spec()
      except (TypeError, ValueError) as e:
        p.add("folder_csv", f"the folder_* fields do not describe a folder: {e}")
    if isinstance(self.builder_config, str) and self.sample_rate is None:
      p.add("builder_config", f"{self.builder_config!r} names no sample rate; known: "
            f"{', '.join(policy.RATES)} (or '<rate>_v2' for AudioCaps 2.0 captions)")
    p.raise_any()

  def folder_spec(self) -> folder.FolderSpec:
    """The folder_* fields as the `folder` builder's spec (ValueError when inconsistent)."""
    values = {k: tuple(str(x) for x in v) for k, v in dict(self.folder_split_values).items()}
    return folder.FolderSpec(
        name=self.folder_name, csv=self.folder_csv, split_csvs=dict(self.folder_split_csvs),
        audio_dir=self.folder_audio_dir, file_column=self.folder_file_column,
        split_column=self.folder_split_column, split_values=values,
        label_column=self.folder_label_column, templates=tuple(self.folder_templates))

  @property
  def sample_rate(self) -> int | None:
    """The rate the prepared records store (from `builder_config`)."""
    return policy.builder_rate(self.builder_config)


@dataclasses.dataclass(frozen=True)
class InitConfig:
  """config.init. Resume order: workdir checkpoint > init.resume > imports > scratch."""

  resume: str = ""  # a checkpoint directory to start from (state only, new data order).
  text_tower: str = ""  # local HF folder (BERT/RoBERTa) imported into the text tower.
  audio_tower: str = ""  # local HF ClapAudioModel folder imported into the audio tower.
  clap: str = ""  # local HF ClapModel folder: both towers + their projections.

  def __post_init__(self):
    p = fields.Problems(self)
    p.types()
    p.raise_any()


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """config.optim: AdamW per parameter group, warmup then cosine decay."""

  # Ordered (regex over parameter paths, group); first match wins.
  groups: tuple = (("^(audio_encoder|text_encoder)/", "backbone"), (".*", "heads"))
  lr: dict = dataclasses.field(  # peak learning rate per group.
      default_factory=lambda: {"backbone": 5e-5, "heads": 1e-4})
  weight_decay: dict = dataclasses.field(
      default_factory=lambda: {"backbone": 0.01, "heads": 0.2})
  frozen: tuple = ()  # groups that get no update, e.g. ('backbone',).
  warmup_epochs: float = 1.0  # linear warmup, then cosine decay to end_factor * peak.
  end_factor: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8  # Adam's epsilon.
  clip_norm: float = 2.0  # global gradient-norm clip (0 = off).
  accum_steps: int = 1  # gradient accumulation (optax.MultiSteps); negatives stay per step.

  def __post_init__(self):
    p = fields.Problems(self)
    p.types()
    names = self._group_names(p)
    for field in ("lr", "weight_decay"):
      self._check_rates(p, field, names)
    if names:
      known = ", ".join(sorted(names))
      frozen = set(self.frozen) if fields.is_seq(self.frozen) else set()
      for group in sorted(frozen - names, key=str):
        p.add("frozen", f"{group!r} is not a group of config.optim.groups ({known})")
      if isinstance(self.lr, dict):
        for group in sorted(names - frozen - set(self.lr)):
          p.add("lr", f"no learning rate for group {group!r} (trained: it is not in "
                "config.optim.frozen)")
    p.within("b1", 0, 1)
    p.within("b2", 0, 1)
    p.positive("eps")
    for name in ("warmup_epochs", "end_factor", "clip_norm"):
      p.at_least(name, 0)
    p.raise_any()

  def _group_names(self, p: fields.Problems) -> set[str]:
    names: set[str] = set()
    if not fields.is_seq(self.groups):
      return names
    if not self.groups:
      p.add("groups", "is empty; every parameter needs a group")
    for i, rule in enumerate(self.groups):
      if not fields.is_seq(rule) or len(rule) != 2:
        p.add(f"groups[{i}]", f"expected a (regex, group name) pair, got {rule!r}")
        continue
      pattern, name = rule
      _regex(p, f"groups[{i}]", pattern)
      if not isinstance(name, str) or not name:
        p.add(f"groups[{i}]", f"group name {name!r} is not a non-empty string")
      else:
        names.add(name)
    return names

  def _check_rates(self, p: fields.Problems, field: str, names: set[str]) -> None:
    """A mapping group name -> finite number >= 0, over the groups that exist."""
    mapping = getattr(self, field)
    if not isinstance(mapping, dict):
      if not p.bad(field):
        p.add(field, f"expected a ConfigDict of group name -> number, got {mapping!r}")
      return
    for group, x in mapping.items():
      if not fields.is_real(x) or not math.isfinite(x):
        p.add(f"{field}.{group}", f"expected a finite number, got {fields.type_name(x)} {x!r}")
      elif x < 0:
        p.add(f"{field}.{group}", f"must be >= 0, got {x!r}")
      elif names and group not in names:
        p.add(f"{field}.{group}", f"unknown group; config.optim.groups has "
              f"{', '.join(sorted(names))}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Top-level keys that training and inference (evaluation, search, the API) both read."""

  seed: int = 0  # Everything random derives from it: init, shuffle, crops, dropout, SpecAugment.
  compute_dtype: str = "float32"  # 'bfloat16' runs both towers in bf16 (params stay float32).
  eval_batch_size: int = 64  # clips / captions per encoder call at evaluation.
  eval_tile: int = 256  # (clips x captions) tile edge for the pairwise score.
  eval_max_clips: int = 0  # validate on the first N clips only (0 = all).

  def __post_init__(self):
    p = fields.Problems(self)
    p.types()
    p.dtype("compute_dtype")
    p.positive("eval_batch_size")
    p.positive("eval_tile")
    p.at_least("eval_max_clips", 0)
    p.raise_any()


# `jax.random.key(..., impl=...)` names for the dropout masks (`TrainConfig.dropout_rng`).
# threefry2x32 (JAX's default): the same masks on any device count, CPU, GPU and TPU, each
# device drawing only its shard's masks (`layers.keep_mask` draws JAX's bits in a loop of
# cache-sized chunks: on a CPU 3.3x faster than rbg, BENCHMARKS.md). rbg (XLA's
# RngBitGenerator, threefry for fold_in): also the same masks on 1 and 8 devices of one
# platform (not across platforms), but XLA draws the whole array on every device and slices
# it, so on a data-parallel mesh each device pays for the global batch. unsafe_rbg is left
# out: its fold_in, which every step's key and every dropout call use, is not exact.
DROPOUT_RNGS = ("threefry2x32", "rbg")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Top-level keys of training: length, batch, checkpoints, logging, non-finite steps."""

  batch_size: int = 128  # global batch (all processes); divides over the 'data' x 'fsdp' axes.
  num_epochs: float = 30.0  # training length in epochs of the train split...
  total_steps: int = -1  # ...or in steps when > 0 (overrides num_epochs).
  # A step whose loss, gradient or updated state is NaN/Inf: False = stop with NonFiniteError
  # (the checkpoints hold earlier steps); True = skip it (keep parameters, optimizer state and
  # batch-norm statistics; the data moves on), counted in train/skipped_steps (checkpointed).
  skip_nonfinite_steps: bool = False
  max_consecutive_skips: int = 10  # ...and stop after N skipped steps in a row (0 = never).
  checkpoint_every_steps: int = 1000
  keep_checkpoints: int = 3  # the last N steps; the best step is kept apart in workdir/best.
  best_metric: str = "val/t2a/R@1+R@5+R@10"  # model selection, docs/method.md s7 ("": none)
  log_every_steps: int = 50  # console + metrics.jsonl + TensorBoard.
  eval_every_steps: int = 1000  # validation retrieval metrics (0 = only at the end).
  final_eval_split: str = "test"  # evaluated with the best checkpoint at the end ('' = none).
  # Two-stage search measured at every evaluation: the T2A recall a global-cosine shortlist of
  # each size keeps and loses ('two_stage@S/t2a/R@10/lost', hade_jax/evaluator.py).
  eval_shortlists: tuple = (50, 100)
  max_steps_per_run: int = 0  # stop cleanly (with a checkpoint) after N steps of this run.
  log_batch_ids: bool = False  # write each step's clip ids to batches.jsonl (data-order checks).
  # Resuming a workdir whose checkpoint was saved with another seed, optimizer, loss or training
  # data: refused unless True (then logged); model changes are always refused
  # (hade_jax/config_change.py).
  allow_config_change: bool = False
  # The JAX PRNG of the dropout (and stochastic-depth) masks, one of DROPOUT_RNGS (threefry2x32
  # is also the faster one on a CPU; with rbg, sharded, every device draws the whole batch's).
  dropout_rng: str = "threefry2x32"
  # The train command makes glibc's malloc keep the host memory it frees, so a CPU step reuses
  # its pages instead of faulting in GiBs of fresh ones (resident size stays at its peak). Off:
  # it sped up the benchmark's batch-8 step but slowed the demo 1.29x (hade_jax/host_memory.py).
  # No effect on the numbers.
  keep_freed_memory: bool = False

  def __post_init__(self):
    p = fields.Problems(self)
    p.types()
    p.choice("dropout_rng", DROPOUT_RNGS)
    p.positive("batch_size")
    if not p.bad("num_epochs") and not p.bad("total_steps"):
      if not math.isfinite(self.num_epochs):
        p.add("num_epochs", f"must be finite, got {self.num_epochs!r}")
      elif self.total_steps <= 0 and self.num_epochs <= 0:
        p.add("num_epochs", f"{self.num_epochs} with config.total_steps={self.total_steps}: "
              "no training length (set num_epochs > 0, or total_steps > 0)")
    p.positive("checkpoint_every_steps")
    p.positive("log_every_steps")
    for name in ("eval_every_steps", "max_steps_per_run", "max_consecutive_skips"):
      p.at_least(name, 0)
    if not p.bad("eval_shortlists") and not all(
        fields.is_int(s) and s >= 1 for s in self.eval_shortlists):
      p.add("eval_shortlists", f"expected shortlist sizes >= 1, e.g. (50, 100), got "
            f"{self.eval_shortlists!r}")
    if fields.is_int(self.keep_checkpoints) and self.keep_checkpoints < 1:
      p.add("keep_checkpoints", f"must be >= 1 (the last step is needed to resume), got "
            f"{self.keep_checkpoints}")
    best = self.best_metric
    if isinstance(best, str) and best and best not in best_metric_names():
      p.add("best_metric", f"{best!r} is not a validation metric the trainer maximises; "
            f"choose one of {', '.join(best_metric_names())} (or '' for none)")
    p.raise_any()


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Top-level keys of the device layout (`hade_jax/sharding.py`)."""

  mesh: tuple = (("data", -1), ("fsdp", 1))  # -1 = all remaining devices.
  sharding_rules: tuple = ((".*", "fsdp"),)  # (regex, spec): 'fsdp', 'replicate' or axes.

  def __post_init__(self):
    p = fields.Problems(self)
    p.types()
    if fields.is_seq(self.sharding_rules):
      for i, rule in enumerate(self.sharding_rules):
        if not fields.is_seq(rule) or len(rule) != 2:
          p.add(f"sharding_rules[{i}]", f"expected a (regex, spec) pair, got {rule!r}")
          continue
        pattern, spec = rule
        _regex(p, f"sharding_rules[{i}]", pattern)
        if spec is None or spec in ("fsdp", "replicate"):
          continue
        if not fields.is_seq(spec) or not all(a is None or isinstance(a, str) for a in spec):
          p.add(f"sharding_rules[{i}]", f"spec {spec!r} is not 'fsdp', 'replicate' or a "
                "tuple of mesh axis names / None")
    p.raise_any()


# Top-level sections (their fields are top-level keys) and nested sections (config.<name>).
TOP_SECTIONS = (RunConfig, TrainConfig, MeshConfig)
SECTIONS = {"data": DataConfig, "init": InitConfig, "optim": OptimConfig}
TRAINING_ONLY = (TrainConfig, MeshConfig, InitConfig, OptimConfig)
# Keys that a config saved with a checkpoint adds to the schema.
SAVED_KEYS = ("total_steps_resolved",)
