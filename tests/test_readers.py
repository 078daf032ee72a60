"""Readers on the real Clotho v2.1 / AudioCaps CSVs in ../shared/data, and file resolution."""

import csv
import os
import unicodedata

import pytest

from data_pipelines import readers


def _clotho(shared_data, name):
  report = readers.Report()
  path = shared_data / "captions" / "clotho_v2.1" / f"clotho_captions_{name}.csv"
  return readers.read_clotho_captions(path, report=report), report


@pytest.mark.parametrize("name,clips", [("development", 3839), ("validation", 1045),
                                        ("evaluation", 1045)])
def test_clotho_official_counts(shared_data, name, clips):
  entries, report = _clotho(shared_data, name)
  assert len(entries) == clips
  assert all(len(e.captions) == 5 for e in entries)
  assert report.issues == []
  assert [e.clip_index for e in entries] == list(range(clips))
  assert len({e.clip_id for e in entries}) == clips
  assert entries[0].line == 2  # line 1 is the header


def test_clotho_matches_a_plain_csv_parse_and_keeps_odd_names(shared_data):
  path = shared_data / "captions" / "clotho_v2.1" / "clotho_captions_development.csv"
  assert b"\r\n" in path.read_bytes()  # the official CRLF file
  with open(path, newline="", encoding="utf-8") as f:
    rows = list(csv.reader(f))[1:]
  entries, _ = _clotho(shared_data, "development")
  assert [e.file_name for e in entries] == [r[0] for r in rows]
  names = {e.file_name for e in entries}
  # Leading spaces, commas, parentheses, '&amp;' entities survive untouched.
  for odd in [" typical neighborhood in Porto.wav", "Crowd ambience, eating popcorn.wav",
              "121006_rain&amp;storm.wav", "Anti Air Gun (3 Sounds).wav"]:
    assert odd in names
  by_name = {e.file_name: e for e in entries}
  row = next(r for r in rows if r[0] == "Crowd ambience, eating popcorn.wav")
  assert by_name[row[0]].captions == [" ".join(c.split()) for c in row[1:]]


def test_clotho_other_splits_odd_names(shared_data):
  evaluation, _ = _clotho(shared_data, "evaluation")
  validation, _ = _clotho(shared_data, "validation")
  assert "451__mikejedw__bong2_variant#2.wav" in {e.file_name for e in evaluation}
  assert " e ieio ieai.wav" in {e.file_name for e in validation}
  assert "Grillons-d&#39;Italie-Ardeche.wav" in {e.file_name for e in validation}


def test_clotho_captions_are_whitespace_normalised(shared_data):
  entries, _ = _clotho(shared_data, "development")
  # Line 260 of the official file ends a caption with a space.
  caps = [c for e in entries for c in e.captions]
  assert "People are talking at a sports event while a person is saying something." in caps
  assert all(c == c.strip() and "  " not in c for c in caps)


@pytest.mark.parametrize("version", ["audiocaps", "audiocaps2.0"])
@pytest.mark.parametrize("split,clips,captions", [("val", 495, 2475), ("test", 975, 4875)])
def test_audiocaps_eval_splits_group_into_five_captions(shared_data, version, split, clips,
                                                        captions):
  report = readers.Report()
  entries = readers.read_audiocaps_captions(shared_data / "captions" / version / f"{split}.csv",
                                            report=report)
  assert len(entries) == clips
  assert sum(len(e.captions) for e in entries) == captions
  assert all(len(e.captions) == 5 for e in entries)
  assert all(len(e.metadata["audiocap_ids"]) == 5 for e in entries)
  assert report.issues == []


def test_audiocaps_train_rows(shared_data):
  entries = readers.read_audiocaps_captions(shared_data / "captions" / "audiocaps" / "train.csv")
  assert len(entries) == 49838
  assert sum(len(e.captions) for e in entries) == 49838
  # Non-ASCII UTF-8 (curly apostrophes) is decoded, not mangled.
  assert any("’" in c for e in entries for c in e.captions)


