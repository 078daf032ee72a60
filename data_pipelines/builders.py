"""TFDS builders `clotho`, `audiocaps` and `synthcaps`: array_record, no TensorFlow, resumable.

Each record is one clip:
  clip_id             str     stable id (Clotho: the CSV file name; AudioCaps: `{ytid}_{start}`)
  clip_index          int64   stable integer id: the clip's position in its split's CSV
  audio               int16   [S] mono waveform at the config's sample rate
  sample_rate         int32   that rate
  captions            [str]   all of the clip's (normalised, non-empty) captions
  file_name           str     the decoded audio file, relative to the download folder
  source_sample_rate  int32   the file's rate before resampling
  source_channels     int32   the file's channel count before downmixing
  metadata            str     JSON: AudioCaps ids / synthcaps ground truth
The `folder` builder (your own folder, `data_pipelines/folder.py`) adds:
  label               str     the clip's class name ('' for a captions folder)
  label_index         int64   its index in the sorted class list (-1 for a captions folder);
                              the list is `classes` in the dataset's metadata.json

Splits are `train`, `validation`, `test` for every dataset (Clotho development / validation /
evaluation; AudioCaps train / val / test). Records keep the CSV order.

Resumable preparation. TFDS writes a dataset into a randomly named `incomplete.*` folder and
throws it away if anything fails, so an interrupted run restarts from zero (its
`SequentialWriter` can append, but not tell which clips an interrupted shard held). The
builders here therefore override `_download_and_prepare`: every split is cut into shards of
a fixed number of CSV clips; each shard is written to a stable work folder
`<data_dir>/<name>/<config>/<version>.partial/` under a temporary name, renamed when complete,
and recorded in a manifest that holds a fingerprint of its inputs (clip ids, captions, audio
file sizes and times, sample rate, format). A rerun reuses every shard whose fingerprint still
matches and rebuilds only the others, so no clip is written twice and nothing finished is
redone. When all shards exist they are hard-linked into TFDS's folder under TFDS's shard names
and TFDS writes `dataset_info.json` / `features.json` as usual: the result is an ordinary
array_record TFDS dataset (`tfds.data_source`, `builder.as_data_source()`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import hashlib
import inspect
import json
import multiprocessing
import os
import pathlib
import shutil
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from etils import epath
from tensorflow_datasets.core import example_serializer

from data_pipelines import audio_io, folder, policy, readers, synthcaps

# Bump when the record layout or the decoding changes: it invalidates unfinished shards.
_FORMAT = "hade-audio-caption-v1"
RATES = policy.RATES  # builder config name -> stored sample rate (data_pipelines/policy.py)
SPLITS = ("train", "validation", "test")
REPORT_FILENAME = "prepare_report.json"


def make_features(sample_rate: int, labels: bool = False) -> tfds.features.FeaturesDict:
  """The record layout (module docstring); `labels` adds the `folder` builder's fields."""
  del sample_rate  # Same layout at every rate; the rate is a field and in the metadata.
  extra = {"label": tfds.features.Text(), "label_index": np.int64} if labels else {}
  return tfds.features.FeaturesDict({
      **extra,
      "clip_id": tfds.features.Text(),
      "clip_index": np.int64,
      # Raw bytes: 2 bytes/sample, decoded without parsing an int64 list.
      "audio": tfds.features.Tensor(shape=(None,), dtype=np.int16,
                                    encoding=tfds.features.Encoding.BYTES),
      "sample_rate": np.int32,
      "captions": tfds.features.Sequence(tfds.features.Text()),
      "file_name": tfds.features.Text(),
      "source_sample_rate": np.int32,
      "source_channels": np.int32,
      "metadata": tfds.features.Text(),
  })


class AudioCaptionConfig(tfds.core.BuilderConfig):
  """A sample rate (and, for AudioCaps, a caption version; for synthcaps, a size)."""

  def __init__(self, *, sample_rate: int, caption_version: str = "v1",
               synth: synthcaps.Params | None = None, folder: folder.FolderSpec | None = None,
               **kwargs):
    super().__init__(**kwargs)
    self.sample_rate = sample_rate
    self.caption_version = caption_version
    self.synth = synth
    self.folder = folder


