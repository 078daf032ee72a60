"""Readers for the real Clotho v2.1 and AudioCaps layouts (and synthcaps, which uses Clotho's).

A reader turns a caption CSV into `ClipEntry`s in CSV order and finds each clip's audio file
in the user's download folder. Whatever is wrong with the input becomes an `Issue` naming the
file and line, collected in a `Report`; the caller decides (strict mode) whether an issue is
fatal. Nothing here decodes audio (see `audio_io`) or writes records (see `builders`).

CSV policy:
- Encoding: each line is decoded as UTF-8 (a BOM is dropped); a line that is not valid UTF-8
  is decoded as ISO-8859-1 (the encoding of the Clotho metadata CSVs) and reported. CRLF, LF
  and CR line endings are accepted; quoting follows RFC 4180 (Clotho file names contain
  commas, quotes, `#`, `&`, `;` and leading spaces, so names are never stripped).
- Captions are normalised by `normalize_caption` (control characters become spaces, then
  whitespace is stripped and runs collapsed to one space); an empty or whitespace-only caption
  is dropped and reported; a clip left with no caption is skipped.
- A row with the wrong number of fields, a blank file name or a start time that is not a plain
  decimal number of seconds ('30', '30.5') is skipped and reported; so is a second row for the
  same clip (Clotho).
- Whatever the bytes of the file, a reader returns clips (each issue reported) or raises
  `DataError` naming the file (and the line where there is one); no other exception escapes
  for bad content.
"""

from __future__ import annotations

import codecs
import collections
import csv
import dataclasses
import html
import io
import json
import os
import pathlib
import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence

from data_pipelines import audio_io

# TFDS split name -> Clotho's split name (file `clotho_captions_{name}.csv`, folder `{name}/`).
CLOTHO_SPLITS = {"train": "development", "validation": "validation", "test": "evaluation"}
# TFDS split name -> AudioCaps CSV stem (`{stem}.csv`, audio folder usually `{stem}/`).
AUDIOCAPS_SPLITS = {"train": "train", "validation": "val", "test": "test"}

_UTF8_BOM = b"\xef\xbb\xbf"
# Unicode category Cc: C0 controls, DEL and C1 controls.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# AudioCaps start times as written in the CSVs and file names: plain decimal seconds.
_START_TIME = re.compile(r"[0-9]+(\.[0-9]*)?|\.[0-9]+", re.ASCII)


class DataError(ValueError):
  """Input that cannot be used; the message names the file (and line) and how to fix it."""


@dataclasses.dataclass(frozen=True)
class Issue:
  """One problem in the input.

  Attributes:
    kind: 'non_utf8', 'malformed_row', 'empty_caption', 'no_captions', 'duplicate_clip',
      'missing_audio', 'ambiguous_audio', or an `audio_io.AudioError` reason ('unreadable',
      'empty', 'non_finite', 'unsupported_rate').
    path: the CSV or audio file at fault.
    line: 1-based line in `path` (None for audio files).
    detail: what is wrong and what was done about it.
    clip: the clip's id when the issue concerns one clip.
  """

  kind: str
  path: str
  line: int | None
  detail: str
  clip: str | None = None

  def __str__(self) -> str:
    where = f"{self.path}:{self.line}" if self.line is not None else self.path
    return f"{where}: {self.detail}"

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


# What each issue kind costs; used by the summaries.
ISSUE_OUTCOMES = {
    "non_utf8": "line decoded as ISO-8859-1",
    "malformed_row": "row skipped",
    "empty_caption": "caption dropped",
    "no_captions": "clip skipped",
    "duplicate_clip": "row skipped",
    "missing_audio": "clip skipped",
    "ambiguous_audio": "clip skipped",
    "unreadable": "clip skipped",
    "empty": "clip skipped",
    "non_finite": "clip skipped",
    "unsupported_rate": "clip skipped",
}


