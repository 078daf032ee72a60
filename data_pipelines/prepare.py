r"""Prepares Clotho, AudioCaps or synthcaps as a TFDS array_record dataset (no TensorFlow).

  python -m data_pipelines.prepare --dataset=clotho --manual_dir=~/clotho \
      --data_dir=~/tfds [--config=32k] [--num_workers=2]
  python -m data_pipelines.prepare --dataset=audiocaps --manual_dir=~/audiocaps --data_dir=~/tfds
  python -m data_pipelines.prepare --dataset=synthcaps --config=demo_32k --data_dir=~/tfds

An interrupted run picks up where it stopped (finished shards are kept); a finished dataset
is reused. The closing summary lists clips, captions, hours of audio and every skipped input
with its reason; the same facts are saved as prepare_report.json next to the records.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import sys

from absl import app, flags, logging

from data_pipelines import builders, readers

_DATASET = flags.DEFINE_enum("dataset", None, ["clotho", "audiocaps", "synthcaps"],
                             "Which dataset to prepare.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir the records are written to.")
_MANUAL_DIR = flags.DEFINE_string(
    "manual_dir", None, "The folder holding your download (clotho, audiocaps); for synthcaps "
    "where the generated WAV/CSV files go (default <data_dir>/downloads/manual/synthcaps/).")
_CONFIG = flags.DEFINE_string(
    "config", None, "Builder config: a rate (16k, 22k, 32k, 44k, 48k; AudioCaps 2.0 "
    "captions: 32k_v2, ...), for synthcaps a size and rate (tiny_16k, demo_32k, full_48k). "
    "Default: 32k / demo_32k.")
_SAMPLE_RATE = flags.DEFINE_integer(
    "sample_rate", None, "Instead of --config: the rate in Hz (must be one of the configs' "
    "rates; for synthcaps it picks the rate of --synth_size).")
_SPLITS = flags.DEFINE_list("splits", None, "Splits to prepare (default: every split whose "
                            "caption CSV is present): train, validation, test.")
_STRICT = flags.DEFINE_bool("strict", False, "Fail on the first bad input instead of skipping "
                            "and reporting it.")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", os.cpu_count() or 1,
                                    "Processes decoding audio.")
_CLIPS_PER_SHARD = flags.DEFINE_integer(
    "clips_per_shard", None, "CSV clips per shard (the unit of resumption); keep it when "
    "resuming.")
_ENCODING = flags.DEFINE_string("encoding", "auto", "Caption CSV encoding; 'auto' = UTF-8 with "
                                "an ISO-8859-1 fallback per line (reported).")
_AUDIO_DIRS = flags.DEFINE_list("audio_dirs", None, "split=folder pairs for audio folders "
                                "outside the supported layouts, e.g. test=/data/ac/test_wav.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Delete a prepared (or partly prepared) "
                               "copy of this config first.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")
_SYNTH_SIZE = flags.DEFINE_enum("synth_size", None, ["tiny", "demo", "full"],
                                "synthcaps: a named size (instead of --config).")
_SYNTH_CLIPS = flags.DEFINE_list("synth_clips", None, "synthcaps: custom clips per split, "
                                 "e.g. train=2000,validation=200,test=200.")
_SYNTH_SECONDS = flags.DEFINE_float("synth_clip_seconds", None, "synthcaps: clip length.")
_SYNTH_SEED = flags.DEFINE_integer("synth_seed", 0, "synthcaps: the seed.")
_SYNTH_FAMILY = flags.DEFINE_integer("synth_family_size", 3, "synthcaps: clips per family "
                                     "(a base scene and siblings differing in one detail).")


def _pairs(items: list[str] | None, flag: str, value=str) -> dict:
  out = {}
  for item in items or []:
    key, sep, v = item.partition("=")
    if not sep:
      raise app.UsageError(f"--{flag} expects key=value pairs, got {item!r}")
    out[key.strip()] = value(v.strip())
  return out


def _config():
  """The builder config from --config / --sample_rate / --synth_* flags."""
  rate_names = {v: k for k, v in builders.RATES.items()}
  if _SAMPLE_RATE.value is not None and _SAMPLE_RATE.value not in rate_names:
    raise app.UsageError(f"--sample_rate={_SAMPLE_RATE.value} is not one of "
                         f"{sorted(rate_names)}")
  if _DATASET.value != "synthcaps":
    if _CONFIG.value and _SAMPLE_RATE.value:
      raise app.UsageError("give --config or --sample_rate, not both")
    if _SAMPLE_RATE.value:
      return rate_names[_SAMPLE_RATE.value]
    return _CONFIG.value
  custom = _SYNTH_CLIPS.value or _SYNTH_SECONDS.value or _SYNTH_SEED.value or (
      _SYNTH_FAMILY.value != 3)
  if _CONFIG.value and not (custom or _SYNTH_SIZE.value or _SAMPLE_RATE.value):
    return _CONFIG.value
  rate = _SAMPLE_RATE.value or 32_000
  if _CONFIG.value:
    size, _, rate_name = _CONFIG.value.partition("_")
    rate = builders.RATES.get(rate_name, rate)
  else:
    size = _SYNTH_SIZE.value or "demo"
  clips = _pairs(_SYNTH_CLIPS.value, "synth_clips", int) or None
  if clips:
    return builders.synth_config(None, rate, clips=clips,
                                 clip_seconds=_SYNTH_SECONDS.value or 10.0,
                                 seed=_SYNTH_SEED.value, family_size=_SYNTH_FAMILY.value)
  if size not in ("tiny", "demo", "full"):
    raise app.UsageError(f"unknown synthcaps size {size!r}: tiny, demo or full")
  return builders.synth_config(size, rate, clip_seconds=_SYNTH_SECONDS.value,
                               seed=_SYNTH_SEED.value, family_size=_SYNTH_FAMILY.value)


def format_summary(summary: dict, data_path: str) -> str:
  """The closing summary: per split clips, captions, hours, skips and why, notes."""
  lines = [f"{summary['dataset']}/{summary['config']} ({summary['sample_rate']} Hz) in "
           f"{data_path}"]
  total = {"clips": 0, "captions": 0, "hours": 0.0}
  issues_by_split = {}
  for issue in summary.get("issues", []):
    issues_by_split.setdefault(issue.get("split"), []).append(issue)
  for split, s in summary["splits"].items():
    for k in total:
      total[k] += s[k]
    lines.append(f"  {split:<10} {s['clips']:>7,} clips of {s['csv_clips']:,} in the CSV, "
                 f"{s['captions']:>8,} captions, {s['hours']:8.2f} h   ({s['csv']})")
    notes = ", ".join(f"{k} {v}" for k, v in sorted(s["notes"].items()))
    if notes:
      lines.append(f"             handled: {notes}")
    rates = ", ".join(f"{int(k):,} Hz x{v}" for k, v in sorted(s["source_sample_rates"].items(),
                                                               key=lambda kv: int(kv[0])))
    if rates:
      lines.append(f"             source rates: {rates}")
    split_issues = [readers.Issue(i["kind"], i["path"], i["line"], i["detail"], i["clip"])
                    for i in issues_by_split.get(split, [])]
    if split_issues:
      lines.append(readers.format_issues(split_issues, header="             problems:",
                                         first=3).replace("\n", "\n           "))
  lines.append(f"  {'total':<10} {total['clips']:>7,} clips, {total['captions']:>8,} captions, "
               f"{total['hours']:.2f} h of audio")
  if summary.get("issues_truncated"):
    lines.append("  (more problems than shown: see prepare_report.json)")
  lines.append(f"  report: {os.path.join(data_path, builders.REPORT_FILENAME)}")
  lines.append(f"  read it: tfds.data_source('{summary['dataset']}/{summary['config']}', "
               f"split='{next(iter(summary['splits']))}', data_dir=...) or "
               "hade_jax.input_pipeline.ClipSource")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # TFDS's INFO lines would bury the summary
  if not _DATASET.value or not _DATA_DIR.value:
    raise app.UsageError("--dataset and --data_dir are required")
  if _DATASET.value != "synthcaps" and not _MANUAL_DIR.value:
    instructions = builders.builder(_DATASET.value, data_dir=_DATA_DIR.value
                                    ).MANUAL_DOWNLOAD_INSTRUCTIONS
    raise app.UsageError(f"--manual_dir is required for {_DATASET.value}:\n{instructions}")
  data_dir = os.path.expanduser(_DATA_DIR.value)
  manual_dir = os.path.expanduser(_MANUAL_DIR.value) if _MANUAL_DIR.value else None
  kwargs = dict(strict=_STRICT.value, num_workers=_NUM_WORKERS.value,
                clips_per_shard=_CLIPS_PER_SHARD.value, encoding=_ENCODING.value,
                audio_dirs=_pairs(_AUDIO_DIRS.value, "audio_dirs"), splits=_SPLITS.value,
                progress=_PROGRESS.value)
  if _DATASET.value == "synthcaps":
    kwargs["synth_dir"] = manual_dir
    manual_dir = None
  try:
    config = _config()
    b = builders.builder(_DATASET.value, config, data_dir=data_dir, **kwargs)
    if _OVERWRITE.value:
      for path in (pathlib.Path(b.data_path), b.work_dir):
        shutil.rmtree(path, ignore_errors=True)
    b = builders.prepare(_DATASET.value, b.builder_config, data_dir=data_dir,
                         manual_dir=manual_dir, **kwargs)
  except (readers.DataError, ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if b.summary is None:
    print(f"{b.name}/{b.builder_config.name} is prepared in {b.data_path} (no report found)")
  else:
    print(format_summary(b.summary, str(b.data_path)))
  return 0


def run():
  app.run(main)


if __name__ == "__main__":
  run()