def test_audiocaps_grouping_is_by_clip_not_by_row_order(shared_data):
  path = shared_data / "captions" / "audiocaps" / "test.csv"
  with open(path, newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  first = rows[0]
  key = (first["youtube_id"], first["start_time"])
  positions = [i for i, r in enumerate(rows) if (r["youtube_id"], r["start_time"]) == key]
  assert positions != list(range(positions[0], positions[0] + 5))  # scattered in the file
  entries = readers.read_audiocaps_captions(path)
  entry = entries[0]
  assert entry.clip_id == f"{key[0]}_{key[1]}"
  assert entry.captions == [rows[i]["caption"] for i in positions]
  assert entry.metadata["audiocap_ids"] == [rows[i]["audiocap_id"] for i in positions]


def test_audiocaps_identical_captions_on_different_clips_are_kept(shared_data):
  entries = readers.read_audiocaps_captions(shared_data / "captions" / "audiocaps" / "test.csv")
  owners = {}
  for e in entries:
    for c in e.captions:
      owners.setdefault(c, set()).add(e.clip_id)
  assert any(len(clips) > 1 for clips in owners.values())


def test_audiocaps_v2_has_the_v1_clips_with_other_captions(shared_data):
  v1 = readers.read_audiocaps_captions(shared_data / "captions" / "audiocaps" / "val.csv")
  v2 = readers.read_audiocaps_captions(shared_data / "captions" / "audiocaps2.0" / "val.csv")
  assert {e.clip_id for e in v1} == {e.clip_id for e in v2}
  assert [c for e in v1 for c in e.captions] != [c for e in v2 for c in e.captions]


def test_load_split_finds_the_real_layouts(shared_data):
  report = readers.Report()
  clotho = readers.load_split("clotho", shared_data / "clotho_eval7", "test", report=report)
  assert len(clotho.entries) == 7 and clotho.audio_dir.name == "evaluation"
  assert all(os.path.isfile(e.audio_path) for e in clotho.entries)
  audiocaps = readers.load_split("audiocaps", shared_data / "audiocaps_test14", "test",
                                 report=report)
  assert len(audiocaps.entries) == 14
  assert all(e.file_name == f"{e.clip_id}.wav" for e in audiocaps.entries)
  assert report.issues == []
  assert readers.available_splits("audiocaps", shared_data / "audiocaps_test14") == ["test"]


def test_full_audiocaps_csv_with_14_local_clips_reports_the_rest(shared_data, tmp_path):
  (tmp_path / "test.csv").symlink_to(shared_data / "captions" / "audiocaps" / "test.csv")
  (tmp_path / "test").symlink_to(shared_data / "audiocaps_test14" / "test")
  report = readers.Report()
  source = readers.load_split("audiocaps", tmp_path, "test", report=report)
  assert len(source.entries) == 14 and source.num_csv_clips == 975
  missing = report.by_kind()["missing_audio"]
  assert len(missing) == 961
  assert all(i.path == str(tmp_path / "test.csv") and i.line >= 2 for i in missing)
  strict = readers.Report(strict=True)
  strict.extend(report.issues)
  with pytest.raises(readers.DataError, match="961"):
    strict.check("audiocaps test")


def test_missing_folders_name_what_was_searched(tmp_path):
  with pytest.raises(readers.DataError, match="clotho_captions_evaluation.csv"):
    readers.load_split("clotho", tmp_path, "test", report=readers.Report())
  (tmp_path / "clotho_captions_evaluation.csv").write_text("file_name,caption_1\na.wav,x\n")
  with pytest.raises(readers.DataError, match=r"(?s)no audio folder.*evaluation.*--audio_dirs"):
    readers.load_split("clotho", tmp_path, "test", report=readers.Report())


def _touch(folder, *names):
  folder.mkdir(parents=True, exist_ok=True)
  for name in names:
    (folder / name).write_bytes(b"")


def test_clotho_name_quirks_resolve(tmp_path):
  # On disk: the DCASE retrieval ':' -> '_' rename, an unescaped entity, a FLAC copy,
  # and a decomposed (NFD) unicode name.
  nfd = unicodedata.normalize("NFD", "café.wav")
  _touch(tmp_path / "evaluation", "raindrops on metal_police background.wav",
         "rain&storm.wav", "other.flac", nfd)
  csv_text = ("file_name,caption_1\n"
              '"raindrops on metal: police background.wav",a\n'
              "rain&amp;storm.wav,b\nother.wav,c\ncafé.wav,d\nabsent.wav,e\n")
  (tmp_path / "clotho_captions_evaluation.csv").write_text(csv_text, encoding="utf-8")
  report = readers.Report()
  source = readers.load_split("clotho", tmp_path, "test", report=report)
  how = {e.clip_id: (os.path.basename(e.audio_path), e.matched_by) for e in source.entries}
  assert how["raindrops on metal: police background.wav"] == (
      "raindrops on metal_police background.wav", "colon_to_underscore")
  assert how["rain&amp;storm.wav"] == ("rain&storm.wav", "html_unescaped")
  assert how["other.wav"] == ("other.flac", "exact+other_extension")
  assert how["café.wav"][0] == nfd
  [missing] = report.issues
  assert missing.kind == "missing_audio" and missing.line == 6 and "absent.wav" in str(missing)


def test_audiocaps_local_name_layouts(tmp_path):
  _touch(tmp_path / "test", "aaa_30.wav", "Ybbb.wav", "ccc_10.000_20.000.flac", "Yddd_5.mp3")
  (tmp_path / "test.csv").write_text(
      "audiocap_id,youtube_id,start_time,caption\n1,aaa,30,x\n2,bbb,0,y\n3,ccc,10,z\n"
      "4,ddd,5,w\n5,eee,0,v\n", encoding="utf-8")
  report = readers.Report()
  source = readers.load_split("audiocaps", tmp_path, "test", report=report)
  found = {e.clip_id: (e.file_name, e.matched_by) for e in source.entries}
  assert found == {"aaa_30": ("aaa_30.wav", "id_start"), "bbb_0": ("Ybbb.wav", "Yid"),
                   "ccc_10": ("ccc_10.000_20.000.flac", "audioset_segment"),
                   "ddd_5": ("Yddd_5.mp3", "Yid_start")}
  assert [i.clip for i in report.issues] == ["eee_0"]


def test_audiocaps_ambiguous_file_is_not_given_to_two_clips(tmp_path):
  _touch(tmp_path / "val", "Yaaa.wav")
  (tmp_path / "val.csv").write_text(
      "audiocap_id,youtube_id,start_time,caption\n1,aaa,30,x\n2,aaa,40,y\n", encoding="utf-8")
  report = readers.Report()
  source = readers.load_split("audiocaps", tmp_path, "validation", report=report)
  assert [e.clip_id for e in source.entries] == ["aaa_30"]
  assert [i.kind for i in report.issues] == ["ambiguous_audio"]
