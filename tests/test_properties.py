"""Property-based tests (hypothesis): bad input gets a documented outcome, never a crash.

For the caption CSV readers, caption normalisation, the tokenizer and audio decoding, any
input (empty, 10,000 characters, emoji, control characters, invalid UTF-8, random bytes,
truncated or damaged audio headers, 0 frames, 1-8 channels, 1 Hz to 384 kHz) must give either
a valid result satisfying the invariants the docstrings state, or the documented exception
(`readers.DataError`, `audio_io.AudioError` with a documented reason, `TypeError` for non-text)
naming the file. Runs are derandomized and database-less so CI sees the same examples.
"""

import io
import json
import pathlib
import re
import unicodedata

import numpy as np
import pytest
import soundfile
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from data_pipelines import audio_io, readers
from hade_jax import tokenizer as tokenizer_lib


def _settings(max_examples: int):
  return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> pathlib.Path:
  return tmp_path_factory.mktemp("properties")


# ---------------------------------------------------------------- text strategies
# Emoji (with ZWJ sequences and skin-tone modifiers), control characters (C0, DEL, C1),
# Unicode whitespace and CSV syntax, mixed into random text.
EMOJI = ["😀", "👨\u200d👩\u200d👧", "👍🏽", "🇫🇷", "❤️", "\u200b", "\ufeff"]
CONTROL = [chr(c) for c in (*range(0x20), 0x7f, *range(0x80, 0xa0))]
SPACES = [" ", "\t", "\u00a0", "\u2028", "\u3000", "\x0b", "\x0c", "\x1c", "\x85"]
CSV_SYNTAX = [",", '"', "\r", "\n", "\r\n", "#", ";", "&amp;"]

any_char = st.characters(codec="utf-8")  # every code point but surrogates
pieces = st.one_of(st.text(any_char, max_size=20), st.sampled_from(EMOJI), st.sampled_from(CONTROL),
                   st.sampled_from(SPACES), st.sampled_from(CSV_SYNTAX))
texts = st.one_of(
    st.just(""),
    st.lists(pieces, max_size=12).map("".join),
    st.text(any_char, max_size=60),
    # 10,000 characters: a random piece repeated (hypothesis cannot draw that much at once).
    st.text(any_char, min_size=1, max_size=30).map(lambda s: (s * 10_000)[:10_000]),
)
# Lone surrogates: not encodable, but a Python str can hold them.
surrogate_texts = st.lists(st.one_of(pieces, st.characters(min_codepoint=0xd800,
                                                           max_codepoint=0xdfff)),
                           max_size=8).map("".join)


def _is_control(c: str) -> bool:
  return unicodedata.category(c) == "Cc"


# ---------------------------------------------------------------- normalize_caption
@_settings(500)
@given(st.one_of(texts, surrogate_texts))
@example("\x00a\x1b[0m b\x7f\x85c\u009f")
@example(" \t\r\n ")
def test_normalize_caption_is_clean_and_keeps_every_visible_character(text):
  out = readers.normalize_caption(text)
  assert not any(_is_control(c) for c in out)
  assert out == out.strip() and "  " not in out
  assert all(c == " " or not c.isspace() for c in out)
  assert readers.normalize_caption(out) == out  # idempotent
  visible = "".join(c for c in text if not c.isspace() and not _is_control(c))
  assert out.replace(" ", "") == visible


# ---------------------------------------------------------------- caption CSV readers
def _line_count(text: str) -> int:
  """Lines as csv/StringIO(newline='') count them: CR, LF and CRLF end a line."""
  return len(re.findall(r"\r\n|\r|\n", text))


def _csv_field(field: str, quote_all: bool) -> str:
  # RFC 4180 by hand: csv.writer leaves a bare CR unquoted when the line terminator is LF.
  if quote_all or any(c in field for c in ',"\r\n'):
    return '"' + field.replace('"', '""') + '"'
  return field


def _write_csv(path, header, rows, lineterminator, bom, quote_all=False):
  """Writes an RFC 4180 CSV; returns the first line of each row."""
  text, lines = "", []
  for i, row in enumerate([header, *rows]):
    if i:
      lines.append(_line_count(text) + 1)
    text += ",".join(_csv_field(f, quote_all) for f in row) + lineterminator
  path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
  return lines