class Report:
  """Collects issues; in strict mode `check` turns them into a `DataError`."""

  def __init__(self, strict: bool = False):
    self.strict = strict
    self.issues: list[Issue] = []

  def add(self, issue: Issue) -> None:
    self.issues.append(issue)

  def extend(self, issues: Iterable[Issue]) -> None:
    self.issues.extend(issues)

  def by_kind(self) -> dict[str, list[Issue]]:
    groups = collections.defaultdict(list)
    for issue in self.issues:
      groups[issue.kind].append(issue)
    return dict(groups)

  def check(self, what: str) -> None:
    """Raises in strict mode if any issue was collected (message shows the first few)."""
    if self.strict and self.issues:
      raise DataError(format_issues(self.issues, header=f"strict mode: {what} has problems"))


def format_issues(issues: Sequence[Issue], header: str, first: int = 5) -> str:
  """Issues grouped by kind with counts and the first few of each, one per line."""
  groups = collections.defaultdict(list)
  for issue in issues:
    groups[issue.kind].append(issue)
  lines = [header]
  for kind, group in sorted(groups.items()):
    outcome = ISSUE_OUTCOMES.get(kind, "")
    lines.append(f"  {kind} ({outcome}): {len(group)}")
    lines.extend(f"    {issue}" for issue in group[:first])
    if len(group) > first:
      lines.append(f"    ... and {len(group) - first} more")
  return "\n".join(lines)


@dataclasses.dataclass
class ClipEntry:
  """One clip of a split as the caption CSV describes it.

  Attributes:
    clip_id: stable string id (Clotho: the CSV file name; AudioCaps:
      `{youtube_id}_{start_time}`).
    clip_index: stable integer id: the clip's position among the CSV's clips (0-based, gaps
      where rows were skipped), so it does not change when other clips go missing.
    captions: the normalised, non-empty captions in CSV order.
    csv_path: the CSV the clip comes from.
    line: the CSV line of the clip's first row.
    file_name: the audio file name the CSV gives (None for AudioCaps).
    metadata: dataset-specific facts (AudioCaps ids, synthcaps ground truth), JSON-able.
    audio_path: the resolved audio file, set by `resolve_audio`.
    matched_by: how the file was found ('exact' or the quirk that matched).
  """

  clip_id: str
  clip_index: int
  captions: list[str]
  csv_path: str
  line: int
  file_name: str | None = None
  metadata: dict = dataclasses.field(default_factory=dict)
  audio_path: str | None = None
  matched_by: str | None = None


def normalize_caption(text: str) -> str:
  """A caption as stored: control characters as spaces, whitespace stripped and collapsed.

  Control characters (Unicode category Cc: NUL, ESC, DEL, C1 codes, ...) are never part of a
  caption; they come from broken exports. The result is '' or a string with no control
  character, no leading/trailing whitespace and no run of two whitespace characters. Format
  characters (zero-width joiners of emoji, soft hyphens) are kept.
  """
  if not text.isprintable():  # fast path: printable text has no control character
    text = _CONTROL.sub(" ", text)
  return " ".join(text.split())


def decode_lines(path: pathlib.Path, encoding: str, report: Report) -> str:
  """Reads a text file; 'auto' = UTF-8 per line with an ISO-8859-1 fallback (reported).

  Raises:
    DataError: an unknown `encoding`, or bytes that are not valid in an explicit `encoding`
      (naming the file and line).
    OSError: the file cannot be read.
  """
  if encoding != "auto":
    try:
      codecs.lookup(encoding)
    except LookupError as e:
      raise DataError(f"{path}: unknown text encoding {encoding!r}; pass a Python codec name "
                      "such as 'utf-8' or 'iso-8859-1', or 'auto'") from e
  raw = path.read_bytes()
  if raw.startswith(_UTF8_BOM):
    raw = raw[len(_UTF8_BOM):]
  if encoding != "auto":
    try:
      return raw.decode(encoding)
    except LookupError as e:  # a codec that is not bytes -> text, e.g. 'hex' or 'rot13'
      raise DataError(f"{path}: {encoding!r} is not a text encoding ({e})") from e
    except UnicodeDecodeError as e:
      # The line as the CSV reader counts them: CR, LF and CRLF end a line.
      line = len((raw[:e.start] + b"x").splitlines())
      raise DataError(
          f"{path}:{line}: bytes {raw[e.start:e.end]!r} are not valid {encoding}; "
          "pass --encoding=auto to decode such lines as ISO-8859-1") from e
  pieces = []
  for number, line in enumerate(raw.splitlines(keepends=True), start=1):
    try:
      pieces.append(line.decode("utf-8"))
    except UnicodeDecodeError as e:
      pieces.append(line.decode("iso-8859-1"))
      report.add(Issue("non_utf8", str(path), number,
                       f"bytes {line[e.start:e.end]!r} are not UTF-8; line decoded as ISO-8859-1"))
  return "".join(pieces)


