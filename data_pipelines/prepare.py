r"""Prepares Clotho, AudioCaps or synthcaps as a TFDS array_record dataset (no TensorFlow).

  python -m data_pipelines.prepare --dataset=clotho --manual_dir=~/clotho \
      --data_dir=~/tfds [--config=32k] [--num_workers=2]
  python -m data_pipelines.prepare --dataset=audiocaps --manual_dir=~/audiocaps --data_dir=~/tfds
  python -m data_pipelines.prepare --dataset=synthcaps --config=demo_32k --data_dir=~/tfds
  python -m data_pipelines.prepare --dataset=folder --config=16k --manual_dir=~/esc50_dev \
      --folder_name=esc50 --folder_csv=esc50_dev.csv --folder_audio_dir=audio \
      --folder_split_column=fold --folder_split_values=train=1+2,validation=3,test=5 \
      --folder_label_column=category --data_dir=~/tfds

Your own folder (--dataset=folder, data_pipelines/folder.py): the --folder_* flags are the
training config's config.data.folder_* fields; the prepared set is named by a hash of them,
so a training run finds it only when both agree (or let the training prepare it:
--config.data.prepare_if_missing=True).

An interrupted run picks up where it stopped (finished shards are kept); a finished dataset
is reused. The closing summary lists clips, captions, hours of audio and every skipped input
with its reason; the same facts are saved as prepare_report.json next to the records.
Several hosts (the multi-process flags of every command, hade_jax/cli.py): process 0 prepares
into the shared --data_dir, the others do nothing.
Errors end in one message and a non-zero exit; --verbose (or HADE_VERBOSE=1) adds the
traceback and TFDS's log.
"""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
from collections.abc import Sequence

from absl import flags

from data_pipelines import builders, folder, readers
from hade_jax import cli, distributed


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_enum("dataset", None, ["clotho", "audiocaps", "synthcaps", "folder"],
                    "Which dataset to prepare.", flag_values=fv)
  flags.DEFINE_string("data_dir", None, "TFDS data dir the records are written to.",
                      flag_values=fv)
  flags.DEFINE_string(
      "manual_dir", None, "The folder holding your download (clotho, audiocaps); for synthcaps "
      "where the generated WAV/CSV files go (default <data_dir>/downloads/manual/synthcaps/).",
      flag_values=fv)
  flags.DEFINE_string(
      "config", None, "Builder config: a rate (16k, 22k, 32k, 44k, 48k; AudioCaps 2.0 "
      "captions: 32k_v2, ...), for synthcaps a size and rate (tiny_16k, demo_32k, full_48k). "
      "Default: 32k / demo_32k.", flag_values=fv)
  flags.DEFINE_integer(
      "sample_rate", None, "Instead of --config: the rate in Hz (must be one of the configs' "
      "rates; for synthcaps it picks the rate of --synth_size).", flag_values=fv)
  flags.DEFINE_list("splits", None, "Splits to prepare (default: every split whose caption "
                    "CSV is present): train, validation, test.", flag_values=fv)
  flags.DEFINE_bool("strict", False, "Fail on the first bad input instead of skipping and "
                    "reporting it.", flag_values=fv)
  flags.DEFINE_integer("num_workers", os.cpu_count() or 1, "Processes decoding audio.",
                       flag_values=fv)
  flags.DEFINE_integer(
      "clips_per_shard", None, "CSV clips per shard (the unit of resumption); keep it when "
      "resuming.", flag_values=fv)
  flags.DEFINE_string("encoding", "auto", "Caption CSV encoding; 'auto' = UTF-8 with an "
                      "ISO-8859-1 fallback per line (reported).", flag_values=fv)
  flags.DEFINE_list("audio_dirs", None, "split=folder pairs for audio folders outside the "
                    "supported layouts, e.g. test=/data/ac/test_wav.", flag_values=fv)
  flags.DEFINE_bool("overwrite", False, "Delete a prepared (or partly prepared) copy of this "
                    "config first.", flag_values=fv)
  flags.DEFINE_bool("progress", True, "Show a progress bar.", flag_values=fv)
  flags.DEFINE_enum("synth_size", None, ["tiny", "demo", "full"],
                    "synthcaps: a named size (instead of --config).", flag_values=fv)
  flags.DEFINE_list("synth_clips", None, "synthcaps: custom clips per split, e.g. "
                    "train=2000,validation=200,test=200.", flag_values=fv)
  flags.DEFINE_float("synth_clip_seconds", None, "synthcaps: clip length.", flag_values=fv)
  flags.DEFINE_integer("synth_seed", 0, "synthcaps: the seed.", flag_values=fv)
  flags.DEFINE_integer("synth_family_size", 3, "synthcaps: clips per family (a base scene "
                       "and siblings differing in one detail).", flag_values=fv)
  _define_folder_flags(fv)
  cli.define_distributed_flags(fv)