def _check_issues(report, path, num_lines):
  for issue in report.issues:
    assert issue.kind in readers.ISSUE_OUTCOMES
    assert issue.path == str(path)
    assert issue.line is not None and 1 <= issue.line <= num_lines + 1
    assert str(path) in str(issue)


def _check_entries(entries):
  assert len({e.clip_id for e in entries}) == len(entries)
  indices = [e.clip_index for e in entries]
  assert indices == sorted(set(indices)) and all(i >= 0 for i in indices)
  for e in entries:
    assert e.line >= 2 and e.captions
    for c in e.captions:
      assert c and c == readers.normalize_caption(c)
      assert not any(_is_control(ch) for ch in c)


clotho_rows = st.lists(
    st.tuples(st.one_of(texts.map(lambda t: t[:60]), st.sampled_from(["a.wav", " b.wav", "a.wav"])),
              st.lists(texts, min_size=3, max_size=3)),
    max_size=8)


@_settings(300)
@given(rows=clotho_rows, lineterminator=st.sampled_from(["\r\n", "\n", "\r"]), bom=st.booleans(),
       quote_all=st.booleans())
def test_clotho_reader_matches_a_model_of_its_policy(work, rows, lineterminator, bom, quote_all):
  path = work / "clotho_captions_evaluation.csv"
  header = ["file_name", "caption_1", "caption_2", "caption_3"]
  rows = [[name, *caps] for name, caps in rows]
  lines = _write_csv(path, header, rows, lineterminator, bom, quote_all)
  report = readers.Report()
  entries = readers.read_clotho_captions(path, report=report)
  # The policy of the module docstring, written out: clips and issues.
  expected, issues, seen, index = [], [], set(), 0
  for line, row in zip(lines, rows, strict=True):
    if not any(f.strip() for f in row):
      continue  # a blank line (or only separators and spaces), not a row
    index += 1
    name = row[0]
    if not name.strip():
      issues.append(("malformed_row", line))
      continue
    if name in seen:
      issues.append(("duplicate_clip", line))
      continue
    seen.add(name)
    captions = [c for c in map(readers.normalize_caption, row[1:]) if c]
    issues += [("empty_caption", line)] * (len(row) - 1 - len(captions))
    if captions:
      expected.append((name, index - 1, captions, line))
    else:
      issues.append(("no_captions", line))
  assert [(e.clip_id, e.clip_index, e.captions, e.line) for e in entries] == expected
  assert [(i.kind, i.line) for i in report.issues] == issues
  _check_entries(entries)
  _check_issues(report, path, _line_count(path.read_text("utf-8-sig")) + 1)


audiocaps_rows = st.lists(
    st.tuples(st.sampled_from(["1", "2", "x"]),
              st.sampled_from(["abc", "abc", "Xyz-_9", "", " ", "q\x00"]),
              st.one_of(st.sampled_from(["30", "30.0", "0", "30.5", "1e400", "nan", "-1", "1_0",
                                         "\u0663", " 7 ", "", "inf", "1e5"]), texts),
              texts),
    max_size=10)


@_settings(300)
@given(rows=audiocaps_rows, lineterminator=st.sampled_from(["\r\n", "\n"]), bom=st.booleans())
def test_audiocaps_reader_groups_rows_into_clean_clips(work, rows, lineterminator, bom):
  path = work / "test.csv"
  _write_csv(path, ["audiocap_id", "youtube_id", "start_time", "caption"], rows,
             lineterminator, bom)
  report = readers.Report()
  entries = readers.read_audiocaps_captions(path, report=report)
  _check_entries(entries)
  _check_issues(report, path, _line_count(path.read_text("utf-8-sig")) + 1)
  for e in entries:
    youtube_id, start = e.metadata["youtube_id"], e.metadata["start_time"]
    assert e.clip_id == f"{youtube_id}_{start}" and youtube_id == youtube_id.strip()
    assert re.fullmatch(r"[0-9]+(\.[0-9]+(e-[0-9]+)?)?", start, re.ASCII), start
    assert len(e.metadata["audiocap_ids"]) == len(e.captions)
  assert [e.clip_index for e in entries] == sorted(e.clip_index for e in entries)