def _rate_configs(description: str) -> list[AudioCaptionConfig]:
  return [AudioCaptionConfig(name=name, sample_rate=rate,
                             description=f"{description}, mono int16 at {rate} Hz")
          for name, rate in RATES.items()]


@dataclasses.dataclass
class ShardJob:
  """Everything a worker process needs to write one shard (picklable)."""

  split: str
  index: int
  entries: list[readers.ClipEntry]
  sample_rate: int
  manual_dir: str
  shard_path: str
  manifest_path: str
  fingerprint: str
  strict: bool
  labels: bool = False  # the `folder` builder's label fields


def _fingerprint(entries: Sequence[readers.ClipEntry], sample_rate: int) -> str:
  h = hashlib.sha256(f"{_FORMAT}|{sample_rate}".encode())
  for e in entries:
    st = os.stat(e.audio_path)
    h.update(json.dumps([e.clip_index, e.clip_id, e.captions, e.audio_path, st.st_size,
                         st.st_mtime_ns, e.metadata], sort_keys=True).encode())
  return h.hexdigest()


def _atomic_write_json(path: pathlib.Path | str, obj) -> None:
  path = pathlib.Path(path)
  tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
  tmp.write_text(json.dumps(obj, indent=1, sort_keys=True), encoding="utf-8")
  os.replace(tmp, path)


_WORKER_FEATURES: dict[tuple[int, bool], tuple] = {}


def _features_and_serializer(sample_rate: int, labels: bool = False):
  if (sample_rate, labels) not in _WORKER_FEATURES:
    features = make_features(sample_rate, labels)
    serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
    _WORKER_FEATURES[(sample_rate, labels)] = (features, serializer)
  return _WORKER_FEATURES[(sample_rate, labels)]


def _examples(job: ShardJob, stats: dict, issues: list, on_clip=None):
  """Yields (key, example) for the shard's decodable clips; records stats and issues."""
  manual_dir = pathlib.Path(job.manual_dir)
  for e in job.entries:
    try:
      audio = audio_io.decode(e.audio_path, job.sample_rate)
    except audio_io.AudioError as err:
      what = f"{err.reason} audio: {err.detail} (CSV {e.csv_path}:{e.line})"
      if job.strict:
        raise readers.DataError(f"strict mode: {err.path}: {what}") from err
      issue = readers.Issue(err.reason, err.path, None, f"{what}; clip skipped", clip=e.clip_id)
      issues.append(issue.to_json())
      if on_clip:
        on_clip()
      continue
    try:
      rel = str(pathlib.Path(e.audio_path).relative_to(manual_dir))
    except ValueError:
      rel = e.audio_path
    stats["examples"] += 1
    stats["captions"] += len(e.captions)
    stats["seconds"] += audio.seconds
    rate = str(audio.source_rate)
    stats["source_rates"][rate] = stats["source_rates"].get(rate, 0) + 1
    notes = list(audio.notes)
    if e.matched_by not in (None, "exact", "id_start"):
      notes.append(f"name_{e.matched_by}")
    for note in notes:
      stats["notes"][note] = stats["notes"].get(note, 0) + 1
      examples = stats["note_examples"].setdefault(note, [])
      if len(examples) < 3:
        examples.append(rel)
    metadata = dict(e.metadata)
    label = {}
    if job.labels:  # the record's own fields hold them, not the metadata
      label = {"label": metadata.pop("label", ""), "label_index": metadata.pop("label_index", -1)}
    yield e.clip_id, {
        **label,
        "clip_id": e.clip_id,
        "clip_index": e.clip_index,
        "audio": audio.samples,
        "sample_rate": job.sample_rate,
        "captions": e.captions,
        "file_name": rel,
        "source_sample_rate": audio.source_rate,
        "source_channels": audio.source_channels,
        "metadata": json.dumps(metadata, sort_keys=True, ensure_ascii=False),
    }
    if on_clip:
      on_clip()