def read_csv(path: os.PathLike | str, encoding: str = "auto",
             report: Report | None = None) -> tuple[list[str], list[tuple[int, list[str]]]]:
  """Reads a CSV as (header, [(first line of the row, fields)]).

  Any bytes give a result or a `DataError`: lines that are not UTF-8 are decoded as ISO-8859-1
  (reported, with `encoding='auto'`); NUL and other control characters are kept in the fields
  (captions lose them in `normalize_caption`); blank lines are not rows.

  Raises:
    DataError: unreadable or empty file, unknown encoding, bytes invalid in an explicit
      encoding, or a CSV syntax error (e.g. a field longer than `csv.field_size_limit()`, as
      an unclosed quote makes), naming the file and line.
  """
  path = pathlib.Path(path)
  report = report if report is not None else Report()
  try:
    text = decode_lines(path, encoding, report)
  except OSError as e:
    raise DataError(f"{path}: cannot read the caption CSV: {e}") from e
  reader = csv.reader(io.StringIO(text, newline=""))
  rows = []
  start = 1
  try:
    for fields in reader:
      rows.append((start, fields))
      start = reader.line_num + 1
  except csv.Error as e:
    raise DataError(f"{path}:{start}: not a valid CSV row ({e})") from e
  if not rows:
    raise DataError(f"{path}: the caption CSV is empty (expected a header line)")
  (_, header), body = rows[0], rows[1:]
  # Blank lines (e.g. a trailing newline pair) are not rows.
  body = [(line, fields) for line, fields in body if fields and any(f.strip() for f in fields)]
  return [h.strip() for h in header], body


def read_clotho_captions(csv_path: os.PathLike | str, *, encoding: str = "auto",
                         report: Report | None = None) -> list[ClipEntry]:
  """Parses a Clotho caption CSV (`file_name,caption_1..caption_5`) into clips in CSV order.

  Returns:
    The clips in CSV order: unique `clip_id`s (= file names, never stripped), increasing
    `clip_index` and `line` (>= 2), each with at least one caption, every caption normalised
    (`normalize_caption`) and non-empty. Every row or caption left out is in `report`.

  Raises:
    DataError: the file is unreadable or empty, the header is not a Clotho caption header, or
      the file is not valid CSV (see `read_csv`); the message names the file and line.
  """
  csv_path = pathlib.Path(csv_path)
  report = report if report is not None else Report()
  header, rows = read_csv(csv_path, encoding, report)
  caption_columns = [i for i, name in enumerate(header) if re.fullmatch(r"caption_\d+", name)]
  if not header or header[0] != "file_name" or not caption_columns:
    raise DataError(
        f"{csv_path}:1: expected a Clotho caption header 'file_name,caption_1,...,caption_5', "
        f"found {','.join(header)!r}")
  entries, seen = [], {}
  for clip_index, (line, fields) in enumerate(rows):
    if len(fields) != len(header):
      report.add(Issue("malformed_row", str(csv_path), line,
                       f"{len(fields)} fields where the header has {len(header)}; row skipped"))
      continue
    file_name = fields[0]
    if not file_name.strip():
      report.add(Issue("malformed_row", str(csv_path), line, "blank file_name; row skipped"))
      continue
    if file_name in seen:
      report.add(Issue("duplicate_clip", str(csv_path), line,
                       f"{file_name!r} already listed on line {seen[file_name]}; row skipped",
                       clip=file_name))
      continue
    seen[file_name] = line
    captions = _captions(fields, caption_columns, header, csv_path, line, file_name, report)
    if not captions:
      continue
    entries.append(ClipEntry(clip_id=file_name, clip_index=clip_index, captions=captions,
                             csv_path=str(csv_path), line=line, file_name=file_name))
  return entries