@_settings(300)
@given(st.one_of(st.sampled_from(["30", "30.0", "30.", ".5", "007", "1e5", "1E5", "1_0", "nan",
                                  "inf", "-0", "+1", "0x10", "\u0663", "\uff13", "9" * 400, ""]),
                 st.text(st.sampled_from("0123456789.e-+_ \u0663"), max_size=8), texts))
def test_audiocaps_start_times_are_plain_decimal_seconds(text):
  start = readers._start_time(text)  # pylint: disable=protected-access
  if start is not None:
    assert text.isascii() and set(text) <= set("0123456789.")
    assert float(start) == float(text)


# Byte soup: CSV syntax, invalid UTF-8 (lone continuation bytes, overlong forms, encoded
# surrogates), NUL, BOMs, and the tokens of both headers.
BYTE_PIECES = [b",", b'"', b"\r", b"\n", b"\r\n", b"\x00", b"\xff", b"\xe9", b"\x80", b"\xc0\xaf",
               b"\xed\xa0\x80", b"\xef\xbb\xbf", "😀".encode(), b" ", b"a", b"1", b"30",
               b"file_name", b"caption_1", b"youtube_id", b"start_time", b"caption", b".wav"]
csv_bytes = st.tuples(
    st.sampled_from([b"", b"file_name,caption_1,caption_2\n",
                     b"audiocap_id,youtube_id,start_time,caption\r\n"]),
    st.one_of(st.binary(max_size=600),
              st.lists(st.one_of(st.sampled_from(BYTE_PIECES), st.binary(max_size=4)),
                       max_size=60).map(b"".join)),
).map(b"".join)


@_settings(500)
@given(data=csv_bytes, encoding=st.sampled_from(["auto", "auto", "utf-8", "utf-16", "bogus",
                                                 "hex"]))
@example(data=b"", encoding="auto")
@example(data=b"\xef\xbb\xbf", encoding="auto")
@example(data=b'file_name,caption_1\n"' + b"x" * 140_000, encoding="auto")
def test_caption_readers_on_any_bytes_return_clips_or_a_data_error(work, data, encoding):
  path = work / "any.csv"
  path.write_bytes(data)
  for read in (readers.read_clotho_captions, readers.read_audiocaps_captions):
    report = readers.Report()
    try:
      entries = read(path, encoding=encoding, report=report)
    except readers.DataError as e:
      assert str(path) in str(e)
      continue
    _check_entries(entries)
    _check_issues(report, path, len(data.splitlines()) + 1)


json_rows = st.one_of(
    st.fixed_dictionaries({"file_name": st.text(max_size=10)}, optional={"x": st.integers()}),
    st.integers(), st.text(max_size=5), st.none(), st.just({"file_name": 3}), st.just({}))


@_settings(200)
@given(rows=st.lists(json_rows.map(json.dumps).map(str.encode), max_size=5),
       tail=st.sampled_from([b"", b"\n", b"\n\n", b"{", b"\xff\n"]))
def test_ground_truth_reader_returns_rows_or_a_data_error(work, rows, tail):
  path = work / "truth.jsonl"
  path.write_bytes(b"\n".join(rows) + tail)
  try:
    truth = readers.read_ground_truth(path)
  except readers.DataError as e:
    assert str(path) in str(e)
    return
  assert all(isinstance(k, str) and v["file_name"] == k for k, v in truth.items())


# ---------------------------------------------------------------- tokenizer
_TOKENIZERS = {}


def _tokenizer(minilm_dir, max_len):
  if max_len not in _TOKENIZERS:
    _TOKENIZERS[max_len] = tokenizer_lib.Tokenizer(minilm_dir, max_len=max_len)
  return _TOKENIZERS[max_len]