def _define_folder_flags(fv: flags.FlagValues) -> None:
  """--folder_* = config.data.folder_* (defaults from `folder.FolderSpec`)."""
  spec = folder.FolderSpec
  flags.DEFINE_string("folder_name", spec.name, "folder: names the prepared set.",
                      flag_values=fv)
  flags.DEFINE_string("folder_csv", "", "folder: the one CSV of all splits (relative to "
                      "--manual_dir), rows assigned by --folder_split_column.", flag_values=fv)
  flags.DEFINE_list("folder_split_csvs", None, "folder: or split=CSV pairs, one CSV per split, "
                    "e.g. train=train.csv,test=test.csv.", flag_values=fv)
  flags.DEFINE_string("folder_audio_dir", "", "folder: the audio folder under --manual_dir.",
                      flag_values=fv)
  flags.DEFINE_string("folder_file_column", spec.file_column, "folder: the file name column.",
                      flag_values=fv)
  flags.DEFINE_string("folder_split_column", spec.split_column, "folder: the column that "
                      "assigns rows to splits.", flag_values=fv)
  flags.DEFINE_list("folder_split_values", None, "folder: split=values pairs, values joined "
                    "by '+', e.g. train=1+2,validation=3,test=5 (default: each split's name).",
                    flag_values=fv)
  flags.DEFINE_string("folder_label_column", "", "folder: labels variant: the class-name "
                      "column ('' = a captions CSV).", flag_values=fv)
  flags.DEFINE_multi_string("folder_template", list(folder.DEFAULT_TEMPLATES), "folder: "
                            "caption templates, each with one {} for the label (repeat the flag).",
                            flag_values=fv)


def folder_spec(fv: flags.FlagValues) -> folder.FolderSpec:
  """The --folder_* flags as a spec (UsageError when they do not describe a folder)."""
  csvs = folder.default_split_csvs() | _pairs(fv.folder_split_csvs, "folder_split_csvs")
  values = folder.default_split_values()
  if fv.folder_split_values:
    values = {k: tuple(v.split("+")) for k, v in
              _pairs(fv.folder_split_values, "folder_split_values").items()}
  try:
    return folder.FolderSpec(
        name=fv.folder_name, csv=fv.folder_csv, split_csvs=csvs, audio_dir=fv.folder_audio_dir,
        file_column=fv.folder_file_column, split_column=fv.folder_split_column,
        split_values=values, label_column=fv.folder_label_column,
        templates=tuple(fv.folder_template))
  except ValueError as e:
    raise cli.UsageError(f"--folder_*: {e}") from None


def _pairs(items: list[str] | None, flag: str, value=str) -> dict:
  out = {}
  for item in items or []:
    key, sep, v = item.partition("=")
    if not sep:
      raise cli.UsageError(f"--{flag} expects key=value pairs, got {item!r}")
    out[key.strip()] = value(v.strip())
  return out