def _captions(fields, columns, header, csv_path, line, clip, report) -> list[str]:
  captions = []
  for i in columns:
    caption = normalize_caption(fields[i])
    if caption:
      captions.append(caption)
    else:
      report.add(Issue("empty_caption", str(csv_path), line,
                       f"{header[i]} of {clip!r} is empty or whitespace; caption dropped",
                       clip=clip))
  if not captions:
    report.add(Issue("no_captions", str(csv_path), line,
                     f"{clip!r} has no non-empty caption; clip skipped", clip=clip))
  return captions


def _start_time(text: str) -> str | None:
  """AudioCaps start time as written in file names: '30', '30.5' (None if not a number).

  Only plain decimal seconds are accepted: float() would also take '1e400' (inf), 'nan',
  '1_0' and non-ASCII digits, none of which names a file.
  """
  if not _START_TIME.fullmatch(text):
    return None
  value = float(text)
  if value == float("inf"):  # more digits than a float holds
    return None
  return str(int(value)) if value == int(value) else repr(value)


def read_audiocaps_captions(csv_path: os.PathLike | str, *, encoding: str = "auto",
                            report: Report | None = None) -> list[ClipEntry]:
  """Parses an AudioCaps CSV (`audiocap_id,youtube_id,start_time,caption`).

  Rows are not grouped in the official files: clips are (youtube_id, start_time) pairs in
  order of first appearance, with their captions in row order.

  Returns:
    The clips: unique `clip_id`s `{youtube_id}_{start_time}`, `clip_index` 0, 1, ..., each with
    at least one normalised, non-empty caption. Every row or caption left out is in `report`.

  Raises:
    DataError: the file is unreadable or empty, the header lacks youtube_id, start_time or
      caption, or the file is not valid CSV (see `read_csv`); the message names the file and
      line.
  """
  csv_path = pathlib.Path(csv_path)
  report = report if report is not None else Report()
  header, rows = read_csv(csv_path, encoding, report)
  missing = [c for c in ("youtube_id", "start_time", "caption") if c not in header]
  if missing:
    raise DataError(
        f"{csv_path}:1: expected an AudioCaps header 'audiocap_id,youtube_id,start_time,"
        f"caption', found {','.join(header)!r} (missing {', '.join(missing)})")
  col = {name: header.index(name) for name in header}
  clips: dict[tuple[str, str], ClipEntry] = {}
  for line, fields in rows:
    if len(fields) != len(header):
      report.add(Issue("malformed_row", str(csv_path), line,
                       f"{len(fields)} fields where the header has {len(header)}; row skipped"))
      continue
    youtube_id = fields[col["youtube_id"]].strip()
    start = _start_time(fields[col["start_time"]].strip())
    if not youtube_id or start is None:
      report.add(Issue("malformed_row", str(csv_path), line,
                       f"youtube_id {fields[col['youtube_id']]!r} / start_time "
                       f"{fields[col['start_time']]!r} unusable; row skipped"))
      continue
    key = (youtube_id, start)
    clip_id = f"{youtube_id}_{start}"
    entry = clips.get(key)
    if entry is None:
      entry = clips[key] = ClipEntry(
          clip_id=clip_id, clip_index=len(clips), captions=[], csv_path=str(csv_path),
          line=line, metadata={"youtube_id": youtube_id, "start_time": start,
                               "audiocap_ids": []})
    caption = normalize_caption(fields[col["caption"]])
    if not caption:
      report.add(Issue("empty_caption", str(csv_path), line,
                       f"caption of {clip_id!r} is empty or whitespace; caption dropped",
                       clip=clip_id))
      continue
    entry.captions.append(caption)
    if "audiocap_id" in col:
      entry.metadata["audiocap_ids"].append(fields[col["audiocap_id"]].strip())
  entries = []
  for entry in clips.values():
    if not entry.captions:
      report.add(Issue("no_captions", str(csv_path), entry.line,
                       f"{entry.clip_id!r} has no non-empty caption; clip skipped",
                       clip=entry.clip_id))
      continue
    entries.append(entry)
  return entries