def _check_row(tok, ids, mask):
  inner = tok._load()  # pylint: disable=protected-access
  cls, sep = inner.token_to_id("[CLS]"), inner.token_to_id("[SEP]")
  assert ids.shape == mask.shape == (tok.max_len,)
  assert ids.dtype == mask.dtype == np.int32
  length = int(mask.sum())
  assert 2 <= length <= tok.max_len
  np.testing.assert_array_equal(mask, np.arange(tok.max_len) < length)  # a prefix of ones
  assert ids[0] == cls and ids[length - 1] == sep
  assert (ids[length:] == tok.pad_id).all()
  assert ((ids >= 0) & (ids < tok.vocab_size)).all()


tokenizer_inputs = st.one_of(texts, surrogate_texts, st.binary(max_size=60),
                             st.lists(st.sampled_from(BYTE_PIECES), max_size=20).map(b"".join))


@_settings(300)
@given(batch=st.lists(tokenizer_inputs, max_size=6), max_len=st.sampled_from([2, 3, 16, 64]))
def test_tokenizer_rows_have_the_fixed_documented_shape(minilm_dir, batch, max_len):
  tok = _tokenizer(minilm_dir, max_len)
  ids_TxM, mask_TxM = tok(batch)
  assert ids_TxM.shape == mask_TxM.shape == (len(batch), max_len)
  for text, ids, mask in zip(batch, ids_TxM, mask_TxM, strict=True):
    _check_row(tok, ids, mask)
    one_ids, one_mask = tok.encode_one(text)
    np.testing.assert_array_equal(one_ids, ids)
    np.testing.assert_array_equal(one_mask, mask)


@_settings(30)
@given(st.one_of(st.none(), st.integers(), st.floats(), st.lists(st.text(max_size=3),
                                                                  max_size=2)))
def test_tokenizer_names_a_non_text_item(minilm_dir, item):
  tok = _tokenizer(minilm_dir, 16)
  with pytest.raises(TypeError, match=r"texts\[1\]"):
    tok(["fine", item])
  with pytest.raises(TypeError, match="expected str or bytes"):
    tok.encode_one(item)


def test_tokenizer_refuses_a_bare_string(minilm_dir):
  with pytest.raises(TypeError, match="encode_one"):
    _tokenizer(minilm_dir, 16)("a dog barks")


# ---------------------------------------------------------------- audio decoding
REASONS = {"unreadable", "empty", "non_finite", "unsupported_rate"}
NOTES = {"downmixed", "resampled", "attenuated", "truncated"}


def _check_decoded(decoded, target):
  assert decoded.samples.dtype == np.int16 and decoded.samples.ndim == 1
  assert len(decoded.samples) > 0
  assert decoded.sample_rate == target
  assert set(decoded.notes) <= NOTES
  assert ("resampled" in decoded.notes) == (decoded.source_rate != target)


def _decode(path, target):
  """decode's outcome: DecodedAudio or AudioError; anything else fails the test."""
  try:
    return audio_io.decode(path, target)
  except audio_io.AudioError as e:
    assert e.reason in REASONS and e.path == str(path) and str(path) in str(e)
    return e


EDGE_RATES = [1, 2, 3, 7, 999, 1000, 1001, 8000, 11025, 44100, 96000, 192000, 352800, 384000]


@_settings(300)
@given(rate=st.one_of(st.sampled_from(EDGE_RATES), st.integers(1, 384_000)),
       seconds=st.floats(0.0, 0.3), channels=st.integers(1, 8),
       subtype=st.sampled_from(["PCM_16", "PCM_24", "PCM_U8", "FLOAT"]),
       target=st.sampled_from([16_000, 22_050, 32_000, 48_000]), data=st.data())
@example(rate=1, seconds=3.0, channels=1, subtype="PCM_16", target=16_000, data=None)
@example(rate=384_000, seconds=1 / 384_000, channels=8, subtype="FLOAT", target=16_000,
         data=None)
