"""Every kind of bad input gets its documented outcome (audio_io / readers policy tables)."""

import json

import numpy as np
import pytest
import soundfile

from data_pipelines import audio_io, builders, readers

RATE = 16_000


def _wav(path, x, rate=RATE, subtype="PCM_16"):
  path.parent.mkdir(parents=True, exist_ok=True)
  soundfile.write(str(path), x, rate, subtype=subtype)
  return path


def _tone(seconds, rate=RATE, freq=440.0, amp=0.5):
  t = np.arange(int(seconds * rate)) / rate
  return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


# ---------------------------------------------------------------- audio_io, file by file
def test_mono_pcm16_at_the_target_rate_is_bit_exact(tmp_path):
  x = (np.random.default_rng(0).standard_normal(RATE) * 3000).astype(np.int16)
  decoded = audio_io.decode(_wav(tmp_path / "a.wav", x), RATE)
  np.testing.assert_array_equal(decoded.samples, x)
  assert decoded.notes == () and decoded.source_channels == 1


@pytest.mark.parametrize("channels", [2, 6])
def test_multichannel_is_downmixed_to_the_channel_mean(tmp_path, channels):
  rng = np.random.default_rng(1)
  x = (rng.standard_normal((RATE // 2, channels)) * 4000).astype(np.int16)
  decoded = audio_io.decode(_wav(tmp_path / "m.wav", x), RATE)
  expected = np.round(x.astype(np.float64).mean(axis=1))
  assert np.max(np.abs(decoded.samples - expected)) <= 1
  assert decoded.source_channels == channels and "downmixed" in decoded.notes


@pytest.mark.parametrize("rate", [8_000, 11_025, 22_050, 44_100, 48_000, 96_000])
def test_any_rate_is_resampled(tmp_path, rate):
  decoded = audio_io.decode(_wav(tmp_path / "r.wav", _tone(1.5, rate, 300.0), rate), RATE)
  assert abs(len(decoded.samples) - 1.5 * RATE) <= 1
  assert decoded.source_rate == rate and "resampled" in decoded.notes
  # A 300 Hz tone stays a 300 Hz tone.
  spectrum = np.abs(np.fft.rfft(decoded.samples.astype(np.float64)))
  assert abs(np.argmax(spectrum) * RATE / len(decoded.samples) - 300.0) < 2.0


def test_float_above_full_scale_is_attenuated_not_clipped(tmp_path):
  x = _tone(0.5, amp=3.0)
  decoded = audio_io.decode(_wav(tmp_path / "f.wav", x, subtype="FLOAT"), RATE)
  assert "attenuated" in decoded.notes
  np.testing.assert_allclose(decoded.samples / 32768.0, x / 3.0, atol=2e-4)


def test_flac_input(shared_data):
  path = next((shared_data / "caption_eval21" / "audio_32k" / "clotho_eval").glob("*.flac"))
  decoded = audio_io.decode(path, 32_000)
  assert decoded.source_rate == 32_000 and len(decoded.samples) > 15 * 32_000


@pytest.mark.parametrize("kind,write,reason", [
    ("random bytes", lambda p: p.write_bytes(np.random.default_rng(2).bytes(2000)),
     "unreadable"),
    ("zero bytes", lambda p: p.write_bytes(b""), "unreadable"),
    ("a text file", lambda p: p.write_text("not audio"), "unreadable"),
    ("zero frames", lambda p: _wav(p, np.zeros(0, np.int16)), "empty"),
    ("NaN samples", lambda p: _wav(p, np.array([0.1, np.nan, 0.2] * 100, np.float32),
                                   subtype="FLOAT"), "non_finite"),
    ("Inf samples", lambda p: _wav(p, np.array([0.1, np.inf] * 100, np.float32),
                                   subtype="FLOAT"), "non_finite"),
])
def test_unusable_audio_raises_audio_error(tmp_path, kind, write, reason):
  del kind
  path = tmp_path / "bad.wav"
  write(path)
  with pytest.raises(audio_io.AudioError) as e:
    audio_io.decode(path, RATE)
  assert e.value.reason == reason and str(path) in str(e.value)


def test_truncated_wav_keeps_what_is_there(tmp_path):
  path = _wav(tmp_path / "t.wav", (_tone(1.0) * 32767).astype(np.int16))
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  decoded = audio_io.decode(path, RATE)
  assert "truncated" in decoded.notes
  assert abs(len(decoded.samples) - RATE // 2) < 100


# ---------------------------------------------------------------- through the builder
def _layout(root, rows, audio):
  """A Clotho-layout download: rows = CSV lines after the header (raw bytes allowed)."""
  folder = root / "evaluation"
  folder.mkdir(parents=True, exist_ok=True)
  for name, make in audio.items():
    make(folder / name)
  header = b"file_name,caption_1,caption_2,caption_3\r\n"
  body = b"".join((r if isinstance(r, bytes) else r.encode("utf-8")) + b"\r\n" for r in rows)
  (root / "clotho_captions_evaluation.csv").write_bytes(header + body)
  return root


def _good(path):
  _wav(path, (_tone(1.0) * 20000).astype(np.int16))


@pytest.fixture
def messy_download(tmp_path):
  """One of every bad input, next to good clips."""
  return _layout(tmp_path / "download", rows=[
      "good.wav,a dog barks,a hound barks,barking",                                # line 2
      "corrupt.wav,x,y,z",                                                         # 3
      "empty.wav,x,y,z",                                                           # 4
      "nan.wav,x,y,z",                                                             # 5
      "stereo.wav,two channels,stereo,left and right",                             # 6
      "rate8k.wav,low rate,eight kilohertz,resampled",                             # 7
      "blanks.wav,   ,kept caption,\t",                                            # 8
      "nocaps.wav, , ,  ",                                                         # 9
      "missing.wav,named but absent,x,y",                                          # 10
      "short row,only two",                                                        # 11
      "latin1.wav,caf\xe9 noise".encode("iso-8859-1") + b",b,c",                   # 12
      "good.wav,duplicate row,x,y",                                                # 13
  ], audio={
      "good.wav": _good,
      "corrupt.wav": lambda p: p.write_bytes(b"RIFF\x00\x00garbage" * 10),
      "empty.wav": lambda p: _wav(p, np.zeros(0, np.int16)),
      "nan.wav": lambda p: _wav(p, np.array([np.nan] * 1000, np.float32), subtype="FLOAT"),
      "stereo.wav": lambda p: _wav(p, np.stack([_tone(1.0), -_tone(1.0) * 0.5], axis=1)),
      "rate8k.wav": lambda p: _wav(p, _tone(1.0, 8_000), 8_000),
      "blanks.wav": _good,
      "nocaps.wav": _good,
      "latin1.wav": _good,
  })


def test_messy_download_prepares_with_every_problem_reported(messy_download, tmp_path):
  b = builders.prepare("clotho", "16k", data_dir=tmp_path / "tfds", manual_dir=messy_download,
                       progress=False)
  records = {r["clip_id"].decode(): r for r in b.as_data_source(split="test")}
  assert set(records) == {"good.wav", "stereo.wav", "rate8k.wav", "blanks.wav", "latin1.wav"}
  issues = {(i["kind"], i["line"]): i for i in b.summary["issues"]}
  csv = str(messy_download / "clotho_captions_evaluation.csv")
  audio = messy_download / "evaluation"
  expected = {
      ("unreadable", None): str(audio / "corrupt.wav"),
      ("empty", None): str(audio / "empty.wav"),
      ("non_finite", None): str(audio / "nan.wav"),
      ("empty_caption", 8): csv,
      ("no_captions", 9): csv,
      ("empty_caption", 9): csv,
      ("missing_audio", 10): csv,
      ("malformed_row", 11): csv,
      ("non_utf8", 12): csv,
      ("duplicate_clip", 13): csv,
  }
  for key, path in expected.items():
    assert key in issues, key
    assert issues[key]["path"] == path
  # Audio problems also name the CSV line of the clip.
  assert f"{csv}:3" in issues[("unreadable", None)]["detail"]
  assert records["blanks.wav"]["captions"] == [b"kept caption"]
  assert records["latin1.wav"]["captions"][0].decode() == "café noise"
  assert records["stereo.wav"]["source_channels"] == 2
  assert records["rate8k.wav"]["source_sample_rate"] == 8_000
  assert len(records["rate8k.wav"]["audio"]) == RATE
  split = b.summary["splits"]["test"]
  assert split["clips"] == 5 and split["csv_clips"] == 9
  assert split["notes"] == {"downmixed": 1, "resampled": 1}
  # The report is saved next to the records.
  saved = json.loads((b.data_path / builders.REPORT_FILENAME).read_text())
  assert saved["issue_counts"] == b.summary["issue_counts"]


def test_strict_mode_fails_and_names_the_file_and_line(messy_download, tmp_path):
  with pytest.raises(readers.DataError) as e:
    builders.prepare("clotho", "16k", data_dir=tmp_path / "tfds", manual_dir=messy_download,
                     progress=False, strict=True)
  message = str(e.value)
  assert "clotho_captions_evaluation.csv:10" in message and "missing.wav" in message
  assert "clotho_captions_evaluation.csv:11" in message


def test_strict_mode_fails_on_bad_audio_and_keeps_finished_shards(tmp_path):
  download = _layout(tmp_path / "download", rows=[
      "a.wav,x,y,z", "b.wav,x,y,z", "bad.wav,x,y,z", "c.wav,x,y,z"],
      audio={"a.wav": _good, "b.wav": _good, "c.wav": _good,
             "bad.wav": lambda p: p.write_bytes(b"junk")})
  kwargs = dict(data_dir=tmp_path / "tfds", manual_dir=download, progress=False,
                clips_per_shard=2)
  with pytest.raises(readers.DataError, match=r"bad\.wav.*unreadable"):
    builders.prepare("clotho", "16k", strict=True, **kwargs)
  work = builders.builder("clotho", "16k", data_dir=tmp_path / "tfds").work_dir
  assert (work / "test-00000.json").is_file()  # the shard before the failure survived
  # Without strict the same folder prepares, reusing that shard.
  b = builders.prepare("clotho", "16k", **kwargs)
  assert [r["clip_id"] for r in b.as_data_source(split="test")] == [b"a.wav", b"b.wav",
                                                                   b"c.wav"]


def test_explicit_utf8_encoding_rejects_other_bytes_with_the_line(tmp_path):
  path = tmp_path / "clotho_captions_evaluation.csv"
  path.write_bytes(b"file_name,caption_1\r\nok.wav,fine\r\nx.wav,caf\xe9\r\n")
  with pytest.raises(readers.DataError, match=r"clotho_captions_evaluation\.csv:3"):
    readers.read_clotho_captions(path, encoding="utf-8")
  report = readers.Report()
  entries = readers.read_clotho_captions(path, report=report)
  assert entries[1].captions == ["café"]
  assert [(i.kind, i.line) for i in report.issues] == [("non_utf8", 3)]


def test_wrong_header_and_broken_quoting_name_the_line(tmp_path):
  path = tmp_path / "c.csv"
  path.write_text("name,text\nx,y\n")
  with pytest.raises(readers.DataError, match=r"c\.csv:1: expected a Clotho caption header"):
    readers.read_clotho_captions(path)
  path.write_text("audiocap_id,youtube_id,caption\n1,a,b\n")
  with pytest.raises(readers.DataError, match="missing start_time"):
    readers.read_audiocaps_captions(path)
  path.write_text("audiocap_id,youtube_id,start_time,caption\n1,a,zz,b\n2,a,1,\n")
  report = readers.Report()
  assert readers.read_audiocaps_captions(path, report=report) == []
  assert [(i.kind, i.line) for i in report.issues] == [
      ("malformed_row", 2), ("empty_caption", 3), ("no_captions", 3)]
  path.write_bytes(b"")
  with pytest.raises(readers.DataError, match="empty"):
    readers.read_clotho_captions(path)


def test_nothing_decodable_in_a_split_is_an_error(tmp_path):
  download = _layout(tmp_path / "download", rows=["bad.wav,x,y,z"],
                     audio={"bad.wav": lambda p: p.write_bytes(b"junk")})
  with pytest.raises(readers.DataError, match="no clip could be decoded"):
    builders.prepare("clotho", "16k", data_dir=tmp_path / "tfds", manual_dir=download,
                     progress=False)


def test_a_folder_without_any_listed_audio_is_an_error(tmp_path):
  download = _layout(tmp_path / "download", rows=["a.wav,x,y,z"], audio={"zzz.wav": _good})
  with pytest.raises(readers.DataError, match="right folder"):
    builders.prepare("clotho", "16k", data_dir=tmp_path / "tfds", manual_dir=download,
                     progress=False)