class AudioFolder:
  """The audio files of one folder, looked up by name or by stem (any audio extension)."""

  def __init__(self, path: os.PathLike | str):
    self.path = pathlib.Path(path)
    self.names: set[str] = set()
    self.by_stem: dict[str, list[str]] = collections.defaultdict(list)
    self.normalized: dict[str, str] = {}
    with os.scandir(self.path) as it:
      for item in it:
        if not item.is_file():
          continue
        name = item.name
        self.names.add(name)
        self.normalized.setdefault(unicodedata.normalize("NFC", name), name)
        stem, ext = os.path.splitext(name)
        if ext.lower() in audio_io.AUDIO_EXTENSIONS:
          self.by_stem[stem].append(name)
    for names in self.by_stem.values():
      # Prefer lossless and the original format when several encodings of a clip exist.
      names.sort(key=lambda n: (audio_io.AUDIO_EXTENSIONS.index(os.path.splitext(n)[1].lower()),
                                n))

  def __len__(self) -> int:
    return sum(len(v) for v in self.by_stem.values())

  def find_name(self, name: str) -> str | None:
    if name in self.names:
      return name
    return self.normalized.get(unicodedata.normalize("NFC", name))

  def find_stem(self, stem: str) -> str | None:
    names = self.by_stem.get(stem)
    return names[0] if names else None


def clotho_name_candidates(name: str) -> Iterator[tuple[str, str]]:
  """(candidate file name, quirk) pairs for a Clotho CSV file name, most literal first."""
  yield name, "exact"
  # The DCASE retrieval set stores 'a: b.wav' as 'a_b.wav' (colon and spaces around it).
  yield re.sub(r"\s*:\s*", "_", name), "colon_to_underscore"
  yield name.replace(":", "_"), "colon_to_underscore"
  # Clotho CSVs keep HTML entities ('&amp;', '&#39;') that some extraction tools decode.
  yield html.unescape(name), "html_unescaped"


def audiocaps_stem_candidates(youtube_id: str, start: str) -> Iterator[tuple[str, str]]:
  """(file stem, layout) pairs for an AudioCaps clip in the common local layouts."""
  s = float(start)
  yield f"{youtube_id}_{start}", "id_start"
  yield f"Y{youtube_id}_{start}", "Yid_start"
  yield f"{youtube_id}_{s:.3f}_{s + 10:.3f}", "audioset_segment"
  yield f"Y{youtube_id}_{s:.3f}_{s + 10:.3f}", "audioset_segment"
  yield f"{youtube_id}_{start}_{int(s) + 10}", "id_start_end"
  yield f"Y{youtube_id}", "Yid"
  yield youtube_id, "id"