def _config(fv: flags.FlagValues):
  """The builder config from --config / --sample_rate / --synth_* flags."""
  rate_names = {v: k for k, v in builders.RATES.items()}
  if fv.sample_rate is not None and fv.sample_rate not in rate_names:
    raise cli.UsageError(f"--sample_rate={fv.sample_rate} is not one of {sorted(rate_names)}")
  if fv.dataset != "synthcaps":
    if fv.config and fv.sample_rate:
      raise cli.UsageError("give --config or --sample_rate, not both")
    if fv.dataset == "folder":  # --config is the rate; the name comes from the spec
      rate = fv.sample_rate or builders.RATES.get(fv.config or "32k")
      if rate is None:
        raise cli.UsageError(f"--config={fv.config}: a folder's config is its rate, one of "
                             f"{', '.join(builders.RATES)}")
      return builders.folder_config(folder_spec(fv), rate)
    if fv.sample_rate:
      return rate_names[fv.sample_rate]
    return fv.config
  custom = fv.synth_clips or fv.synth_clip_seconds or fv.synth_seed or (
      fv.synth_family_size != 3)
  if fv.config and not (custom or fv.synth_size or fv.sample_rate):
    return fv.config
  rate = fv.sample_rate or 32_000
  if fv.config:
    size, _, rate_name = fv.config.partition("_")
    rate = builders.RATES.get(rate_name, rate)
  else:
    size = fv.synth_size or "demo"
  clips = _pairs(fv.synth_clips, "synth_clips", int) or None
  if clips:
    return builders.synth_config(None, rate, clips=clips,
                                 clip_seconds=fv.synth_clip_seconds or 10.0,
                                 seed=fv.synth_seed, family_size=fv.synth_family_size)
  if size not in ("tiny", "demo", "full"):
    raise cli.UsageError(f"unknown synthcaps size {size!r}: tiny, demo or full")
  return builders.synth_config(size, rate, clip_seconds=fv.synth_clip_seconds,
                               seed=fv.synth_seed, family_size=fv.synth_family_size)


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


def main(argv: Sequence[str] | None = None) -> int:
  """Prepares as the command line says (argv without the program name)."""
  fv, rest = cli.parse(define_flags, argv, doc=__doc__, prog="python -m data_pipelines.prepare")
  if rest:
    raise cli.UsageError(f"unexpected arguments: {rest}")
  # TFDS's INFO lines would bury the summary (--verbose shows them).
  cli.setup_logging(logging.INFO if fv.verbose or cli.is_verbose(()) else logging.WARNING)
  if not fv.dataset or not fv.data_dir:
    raise cli.UsageError("--dataset and --data_dir are required")
  if fv.dataset != "synthcaps" and not fv.manual_dir:
    instructions = builders.builder(fv.dataset, data_dir=fv.data_dir
                                    ).MANUAL_DOWNLOAD_INSTRUCTIONS
    raise cli.UsageError(f"--manual_dir is required for {fv.dataset}:\n{instructions}")
  plan = distributed.plan(fv.coordinator_address, fv.num_processes, fv.process_id)
  if plan.mode == "explicit" and plan.process_id != 0:
    # One writer: the data_dir is the folder every host shares (see hade_jax/distributed.py).
    print(f"process {plan.process_id} of {plan.num_processes}: process 0 prepares the data")
    return 0
  data_dir = os.path.expanduser(fv.data_dir)
  manual_dir = os.path.expanduser(fv.manual_dir) if fv.manual_dir else None
  kwargs = dict(strict=fv.strict, num_workers=fv.num_workers,
                clips_per_shard=fv.clips_per_shard, encoding=fv.encoding,
                audio_dirs=_pairs(fv.audio_dirs, "audio_dirs"), splits=fv.splits,
                progress=fv.progress)
  if fv.dataset == "synthcaps":
    kwargs["synth_dir"] = manual_dir
    manual_dir = None
  config = _config(fv)
  b = builders.builder(fv.dataset, config, data_dir=data_dir, **kwargs)
  if fv.overwrite:
    for path in (pathlib.Path(b.data_path), b.work_dir):
      shutil.rmtree(path, ignore_errors=True)
  b = builders.prepare(fv.dataset, b.builder_config, data_dir=data_dir,
                       manual_dir=manual_dir, **kwargs)
  if b.summary is None:
    print(f"{b.name}/{b.builder_config.name} is prepared in {b.data_path} (no report found)")
  else:
    print(format_summary(b.summary, str(b.data_path)))
  return 0


def run():
  cli.main_entry(main)


if __name__ == "__main__":
  run()
