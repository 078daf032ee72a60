"""Train on your own folder: audio files plus a captions (or class labels) CSV.

A `FolderSpec` says how to read the folder; `load_splits` turns it into the same
`readers.SplitSource`s the Clotho and AudioCaps readers give, so the TFDS builder `folder`
(`builders.Folder`) prepares it by the same resumable array_record path.

Caption CSVs (columns found by name in the header):
- wide: one row per clip, `file_name,caption_1,...,caption_N` (Clotho's layout);
- long: one row per caption, `file_name,caption`; rows of a clip need not be adjacent (the
  clip takes the line of its first row, its captions in row order).
Labels CSVs: `file_name,<label_column>,...` (ESC-50's `esc50.csv` as is, label_column
'category'); every clip gets one caption per template, its `{}` replaced by the label with
underscores read as spaces ('The sound of {}.' + 'dog_bark' -> 'The sound of dog bark.').

Splits: either one CSV per split (`split_csvs`), or one CSV whose `split_column` assigns each row
(`split_values`: split -> the column values it takes, e.g. ESC-50 folds {'train': ('1', '2')}).
Rows whose value no split takes are not used. A clip's `clip_index` is its position among the
clips of its CSV (stable when other clips go missing, unique across splits of one CSV).

Bad input follows the Clotho/AudioCaps policy (`readers`): a bad row is skipped and reported
with its file and line, a missing audio file is reported and its clip skipped, and a header
without the columns named raises `readers.DataError` naming the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
from collections.abc import Mapping, Sequence

from data_pipelines import readers

SPLITS = ("train", "validation", "test")
# CLAP's zero-shot prompts (hade_jax/zero_shot.py uses the same ones and placeholder), so
# that a labels folder trains on the texts zero-shot classification asks with.
DEFAULT_TEMPLATES = ("This is a sound of {}.", "A sound of {}.", "The sound of {}.",
                     "A recording of {}.", "{} can be heard.")
PLACEHOLDER = "{}"
_WIDE = re.compile(r"caption_\d+")


def default_split_csvs() -> dict[str, str]:
  """No per-split CSVs (`FolderSpec.split_csvs`)."""
  return {s: "" for s in SPLITS}


def default_split_values() -> dict[str, tuple[str, ...]]:
  """A split column holding the split names ('train', 'validation', 'test')."""
  return {s: (s,) for s in SPLITS}


@dataclasses.dataclass(frozen=True)
class FolderSpec:
  """How to read a folder of audio and its CSV(s); relative paths are under the folder.

  Attributes:
    name: the prepared dataset's name (builder config `<name>_<hash>_<rate>`).
    csv: the one CSV of every split (with `split_column`); '' when `split_csvs` is used.
    split_csvs: split -> its own CSV ('' = no such split).
    audio_dir: the audio folder ('' = the folder itself).
    file_column: the column of audio file names.
    split_column: the column of `csv` that assigns rows to splits.
    split_values: split -> the values of `split_column` it takes.
    label_column: labels variant: the column of class names ('' = captions).
    templates: labels variant: caption templates, each with one `{}` for the label.
  """

  name: str = "folder"
  csv: str = ""
  split_csvs: Mapping[str, str] = dataclasses.field(default_factory=default_split_csvs)
  audio_dir: str = ""
  file_column: str = "file_name"
  split_column: str = "split"
  split_values: Mapping[str, Sequence[str]] = dataclasses.field(
      default_factory=default_split_values)
  label_column: str = ""
  templates: Sequence[str] = DEFAULT_TEMPLATES

  def __post_init__(self):
    if not re.fullmatch(r"[a-z][a-z0-9]*", self.name):
      raise ValueError(f"folder name {self.name!r}: use lower-case letters and digits, "
                       "starting with a letter (it names the prepared dataset)")
    if bool(self.csv) == any(self.split_csvs.values()):
      raise ValueError("give the folder's CSV either as `csv` (one CSV with a split column) "
                       "or as `split_csvs` (one CSV per split), not both or neither")
    unknown = (set(self.split_csvs) | set(self.split_values)) - set(SPLITS)
    if unknown:
      raise ValueError(f"unknown splits {sorted(unknown)}; known: {', '.join(SPLITS)}")
    if self.label_column:
      if not self.templates:
        raise ValueError("a labels folder needs at least one caption template")
      for t in self.templates:
        if not isinstance(t, str) or t.count(PLACEHOLDER) != 1:
          raise ValueError(f"caption template {t!r} needs exactly one {PLACEHOLDER} where the "
                           "label goes, e.g. 'The sound of {}.'")

  def to_json(self) -> dict:
    """Every field, plain (sorted mappings, lists), as hashed into the config name."""
    d = dataclasses.asdict(self)
    d["split_csvs"] = {k: v for k, v in sorted(self.split_csvs.items()) if v}
    d["split_values"] = {k: [str(x) for x in v] for k, v in sorted(self.split_values.items())}
    d["templates"] = list(self.templates) if self.label_column else []
    return d

  def config_name(self, rate_name: str) -> str:
    """`<name>_<8 hex digits of the spec>_<rate>`: another spec never reuses a prepared set."""
    digest = hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()
    return f"{self.name}_{digest[:8]}_{rate_name}"

  def splits(self) -> list[str]:
    """The splits this spec defines, in SPLITS order."""
    if self.csv:
      return [s for s in SPLITS if self.split_values.get(s)]
    return [s for s in SPLITS if self.split_csvs.get(s)]


def label_caption(template: str, label: str) -> str:
  """'The sound of {}.' + 'dog_bark' -> 'The sound of dog bark.' (normalised)."""
  return readers.normalize_caption(template.replace(PLACEHOLDER, label.replace("_", " ")))


def _columns(header: list[str], csv_path: pathlib.Path, spec: FolderSpec,
             with_split: bool) -> dict[str, int]:
  """Positions of the columns the spec uses; DataError naming the file when one is absent."""
  wanted = [spec.file_column]
  if with_split:
    wanted.append(spec.split_column)
  if spec.label_column:
    wanted.append(spec.label_column)
  missing = [c for c in wanted if c not in header]
  has_captions = "caption" in header or any(_WIDE.fullmatch(h) for h in header)
  if missing or not (spec.label_column or has_captions):
    what = ", ".join(missing) if missing else "caption or caption_1..caption_N"
    raise readers.DataError(
        f"{csv_path}:1: the header {','.join(header)!r} lacks {what}; expected "
        f"'{spec.file_column},caption_1,...' (wide), '{spec.file_column},caption' (long)"
        + (f" or a '{spec.label_column}' labels column" if spec.label_column else "")
        + (f" and the split column '{spec.split_column}'" if with_split else ""))
  return {name: header.index(name) for name in wanted}


def read_folder_csv(csv_path: os.PathLike | str, spec: FolderSpec, *,
                    with_split: bool = False, encoding: str = "auto",
                    report: readers.Report | None = None) -> dict[str, list[readers.ClipEntry]]:
  """Parses a captions or labels CSV into clips grouped by their split value, in CSV order.

  Args:
    csv_path: the CSV.
    spec: the columns and, for labels, the templates.
    with_split: group by the value of `spec.split_column` (else every clip is under '').
    encoding, report: as `readers.read_csv`.

  Returns:
    {split value: clips}; each clip has a unique file name, at least one caption, and with
    labels `metadata['label']`.

  Raises:
    readers.DataError: unreadable or empty file, a header without the columns the spec names,
      or invalid CSV syntax (naming the file and line).
  """
  csv_path = pathlib.Path(csv_path)
  report = report if report is not None else readers.Report()
  header, rows = readers.read_csv(csv_path, encoding, report)
  col = _columns(header, csv_path, spec, with_split)
  wide = [i for i, h in enumerate(header) if _WIDE.fullmatch(h)]
  long_col = header.index("caption") if "caption" in header and not wide else None
  clips: dict[str, readers.ClipEntry] = {}
  split_of: dict[str, str] = {}
  for line, fields in rows:
    if len(fields) != len(header):
      report.add(readers.Issue("malformed_row", str(csv_path), line, f"{len(fields)} fields "
                               f"where the header has {len(header)}; row skipped"))
      continue
    name = fields[col[spec.file_column]]
    if not name.strip():
      report.add(readers.Issue("malformed_row", str(csv_path), line,
                               f"blank {spec.file_column}; row skipped"))
      continue
    split = fields[col[spec.split_column]].strip() if with_split else ""
    entry = clips.get(name)
    if entry is not None and (spec.label_column or long_col is None):
      report.add(readers.Issue("duplicate_clip", str(csv_path), line, f"{name!r} already "
                               f"listed on line {entry.line}; row skipped", clip=name))
      continue
    if entry is None:
      entry = clips[name] = readers.ClipEntry(
          clip_id=name, clip_index=len(clips), captions=[], csv_path=str(csv_path), line=line,
          file_name=name)
      split_of[name] = split
    if spec.label_column:
      label = readers.normalize_caption(fields[col[spec.label_column]])
      if not label:
        report.add(readers.Issue("malformed_row", str(csv_path), line,
                                 f"blank {spec.label_column} of {name!r}; row skipped", clip=name))
        continue
      entry.metadata["label"] = label
      entry.captions = [label_caption(t, label) for t in spec.templates]
    elif long_col is not None:
      entry.captions += _caption_list(fields, [long_col], header, csv_path, line, name, report)
    else:
      entry.captions = _caption_list(fields, wide, header, csv_path, line, name, report)
  return _by_split(clips, split_of, report)


def _caption_list(fields, columns, header, csv_path, line, clip, report) -> list[str]:
  out = []
  for i in columns:
    caption = readers.normalize_caption(fields[i])
    if caption:
      out.append(caption)
    else:
      report.add(readers.Issue("empty_caption", str(csv_path), line, f"{header[i]} of {clip!r}"
                               " is empty or whitespace; caption dropped", clip=clip))
  return out


def _by_split(clips, split_of, report) -> dict[str, list[readers.ClipEntry]]:
  out: dict[str, list[readers.ClipEntry]] = {}
  for name, entry in clips.items():
    if not entry.captions:
      if "label" not in entry.metadata:  # a labels row without a label was reported already
        report.add(readers.Issue("no_captions", entry.csv_path, entry.line,
                                 f"{name!r} has no non-empty caption; clip skipped", clip=name))
      continue
    out.setdefault(split_of[name], []).append(entry)
  return out


def load_splits(spec: FolderSpec, folder: os.PathLike | str, splits: Sequence[str], *,
                reports: Mapping[str, readers.Report], encoding: str = "auto",
                audio_dirs: Mapping[str, str] | None = None
                ) -> dict[str, readers.SplitSource]:
  """Each wanted split's clips with their audio files resolved (missing ones reported).

  Raises:
    readers.DataError: a CSV or the audio folder is missing, a split the spec does not
      define is asked for, or no clip of a split has its audio in the folder.
  """
  folder = pathlib.Path(folder)
  unknown = [s for s in splits if s not in spec.splits()]
  if unknown:
    raise readers.DataError(f"{spec.name}: no split {unknown} in the folder spec (it defines "
                            f"{spec.splits()}); set its CSV or split values, or leave it out")
  parsed: dict[str, tuple[pathlib.Path, list[readers.ClipEntry]]] = {}
  if spec.csv:
    csv_path = _existing(folder / spec.csv, "CSV")
    report = readers.Report(reports[splits[0]].strict) if splits else readers.Report()
    by_value = read_folder_csv(csv_path, spec, with_split=True, encoding=encoding,
                               report=report)
    for s in splits:  # a value may serve several splits (e.g. one fold for validation and test)
      entries = [e for v in dict.fromkeys(map(str, spec.split_values[s]))
                 for e in by_value.get(v, [])]
      parsed[s] = (csv_path, sorted(entries, key=lambda e: e.clip_index))
    split_of_clip = {e.clip_id: s for s in reversed(splits) for e in parsed[s][1]}
    for issue in report.issues:  # a row's issue goes to its (first) split, else the first one
      reports[split_of_clip.get(issue.clip, splits[0])].add(issue)
  else:
    for s in splits:
      csv_path = _existing(folder / spec.split_csvs[s], "CSV")
      parsed[s] = (csv_path, read_folder_csv(csv_path, spec, encoding=encoding,
                                             report=reports[s]).get("", []))
  out = {}
  for s, (csv_path, entries) in parsed.items():
    audio = pathlib.Path((audio_dirs or {}).get(s) or folder / spec.audio_dir)
    audio_folder = readers.AudioFolder(_existing(audio, "audio folder"))
    found = readers.resolve_audio(entries, audio_folder, reports[s], dataset="folder")
    if entries and not found:
      raise readers.DataError(
          f"none of the {len(entries)} clips of split {s!r} in {csv_path} has its audio in "
          f"{audio} ({len(audio_folder)} audio files there); set the audio folder "
          "(--folder_audio_dir, config.data.folder_audio_dir)")
    out[s] = readers.SplitSource(s, csv_path, audio, found, len(entries))
  return out


def _existing(path: pathlib.Path, what: str) -> pathlib.Path:
  if not path.exists():
    raise readers.DataError(f"{path}: the folder's {what} does not exist; check --manual_dir "
                            "and the folder flags (config.data.manual_dir, folder_*)")
  return path


def class_names(spec: FolderSpec, folder: os.PathLike | str, encoding: str = "auto"
                ) -> list[str]:
  """The class list of a labels folder: every label in its CSV(s), sorted ([] for captions).

  Every row counts, whatever its split, so that preparing some splits gives the same list
  (and class indices) as preparing all of them. Bad rows were reported by `load_splits`.
  """
  if not spec.label_column:
    return []
  folder = pathlib.Path(folder)
  paths = [spec.csv] if spec.csv else [spec.split_csvs[s] for s in spec.splits()]
  labels = set()
  for path in paths:
    for entries in read_folder_csv(_existing(folder / path, "CSV"), spec,
                                   encoding=encoding).values():
      labels.update(e.metadata["label"] for e in entries)
  return sorted(labels)