def resolve_audio(entries: Sequence[ClipEntry], folder: AudioFolder,
                  report: Report, *, dataset: str) -> list[ClipEntry]:
  """Finds each clip's file in `folder`; clips without one are reported and dropped."""
  found, claimed = [], {}
  for entry in entries:
    name, how = None, None
    if dataset == "audiocaps":
      for stem, layout in audiocaps_stem_candidates(entry.metadata["youtube_id"],
                                                    entry.metadata["start_time"]):
        name = folder.find_stem(stem)
        if name:
          how = layout
          break
    else:
      for candidate, how in clotho_name_candidates(entry.file_name):
        name = folder.find_name(candidate)
        if name:
          break
        stem, ext = os.path.splitext(candidate)
        if ext.lower() in audio_io.AUDIO_EXTENSIONS:
          name = folder.find_stem(stem)
          if name:
            how = how if name == candidate else f"{how}+other_extension"
            break
    if name is None:
      expected = entry.file_name or f"{entry.clip_id}.wav"
      report.add(Issue("missing_audio", entry.csv_path, entry.line,
                       f"{expected!r} not found in {folder.path}; clip skipped",
                       clip=entry.clip_id))
      continue
    if name in claimed:
      report.add(Issue("ambiguous_audio", entry.csv_path, entry.line,
                       f"{name!r} in {folder.path} already used for {claimed[name]!r}; "
                       "clip skipped", clip=entry.clip_id))
      continue
    claimed[name] = entry.clip_id
    entry.audio_path = str(folder.path / name)
    entry.matched_by = how
    if entry.file_name is None:
      entry.file_name = name
    found.append(entry)
  return found


def _first_existing(candidates: Sequence[pathlib.Path], kind: str) -> pathlib.Path | None:
  for path in candidates:
    if (path.is_dir() if kind == "dir" else path.is_file()):
      return path
  return None


def _listing(candidates: Sequence[pathlib.Path]) -> str:
  return "\n".join(f"  {p}" for p in candidates)


def clotho_csv_candidates(manual_dir: pathlib.Path, split: str) -> list[pathlib.Path]:
  name = f"clotho_captions_{CLOTHO_SPLITS[split]}.csv"
  return [manual_dir / name, manual_dir / "clotho_csv_files" / name,
          manual_dir / "csv_files" / name, manual_dir / "captions" / name]


def clotho_audio_candidates(manual_dir: pathlib.Path, split: str) -> list[pathlib.Path]:
  name = CLOTHO_SPLITS[split]
  return [manual_dir / name, manual_dir / f"clotho_audio_{name}" / name,
          manual_dir / f"clotho_audio_{name}", manual_dir / "clotho_audio_files" / name,
          manual_dir / "audio" / name]


def audiocaps_csv_candidates(manual_dir: pathlib.Path, split: str,
                             caption_version: str = "v1") -> list[pathlib.Path]:
  """The official repository keeps v1 CSVs in `dataset/` and AudioCaps 2.0 in `dataset2.0/`."""
  name = f"{AUDIOCAPS_SPLITS[split]}.csv"
  sub = ["dataset2.0", "audiocaps2.0"] if caption_version == "v2" else ["dataset", "audiocaps"]
  return ([manual_dir / s / name for s in sub] + [manual_dir / name, manual_dir / "csv" / name,
                                                   manual_dir / "captions" / name])


def audiocaps_audio_candidates(manual_dir: pathlib.Path, split: str) -> list[pathlib.Path]:
  stem = AUDIOCAPS_SPLITS[split]
  names = dict.fromkeys([stem, split])
  out = []
  for name in names:
    out += [manual_dir / name, manual_dir / "audio" / name, manual_dir / f"audiocaps_{name}",
            manual_dir / "waveforms" / name, manual_dir / f"{name}_audio"]
  return out + [manual_dir / "audio"]


@dataclasses.dataclass
class SplitSource:
  """Where a split's CSV and audio are, and its clips (audio resolved)."""

  split: str
  csv_path: pathlib.Path
  audio_dir: pathlib.Path
  entries: list[ClipEntry]
  num_csv_clips: int


def _csv_candidates(dataset: str, manual_dir: pathlib.Path, split: str,
                    caption_version: str) -> list[pathlib.Path]:
  if dataset == "audiocaps":
    return audiocaps_csv_candidates(manual_dir, split, caption_version)
  return clotho_csv_candidates(manual_dir, split)


def available_splits(dataset: str, manual_dir: os.PathLike | str,
                     caption_version: str = "v1") -> list[str]:
  """Splits whose caption CSV exists in `manual_dir` (any supported layout)."""
  manual_dir = pathlib.Path(manual_dir)
  splits = AUDIOCAPS_SPLITS if dataset == "audiocaps" else CLOTHO_SPLITS
  return [s for s in splits
          if _first_existing(_csv_candidates(dataset, manual_dir, s, caption_version), "file")]