def _new_stats() -> dict:
  return {"examples": 0, "captions": 0, "seconds": 0.0, "source_rates": {}, "notes": {},
          "note_examples": {}}


def write_shard(job: ShardJob, on_clip=None) -> dict:
  """Decodes a shard's clips and writes them; returns (and saves) the shard's manifest.

  Raises:
    readers.DataError: strict mode and a clip's audio is unusable.
  """
  features, serializer = _features_and_serializer(job.sample_rate, job.labels)
  tmp = f"{job.shard_path}.tmp{os.getpid()}"
  stats, issues = _new_stats(), []
  writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
  try:
    for _, example in _examples(job, stats, issues, on_clip):
      # Deterministic: the feature map in key order, not in an order that changes from one
      # process to the next, so the same clips give the same bytes in every preparation.
      writer.write(serializer.get_tf_example(features.encode_example(example))
                   .SerializeToString(deterministic=True))
  except BaseException:
    writer.close()
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  writer.close()
  os.replace(tmp, job.shard_path)
  manifest = {"fingerprint": job.fingerprint, "split": job.split, "index": job.index,
              "num_clips": len(job.entries), "file_bytes": os.path.getsize(job.shard_path),
              "stats": stats, "issues": issues}
  # The manifest is written last: a shard without one is redone on the next run.
  _atomic_write_json(job.manifest_path, manifest)
  return manifest


def _shard_done(job: ShardJob) -> dict | None:
  try:
    manifest = json.loads(pathlib.Path(job.manifest_path).read_text(encoding="utf-8"))
  except (OSError, ValueError):
    return None
  if manifest.get("fingerprint") != job.fingerprint:
    return None
  try:
    if os.path.getsize(job.shard_path) != manifest.get("file_bytes"):
      return None
  except OSError:
    return None
  return manifest