@example(rate=16_000, seconds=0.0, channels=2, subtype="PCM_16", target=16_000, data=None)
def test_decode_any_rate_and_channel_count(work, rate, seconds, channels, subtype, target, data):
  frames = int(round(seconds * rate))
  rng = np.random.default_rng(frames + channels)
  x = (rng.uniform(-0.9, 0.9, (frames, channels))).astype(np.float32)
  path = work / "rate.wav"
  soundfile.write(str(path), x, rate, subtype=subtype, format="WAV")
  out = _decode(path, target)
  if frames == 0:
    assert isinstance(out, audio_io.AudioError) and out.reason == "empty"
  elif rate < audio_io.MIN_SOURCE_RATE:
    assert isinstance(out, audio_io.AudioError) and out.reason == "unsupported_rate"
  elif isinstance(out, audio_io.AudioError):
    # Only too few frames to leave one sample at the target rate.
    assert out.reason == "empty" and frames * target / rate < 1.5
  else:
    _check_decoded(out, target)
    assert out.source_rate == rate and out.source_channels == channels
    assert abs(len(out.samples) - frames * target / rate) <= 1
    assert ("downmixed" in out.notes) == (channels > 1)
    if rate == target and channels == 1 and subtype == "PCM_16":
      np.testing.assert_array_equal(out.samples, soundfile.read(str(path), dtype="int16")[0])


def _real_file(fmt, subtype, channels, rate):
  rng = np.random.default_rng(0)
  x = rng.uniform(-0.5, 0.5, (rate // 10, channels)).astype(np.float32)
  buf = io.BytesIO()
  soundfile.write(buf, x, rate, format=fmt, subtype=subtype)
  return buf.getvalue()


REAL_FILES = {(fmt, subtype, channels, rate): _real_file(fmt, subtype, channels, rate)
              for fmt, subtype in [("WAV", "PCM_16"), ("WAV", "FLOAT"), ("WAV", "PCM_24"),
                                   ("FLAC", "PCM_16"), ("FLAC", "PCM_24")]
              for channels, rate in [(1, 16_000), (2, 44_100)]}


@_settings(300)
@given(key=st.sampled_from(sorted(REAL_FILES)), cut=st.one_of(st.integers(0, 100),
                                                              st.floats(0.0, 1.0)))
def test_decode_truncated_wav_and_flac(work, key, cut):
  raw = REAL_FILES[key]
  cut = cut if isinstance(cut, int) else int(cut * len(raw))
  path = work / ("cut." + key[0].lower())
  path.write_bytes(raw[:cut])
  out = _decode(path, 16_000)
  if isinstance(out, audio_io.AudioError):
    assert out.reason in {"unreadable", "empty"}
    return
  _check_decoded(out, 16_000)
  rate, channels = key[3], key[2]
  whole = rate // 10
  assert out.source_rate == rate and out.source_channels == channels
  assert len(out.samples) <= whole * 16_000 / rate + 1
  if key[0] == "WAV" and cut < len(raw):
    assert "truncated" in out.notes


@_settings(300)
@given(key=st.sampled_from(sorted(REAL_FILES)),
       edits=st.lists(st.tuples(st.integers(0, 63), st.integers(0, 255)), min_size=1,
                      max_size=6))
def test_decode_damaged_headers(work, key, edits):
  raw = bytearray(REAL_FILES[key])
  for position, value in edits:
    raw[position] = value
  path = work / ("damaged." + key[0].lower())
  path.write_bytes(bytes(raw))
  out = _decode(path, 16_000)
  if not isinstance(out, audio_io.AudioError):
    _check_decoded(out, 16_000)


@_settings(300)
@given(st.tuples(st.sampled_from([b"", b"RIFF", b"RIFF\x24\x00\x00\x00WAVEfmt ", b"fLaC",
                                  b"OggS", b"ID3", b"FORM\x00\x00\x00\x00AIFF"]),
                 st.binary(max_size=2000)).map(b"".join))
@example(b"")
def test_decode_random_bytes(work, data):
  path = work / "random.wav"
  path.write_bytes(data)
  out = _decode(path, 16_000)
  if not isinstance(out, audio_io.AudioError):
    _check_decoded(out, 16_000)


@pytest.mark.parametrize("rate", [0, -16_000, 16_000.0, True, "16000"])
def test_decode_rejects_a_bad_target_rate(work, rate):
  path = work / "ok.wav"
  soundfile.write(str(path), np.zeros(100, np.int16), 16_000)
  with pytest.raises(ValueError, match="positive integer"):
    audio_io.decode(path, rate)


def test_unsupported_rate_is_a_reported_issue_kind():
  assert "unsupported_rate" in readers.ISSUE_OUTCOMES