def load_split(dataset: str, manual_dir: os.PathLike | str, split: str, *,
               report: Report, encoding: str = "auto",
               audio_dir: os.PathLike | str | None = None,
               caption_version: str = "v1") -> SplitSource:
  """Reads a split's CSV and resolves its audio files in the user's download folder.

  Args:
    dataset: 'clotho' or 'audiocaps' ('synthcaps' reads as 'clotho').
    manual_dir: the folder holding the user's download.
    split: 'train', 'validation' or 'test'.
    report: receives every issue (missing files, bad rows, ...).
    encoding: CSV encoding, 'auto' = UTF-8 with a per-line ISO-8859-1 fallback.
    audio_dir: the split's audio folder when it is not in a standard place.
    caption_version: AudioCaps 'v1' or 'v2' (which CSV folder is preferred).

  Raises:
    DataError: the CSV or the audio folder is not where any supported layout puts it.
  """
  manual_dir = pathlib.Path(manual_dir)
  is_audiocaps = dataset == "audiocaps"
  splits = AUDIOCAPS_SPLITS if is_audiocaps else CLOTHO_SPLITS
  if split not in splits:
    raise DataError(f"unknown split {split!r} for {dataset}; known: {', '.join(splits)}")
  csv_candidates = _csv_candidates(dataset, manual_dir, split, caption_version)
  csv_path = _first_existing(csv_candidates, "file")
  if csv_path is None:
    raise DataError(
        f"no {dataset} caption CSV for split {split!r} in {manual_dir}; looked for:\n"
        f"{_listing(csv_candidates)}\nPoint --manual_dir at the folder holding the "
        "downloaded CSVs, or leave this split out with --splits.")
  if audio_dir is not None:
    dir_candidates = [pathlib.Path(audio_dir)]
  else:
    dir_candidates = (audiocaps_audio_candidates if is_audiocaps else clotho_audio_candidates)(
        manual_dir, split)
  folder_path = _first_existing(dir_candidates, "dir")
  if folder_path is None:
    raise DataError(
        f"no audio folder for {dataset} split {split!r}; looked for:\n"
        f"{_listing(dir_candidates)}\nExtract the audio archive there, or name the folder "
        f"with --audio_dirs={split}=/path/to/folder.")
  reader = read_audiocaps_captions if is_audiocaps else read_clotho_captions
  entries = reader(csv_path, encoding=encoding, report=report)
  folder = AudioFolder(folder_path)
  resolved = resolve_audio(entries, folder, report, dataset="audiocaps" if is_audiocaps
                           else "clotho")
  if entries and not resolved:
    raise DataError(
        f"none of the {len(entries)} clips of {csv_path} has its audio in {folder_path} "
        f"({len(folder)} audio files there); is this the right folder? Name it with "
        f"--audio_dirs={split}=/path/to/folder.")
  return SplitSource(split, csv_path, folder_path, resolved, len(entries))


def read_ground_truth(path: os.PathLike | str) -> dict[str, dict]:
  """synthcaps sidecar: {file_name: ground truth} (see `synthcaps`).

  One JSON object per line; blank lines are skipped.

  Raises:
    DataError: the file is unreadable or not UTF-8, or a line is not a JSON object with a
      string 'file_name' (naming the file and line).
  """
  path = pathlib.Path(path)
  try:
    text = path.read_bytes().decode("utf-8")
  except OSError as e:
    raise DataError(f"{path}: cannot read the ground-truth file: {e}") from e
  except UnicodeDecodeError as e:
    raise DataError(f"{path}: not UTF-8 ({e}); regenerate it with data_pipelines.synthcaps") from e
  out = {}
  for number, line in enumerate(text.split("\n"), start=1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except ValueError as e:
      raise DataError(f"{path}:{number}: not a JSON object ({e})") from e
    if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
      raise DataError(f"{path}:{number}: expected a JSON object with a string 'file_name'")
    out[row["file_name"]] = row
  return out