class AudioCaptionBuilder(tfds.core.ShardBasedBuilder, skip_registration=True):
  """Shared base of the three builders (module docstring).

  Builder keyword arguments (besides TFDS's data_dir, config, ...):
    strict: fail on the first problem instead of skipping and reporting.
    num_workers: processes decoding audio (1 = in this process).
    clips_per_shard: CSV clips per shard (the resume granularity).
    encoding: caption CSV encoding, 'auto' = UTF-8 with an ISO-8859-1 fallback per line.
    audio_dirs: {split: folder} for audio folders outside the supported layouts.
    splits: the splits to prepare (default: every split whose CSV is present).
    progress: show a progress bar.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  READER = "clotho"
  LABELS = False  # records with the `folder` builder's label fields
  CLIPS_PER_SHARD = 64
  HOMEPAGE = ""
  CITATION = ""
  DESCRIPTION = ""

  def __init__(self, *, strict: bool = False, num_workers: int = 1,
               clips_per_shard: int | None = None, encoding: str = "auto",
               audio_dirs: dict[str, str] | None = None, splits: Sequence[str] | None = None,
               progress: bool = True, **kwargs):
    self._strict = strict
    self._num_workers = max(1, int(num_workers))
    self._clips_per_shard = int(clips_per_shard or self.CLIPS_PER_SHARD)
    self._encoding = encoding
    self._audio_dirs = dict(audio_dirs or {})
    self._splits = tuple(splits) if splits else None
    self._progress = progress
    self.summary: dict | None = None
    file_format = kwargs.setdefault("file_format", "array_record")
    if str(getattr(file_format, "value", file_format)) != "array_record":
      raise ValueError(f"{self.name} is written as array_record only (random access for "
                       f"Grain, no TensorFlow), not {file_format}")
    super().__init__(**kwargs)
    if self._splits:
      unknown = set(self._splits) - set(SPLITS)
      if unknown:
        raise ValueError(f"unknown splits {sorted(unknown)}; known: {', '.join(SPLITS)}")

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's own lookup of the builder's source goes through the `importlib_resources`
    # backport, which TFDS does not declare as a dependency; the file path is all it needs.
    return epath.Path(inspect.getfile(cls))

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.DESCRIPTION,
        features=make_features(self.builder_config.sample_rate, self.LABELS),
        homepage=self.HOMEPAGE,
        citation=self.CITATION,
        metadata=tfds.core.MetadataDict(sample_rate=self.builder_config.sample_rate),
    )

  @property
  def work_dir(self) -> pathlib.Path:
    """The stable folder holding finished shards of an unfinished preparation."""
    root = pathlib.Path(self.data_dir_root) / self.name
    if self.builder_config is not None:
      root = root / self.builder_config.name
    return root / f"{self.version}.partial"

  def _manual_dir(self, dl_manager) -> pathlib.Path:
    try:
      return pathlib.Path(dl_manager.manual_dir)
    except (AssertionError, ValueError) as e:
      raise readers.DataError(
          f"{self.name} needs the files you downloaded: {e}\n"
          f"Prepare with: python -m data_pipelines.prepare --dataset={self.name} "
          f"--config={self.builder_config.name} --manual_dir=/path/to/download "
          "--data_dir=/path/to/tfds") from None

  def _sources(self, manual_dir: pathlib.Path
               ) -> tuple[dict[str, readers.SplitSource], dict[str, readers.Report]]:
    present = readers.available_splits(self.READER, manual_dir, **self._reader_kwargs())
    wanted = self._splits or present
    if not wanted:
      raise readers.DataError(
          f"no {self.name} caption CSV in {manual_dir} (nor in its usual subfolders);\n"
          f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    sources, reports = {}, {}
    for split in wanted:
      reports[split] = readers.Report(strict=self._strict)
      sources[split] = readers.load_split(
          self.READER, manual_dir, split, report=reports[split], encoding=self._encoding,
          audio_dir=self._audio_dirs.get(split), **self._reader_kwargs())
    return sources, reports

  def _reader_kwargs(self) -> dict:
    return {}

  def _shard_iterators_per_split(self, dl_manager):
    """TFDS's own (not resumable) shard-based path; `_download_and_prepare` replaces it."""
    manual_dir = self._manual_dir(dl_manager)
    sources, _ = self._sources(manual_dir)
    jobs = self._jobs(sources, manual_dir)
    return {split: [functools.partial(_examples, job, _new_stats(), []) for job in split_jobs]
            for split, split_jobs in jobs.items()}

  def _jobs(self, sources, manual_dir) -> dict[str, list[ShardJob]]:
    work = self.work_dir
    jobs = {}
    for split, source in sources.items():
      entries = source.entries
      n = max(1, -(-len(entries) // self._clips_per_shard))
      jobs[split] = []
      for k in range(n):
        chunk = entries[k * self._clips_per_shard:(k + 1) * self._clips_per_shard]
        jobs[split].append(ShardJob(
            split=split, index=k, entries=chunk, sample_rate=self.builder_config.sample_rate,
            manual_dir=str(manual_dir), shard_path=str(work / f"{split}-{k:05d}.array_record"),
            manifest_path=str(work / f"{split}-{k:05d}.json"),
            fingerprint=_fingerprint(chunk, self.builder_config.sample_rate),
            strict=self._strict, labels=self.LABELS))
    return jobs

  def _run(self, pending: list[ShardJob], done_clips: int, total_clips: int) -> None:
    bar = None
    if self._progress:
      import tqdm  # pylint: disable=g-import-not-at-top

      bar = tqdm.tqdm(total=total_clips, initial=done_clips, unit="clip",
                      desc=f"{self.name}/{self.builder_config.name}")
    try:
      if self._num_workers <= 1 or len(pending) <= 1:
        for job in pending:
          write_shard(job, on_clip=bar.update if bar else None)
      else:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(self._num_workers, mp_context=ctx) as pool:
          futures = {pool.submit(write_shard, job): job for job in pending}
          try:
            for future in concurrent.futures.as_completed(futures):
              future.result()
              if bar:
                bar.update(len(futures[future].entries))
          except BaseException:
            # Finished shards are already on disk with their manifests; stop the rest.
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    finally:
      if bar:
        bar.close()

  def _download_and_prepare(self, dl_manager, download_config=None) -> None:
    del download_config
    manual_dir = self._manual_dir(dl_manager)
    sources, reports = self._sources(manual_dir)
    everything = readers.Report(strict=self._strict)
    for report in reports.values():
      everything.extend(report.issues)
    everything.check(f"{self.name} in {manual_dir}")
    work = self.work_dir
    work.mkdir(parents=True, exist_ok=True)
    for leftover in work.glob("*.tmp*"):
      leftover.unlink()  # halves of shards an interrupted run was writing
    # TFDS writes into a new randomly named `incomplete.*` folder each run and never removes
    # the one of a killed run (it holds links to finished shards, or copies of them).
    current = pathlib.Path(self.data_path)
    for stale in current.parent.glob(f"incomplete.*_{self.version}"):
      if stale.resolve() != current.resolve():
        shutil.rmtree(stale, ignore_errors=True)
    jobs = self._jobs(sources, manual_dir)
    manifests, pending = {}, []
    for split_jobs in jobs.values():
      for job in split_jobs:
        found = _shard_done(job)
        if found is None:
          pending.append(job)
        else:
          manifests[(job.split, job.index)] = found
    total = sum(len(j.entries) for js in jobs.values() for j in js)
    self._run(pending, total - sum(len(j.entries) for j in pending), total)
    for job in pending:
      manifests[(job.split, job.index)] = _shard_done(job)

    split_infos = []
    for split, split_jobs in jobs.items():
      template = self._get_filename_template(split)
      kept = [j for j in split_jobs if manifests[(split, j.index)]["stats"]["examples"] > 0]
      if not kept:
        issues = [readers.Issue(**i) for j in split_jobs
                  for i in manifests[(split, j.index)]["issues"]]
        raise readers.DataError(readers.format_issues(
            issues, header=f"{self.name} split {split!r}: no clip could be decoded"))
      lengths, num_bytes = [], 0
      for k, job in enumerate(kept):
        target = template.sharded_filepath(shard_index=k, num_shards=len(kept))
        try:
          os.link(job.shard_path, target)  # the work copy stays valid until TFDS is done
        except OSError:
          shutil.copyfile(job.shard_path, target)
        lengths.append(manifests[(split, job.index)]["stats"]["examples"])
        num_bytes += manifests[(split, job.index)]["file_bytes"]
      split_infos.append(tfds.core.SplitInfo(name=split, shard_lengths=lengths,
                                             num_bytes=num_bytes, filename_template=template))
    self.info.set_splits(tfds.core.SplitDict(split_infos))
    self.summary = self._summarize(sources, jobs, manifests, reports, manual_dir)
    _atomic_write_json(pathlib.Path(self.data_path) / REPORT_FILENAME, self.summary)

  def _post_download_and_prepare_hook(self) -> None:
    # The dataset folder now holds its own links to the shards.
    shutil.rmtree(self.work_dir, ignore_errors=True)

  def _summarize(self, sources, jobs, manifests, reports, manual_dir) -> dict:
    splits, all_issues = {}, []
    for split, source in sources.items():
      issues = [i.to_json() for i in reports[split].issues]
      stats = collections.Counter()
      notes, note_examples, rates = collections.Counter(), {}, collections.Counter()
      for job in jobs[split]:
        m = manifests[(split, job.index)]
        issues += m["issues"]
        for key in ("examples", "captions", "seconds"):
          stats[key] += m["stats"][key]
        notes.update(m["stats"]["notes"])
        rates.update(m["stats"]["source_rates"])
        for note, examples in m["stats"]["note_examples"].items():
          note_examples.setdefault(note, [])
          note_examples[note] += examples[:3 - len(note_examples[note])]
      splits[split] = {
          "csv": str(source.csv_path), "audio_dir": str(source.audio_dir),
          "csv_clips": source.num_csv_clips, "clips": stats["examples"],
          "captions": stats["captions"], "hours": stats["seconds"] / 3600,
          "notes": dict(notes), "note_examples": note_examples,
          "source_sample_rates": dict(rates),
          "issue_counts": dict(collections.Counter(i["kind"] for i in issues)),
      }
      all_issues += [dict(i, split=split) for i in issues]
    return {
        "dataset": self.name, "config": self.builder_config.name,
        "version": str(self.version), "sample_rate": self.builder_config.sample_rate,
        "manual_dir": str(manual_dir), "splits": splits,
        "issue_counts": dict(collections.Counter(i["kind"] for i in all_issues)),
        "issues": all_issues[:2000], "issues_truncated": len(all_issues) > 2000,
    }


class Clotho(AudioCaptionBuilder):
  """Clotho v2.1 (Drossos et al., ICASSP 2020): 3,839 / 1,045 / 1,045 clips x 5 captions."""

  BUILDER_CONFIGS = _rate_configs("Clotho v2.1")
  DEFAULT_CONFIG_NAME = "32k"
  READER = "clotho"
  CLIPS_PER_SHARD = 64  # 15-30 s clips: ~60-170 MB per shard
  HOMEPAGE = "https://zenodo.org/record/4783391"
  DESCRIPTION = ("Clotho v2.1 audio captioning / retrieval: 15-30 s Freesound clips with "
                 "5 crowd-sourced captions each. Splits: train = development, validation, "
                 "test = evaluation.")
  CITATION = """@inproceedings{drossos2020clotho,
  title={Clotho: an Audio Captioning Dataset}, author={Drossos, Konstantinos and
  Lipping, Samuel and Virtanen, Tuomas}, booktitle={ICASSP}, year={2020}}"""
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download Clotho v2.1 from https://zenodo.org/record/4783391 and extract it into one folder:
  clotho_captions_{development,validation,evaluation}.csv
  development/*.wav  validation/*.wav  evaluation/*.wav   (from clotho_audio_*.7z)
(`clotho_csv_files/` and `clotho_audio_files/<split>/` layouts are also found.)
Then: python -m data_pipelines.prepare --dataset=clotho --manual_dir=<that folder> \
--data_dir=<tfds data dir>"""


class Audiocaps(AudioCaptionBuilder):
  """AudioCaps (Kim et al., NAACL 2019): 49,838 / 495 x 5 / 975 x 5 captions."""

  BUILDER_CONFIGS = _rate_configs("AudioCaps v1 captions") + [
      AudioCaptionConfig(name=f"{name}_v2", sample_rate=rate, caption_version="v2",
                         description=f"AudioCaps 2.0 captions, mono int16 at {rate} Hz")
      for name, rate in RATES.items()]
  DEFAULT_CONFIG_NAME = "32k"
  READER = "audiocaps"
  CLIPS_PER_SHARD = 256  # 10 s clips: ~80-250 MB per shard
  HOMEPAGE = "https://audiocaps.github.io/"
  DESCRIPTION = ("AudioCaps: 10 s AudioSet clips with human captions (1 per train clip, 5 "
                 "per validation/test clip). Clips are (youtube_id, start_time) groups of "
                 "the CSV rows; clips whose audio is missing locally are skipped and listed "
                 "in prepare_report.json.")
  CITATION = """@inproceedings{kim2019audiocaps,
  title={AudioCaps: Generating Captions for Audios in The Wild}, author={Kim, Chris Dongjoo
  and Kim, Byeongchang and Lee, Hyunmin and Kim, Gunhee}, booktitle={NAACL-HLT}, year={2019}}"""
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Put the AudioCaps CSVs (https://github.com/cdjkim/audiocaps: dataset/ for v1, dataset2.0/
for the *_v2 configs) and your local audio in one folder:
  train.csv val.csv test.csv
  train/ val/ test/   audio named {youtube_id}_{start_time}.wav, Y{youtube_id}.wav,
                      {youtube_id}.wav or the AudioSet form {ytid}_{start:.3f}_{end:.3f}.wav
                      (any of wav/flac/ogg/mp3); other folders via --audio_dirs.
Then: python -m data_pipelines.prepare --dataset=audiocaps --manual_dir=<that folder> \
--data_dir=<tfds data dir>"""

  def _reader_kwargs(self) -> dict:
    return {"caption_version": self.builder_config.caption_version}


_SYNTH_SIZES = policy.SYNTH_SIZES  # name -> (clips per split, clip seconds)


def synth_config(size: str | None = None, sample_rate: int = 32_000, *,
                 clips: dict | None = None, clip_seconds: float | None = None,
                 seed: int = 0, family_size: int = 3) -> AudioCaptionConfig:
  """A synthcaps config: a named size, or custom sizes (named by a hash of the parameters)."""
  if size is not None:
    clips, clip_seconds = _SYNTH_SIZES[size][0], clip_seconds or _SYNTH_SIZES[size][1]
  params = synthcaps.Params(seed=seed, clips=dict(clips), clip_seconds=float(clip_seconds),
                            sample_rate=sample_rate, family_size=family_size)
  rate_name = policy.rate_name(sample_rate)
  default = size is not None and seed == 0 and family_size == 3 and (
      clip_seconds == _SYNTH_SIZES[size][1])
  if default:
    name = f"{size}_{rate_name}"
  else:
    digest = hashlib.sha256(json.dumps(params.to_json(), sort_keys=True).encode()).hexdigest()
    name = f"custom{digest[:8]}_{rate_name}"
  return AudioCaptionConfig(
      name=name, sample_rate=sample_rate, synth=params,
      description=(f"synthcaps {params.clips} clips of {params.clip_seconds} s, seed "
                   f"{params.seed}, families of {params.family_size}, {sample_rate} Hz"))


class Synthcaps(AudioCaptionBuilder):
  """The project's synthetic scenes (see `synthcaps`), generated then prepared like Clotho.

  Extra builder keyword argument:
    synth_dir: where the Clotho-layout files are generated (default
      `<data_dir>/downloads/manual/synthcaps/<config>`).
  """

  BUILDER_CONFIGS = [synth_config(size, rate) for size in _SYNTH_SIZES for rate in
                     RATES.values()]
  DEFAULT_CONFIG_NAME = "demo_32k"
  READER = "clotho"
  CLIPS_PER_SHARD = 128
  DESCRIPTION = ("synthcaps: seeded synthetic sound scenes (12 event types) with 5 "
                 "template captions stating order, overlap, count, pitch, loudness and tempo; "
                 "families of clips that differ in one such detail share each split. "
                 "metadata holds each clip's ground truth.")
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Nothing to download: synthcaps is generated."

  def __init__(self, *, synth_dir: str | os.PathLike | None = None, **kwargs):
    self._synth_dir = synth_dir
    super().__init__(**kwargs)

  @property
  def synth_dir(self) -> pathlib.Path:
    if self._synth_dir is not None:
      return pathlib.Path(self._synth_dir)
    return (pathlib.Path(self.data_dir_root) / "downloads" / "manual" / "synthcaps" /
            self.builder_config.name)

  def _manual_dir(self, dl_manager) -> pathlib.Path:
    del dl_manager
    params = self.builder_config.synth
    synthcaps.generate(self.synth_dir, params, num_workers=self._num_workers,
                       progress=self._progress)
    return self.synth_dir

  def _sources(self, manual_dir):
    sources, reports = super()._sources(manual_dir)
    for split, source in sources.items():
      truth = readers.read_ground_truth(
          manual_dir / f"synthcaps_ground_truth_{readers.CLOTHO_SPLITS[split]}.jsonl")
      for entry in source.entries:
        entry.metadata = truth[entry.file_name]
        entry.clip_id = f"synthcaps_{split}_{entry.clip_index:06d}"
    return sources, reports


def folder_config(spec: folder.FolderSpec, sample_rate: int) -> AudioCaptionConfig:
  """The `folder` builder config of a spec at a rate (name: `FolderSpec.config_name`)."""
  return AudioCaptionConfig(
      name=spec.config_name(policy.rate_name(sample_rate)), sample_rate=sample_rate,
      folder=spec, description=f"your folder {spec.name!r}: {json.dumps(spec.to_json())}")


class Folder(AudioCaptionBuilder):
  """Your own folder of audio with a captions or labels CSV (`data_pipelines/folder.py`).

  Its configs are made from a `folder.FolderSpec` (`folder_config`); the records add `label`
  and `label_index`, and metadata.json the sorted class list `classes` and the spec `folder`.
  """

  BUILDER_CONFIGS = [folder_config(folder.FolderSpec(csv="captions.csv"), 16_000)]
  LABELS = True
  CLIPS_PER_SHARD = 256
  DESCRIPTION = ("A folder of audio with a captions CSV (wide caption_1..N or long caption "
                 "rows) or a labels CSV turned into captions by templates.")
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Put your audio files in one folder with the CSV(s) describing them (data_pipelines/folder.py):
  captions: file_name,caption_1,...,caption_N  or  file_name,caption (one row per caption)
  labels:   file_name,<label column>,...        (ESC-50's esc50.csv as is)
Then: python -m data_pipelines.prepare --dataset=folder --manual_dir=<that folder> \
--folder_name=mine --folder_csv=captions.csv --data_dir=<tfds data dir> (--helpfull: folder_*)"""

  def _sources(self, manual_dir: pathlib.Path):
    spec = self.builder_config.folder
    wanted = list(self._splits or spec.splits())
    reports = {s: readers.Report(strict=self._strict) for s in wanted}
    sources = folder.load_splits(spec, manual_dir, wanted, reports=reports,
                                 encoding=self._encoding, audio_dirs=self._audio_dirs)
    classes = folder.class_names(spec, manual_dir, self._encoding)
    index = {name: i for i, name in enumerate(classes)}
    for source in sources.values():
      for entry in source.entries:
        if "label" in entry.metadata:
          entry.metadata["label_index"] = index[entry.metadata["label"]]
    # Written with dataset_info.json: the class list of zero-shot evaluation, and the spec.
    self.info.metadata["classes"] = classes
    self.info.metadata["folder"] = spec.to_json()
    return sources, reports


def builder(dataset: str, config: str | AudioCaptionConfig | None = None, *,
            data_dir: str | os.PathLike, **kwargs) -> AudioCaptionBuilder:
  """The builder class for `dataset` ('clotho', 'audiocaps', 'synthcaps')."""
  classes = {"clotho": Clotho, "audiocaps": Audiocaps, "synthcaps": Synthcaps,
             "folder": Folder}
  if dataset not in classes:
    raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(classes)}")
  cls = classes[dataset]
  if isinstance(config, AudioCaptionConfig) and config.name in cls.builder_configs:
    # Names determine the parameters (custom synthcaps names hash them), and TFDS refuses
    # an equal copy of a registered config.
    config = config.name
  return cls(config=config, data_dir=os.fspath(data_dir), **kwargs)


def prepare(dataset: str, config: str | AudioCaptionConfig | None = None, *,
            data_dir: str | os.PathLike, manual_dir: str | os.PathLike | None = None,
            **kwargs) -> AudioCaptionBuilder:
  """Prepares (or resumes, or reuses) a dataset; returns its builder (`.summary` is set)."""
  b = builder(dataset, config, data_dir=data_dir, **kwargs)
  download_config = tfds.download.DownloadConfig(
      manual_dir=os.fspath(manual_dir) if manual_dir else None, try_download_gcs=False)
  b.download_and_prepare(download_config=download_config)
  if b.summary is None:
    report = pathlib.Path(b.data_path) / REPORT_FILENAME
    if report.exists():
      b.summary = json.loads(report.read_text(encoding="utf-8"))
  return b
