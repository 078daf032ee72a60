"""synthcaps: deterministic, audible detail, captions that state it, contrasting siblings."""

import json
import re

import numpy as np
import pytest

from data_pipelines import readers, synthcaps

RATE = 16_000
PARAMS = synthcaps.Params(seed=5, clips={"train": 18, "validation": 9, "test": 9},
                          clip_seconds=6.0, sample_rate=RATE)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
  out = tmp_path_factory.mktemp("synthcaps")
  counts = synthcaps.generate(out, PARAMS, num_workers=1, progress=False)
  return out, counts


def _files(folder):
  return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*"))
          if p.is_file()}


def test_same_seed_same_bytes_whatever_the_worker_count(generated, tmp_path):
  out, counts = generated
  assert counts == {"train": 18, "validation": 9, "test": 9}
  other = tmp_path / "again"
  synthcaps.generate(other, PARAMS, num_workers=2, progress=False)
  assert _files(other) == _files(out)
  different = synthcaps.Params(**{**PARAMS.__dict__, "seed": 6})
  synthcaps.generate(tmp_path / "seed6", different, progress=False)
  first = "development/synthcaps_train_000000.wav"
  assert (tmp_path / "seed6" / first).read_bytes() != (out / first).read_bytes()


def test_rerun_writes_nothing_and_other_params_are_refused(generated):
  out, _ = generated
  before = {p: p.stat().st_mtime_ns for p in out.rglob("*.wav")}
  synthcaps.generate(out, PARAMS, progress=False)
  assert {p: p.stat().st_mtime_ns for p in out.rglob("*.wav")} == before
  with pytest.raises(ValueError, match="generated with"):
    synthcaps.generate(out, synthcaps.Params(**{**PARAMS.__dict__, "clip_seconds": 5.0}),
                       progress=False)


def test_written_in_the_clotho_layout(generated):
  out, _ = generated
  for split, clips in PARAMS.clips.items():
    report = readers.Report()
    source = readers.load_split("clotho", out, split, report=report)
    assert report.issues == []
    assert len(source.entries) == clips
    assert all(len(e.captions) == 5 and len(set(e.captions)) == 5 for e in source.entries)
    truth = readers.read_ground_truth(
        out / f"synthcaps_ground_truth_{readers.CLOTHO_SPLITS[split]}.jsonl")
    assert set(truth) == {e.file_name for e in source.entries}
  assert b"\r\n" in (out / "clotho_captions_development.csv").read_bytes()


def test_at_least_twelve_event_types():
  assert len(synthcaps.EVENT_TYPES) >= 12
  assert {"dog", "siren", "rain", "engine", "bird", "footsteps", "beep", "bell", "wind",
          "clapping", "knocking", "dripping"} <= set(synthcaps.EVENT_TYPES)


def _alone(kind, **attrs):
  t = synthcaps.EVENT_TYPES[kind]
  e = synthcaps.Event(type=kind, loudness=attrs.get("loudness", "loud"),
                      pitch=attrs.get("pitch", "high" if t.pitched else None),
                      count=attrs.get("count", 3) if t.repeated else None,
                      tempo=attrs.get("tempo", "slow") if (t.repeated or kind == "siren")
                      else None, duration=3.0)
  scene = synthcaps.Scene("single", [e], family=0, gaps=(0.1, 0.9))
  assert synthcaps.layout(scene, 6.0)
  return synthcaps.render(scene, sr=RATE, clip_seconds=6.0, seed=1), e


def _frames(x, hop=160):
  n = len(x) // hop
  return x[:n * hop].reshape(n, hop)


def _onsets(x):
  """Onsets: energy jumps (x4 over the last 100 ms minimum), at most one per 100 ms."""
  energy = (_frames(x) ** 2).mean(axis=1)
  count, last = 0, -100
  for i, e in enumerate(energy):
    before = energy[max(0, i - 10):i]
    if (e > 0.05 * energy.max() and i - last > 10 and
        (before.size == 0 or e > 4 * before.min())):
      count, last = count + 1, i
  return count


def _features(x):
  spectrum = np.abs(np.fft.rfft(x.astype(np.float64))) ** 2
  f = np.fft.rfftfreq(len(x), 1 / RATE)
  centroid = (f * spectrum).sum() / spectrum.sum()
  flatness = np.exp(np.mean(np.log(spectrum[1:] + 1e-12))) / np.mean(spectrum[1:])
  energy = (_frames(x) ** 2).mean(axis=1)
  active = np.mean(energy > 0.05 * energy.max())
  return np.array([np.log(centroid), np.log(flatness + 1e-9), active])


def test_event_types_have_distinct_spectro_temporal_signatures():
  feats = {k: _features(_alone(k)[0]) for k in synthcaps.EVENT_TYPES}
  names = sorted(feats)
  matrix = np.stack([feats[k] for k in names])
  z = (matrix - matrix.mean(0)) / matrix.std(0)
  d = np.linalg.norm(z[:, None] - z[None], axis=-1) + np.eye(len(names)) * 99
  i, j = np.unravel_index(np.argmin(d), d.shape)
  assert d[i, j] > 0.4, f"{names[i]} and {names[j]} sound alike"
  assert feats["engine"][0] < np.log(500) < feats["bird"][0]
  assert feats["rain"][1] > feats["beep"][1]  # noise is flat, a beep is a line


@pytest.mark.parametrize("kind", synthcaps.REPEATED)
def test_counts_are_audible(kind):
  for count in (1, 3):
    x, _ = _alone(kind, count=count, tempo="slow" if count > 1 else None)
    assert _onsets(x) == count, (kind, count)


@pytest.mark.parametrize("kind", [k for k, t in synthcaps.EVENT_TYPES.items() if t.pitched])
def test_pitch_is_audible(kind):
  def dominant(x):
    spectrum = np.abs(np.fft.rfft(x.astype(np.float64)))
    return np.argmax(spectrum) * RATE / len(x)
  low, _ = _alone(kind, pitch="low")
  high, _ = _alone(kind, pitch="high")
  assert dominant(high) > 1.3 * dominant(low)


def test_loudness_and_tempo_are_audible():
  loud, _ = _alone("dog", loudness="loud")
  quiet, _ = _alone("dog", loudness="quiet")
  db = 10 * np.log10(np.mean(loud.astype(np.float64) ** 2) / np.mean(quiet.astype(np.float64) ** 2))
  assert db > 10
  slow, e_slow = _alone("beep", tempo="slow")
  fast, e_fast = _alone("beep", tempo="fast")
  assert e_fast.duration < e_slow.duration
  span = lambda x: np.ptp(np.nonzero((_frames(x) ** 2).mean(1) > 1e-3)[0])
  assert span(fast) < span(slow)


def _groups(out, split):
  truth = readers.read_ground_truth(
      out / f"synthcaps_ground_truth_{readers.CLOTHO_SPLITS[split]}.jsonl")
  families = {}
  for row in truth.values():
    families.setdefault(row["family"], []).append(row)
  return truth, families


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_every_split_has_siblings_that_differ_in_one_detail(generated, split):
  out, _ = generated
  _, families = _groups(out, split)
  siblings = [f for f in families.values() if len(f) >= 2]
  assert siblings
  for family in siblings:
    base = next(r for r in family if r["variant"] == "base")
    for other in family:
      if other is base:
        continue
      assert other["variant"] in {"order", "count", "pitch", "loudness", "tempo"}
      assert sorted(e["type"] for e in other["events"]) == sorted(
          e["type"] for e in base["events"])
      key = lambda e: (e["type"], e["count"], e["pitch"], e["loudness"], e["tempo"])
      if other["variant"] == "order":
        assert [e["type"] for e in other["events"]] != [e["type"] for e in base["events"]]
        assert sorted(map(key, other["events"]), key=str) == sorted(
            map(key, base["events"]), key=str)
      else:
        changed = [a for a, b in zip(sorted(base["events"], key=lambda e: e["slot"]),
                                     sorted(other["events"], key=lambda e: e["slot"]),
                                     strict=True) if key(a) != key(b)]
        assert len(changed) == 1


_WORDS = {
    "count": {1: ("once", "a single"), 2: ("twice", "two"), 3: ("three",), 4: ("four",),
              5: ("five",)},
    "pitch": {"high": ("high",  "shrill"), "low": ("low", "deep")},
    "tempo": {"fast": ("quick", "rapid", "fast"),
              "slow": ("slow", "long pauses", "unhurried", "spaced-out", "long sweeps")},
}


def test_captions_state_order_overlap_count_pitch_loudness_tempo(generated):
  out, _ = generated
  seen = set()
  for split in PARAMS.clips:
    truth, _ = _groups(out, split)
    source = readers.load_split("clotho", out, split, report=readers.Report())
    for entry in source.entries:
      t = truth[entry.file_name]
      for caption in entry.captions:
        text = caption.lower()
        for e in t["events"]:
          kind = synthcaps.EVENT_TYPES[e["type"]]
          assert any(w in text for w in kind.sources), (caption, e)
          words = kind.loud_words if e["loudness"] == "loud" else kind.quiet_words
          adverbs = ("loudly",) if e["loudness"] == "loud" else ("quietly", "softly",
                                                                 "faintly")
          assert any(re.search(rf"\b{w}\b", text) for w in words + adverbs), (caption, e)
          for attr in ("count", "pitch", "tempo"):
            if e[attr] is not None:
              assert any(w in text for w in _WORDS[attr][e[attr]]), (caption, attr, e)
              seen.add(attr)
        if t["structure"] == "sequence":
          assert re.search(r"\b(then|followed by|after|before)\b", text), caption
          seen.add("order")
        if t["structure"] == "overlap":
          assert re.search(r"\b(while|as|at the same time|together with)\b", text), caption
          seen.add("overlap")
        if t["structure"] == "background":
          assert re.search(r"in the background|\bover\b", text), caption
          seen.add("background")
  assert seen == {"count", "pitch", "tempo", "order", "overlap", "background"}


def test_ground_truth_is_json_and_matches_the_audio_layout(generated):
  out, _ = generated
  truth, _ = _groups(out, "train")
  for row in truth.values():
    json.dumps(row)
    for e in row["events"]:
      assert 0 <= e["onset"] and e["onset"] + e["duration"] <= PARAMS.clip_seconds + 1e-6
    fg = [e for e in row["events"] if not e["background"]]
    if row["structure"] in ("sequence", "background"):
      onsets = [e["onset"] for e in fg]
      assert onsets == sorted(onsets)
      assert all(a["onset"] + a["duration"] <= b["onset"] for a, b in zip(fg, fg[1:], strict=False))
    if row["structure"] == "overlap":
      a, b = fg
      assert b["onset"] < a["onset"] + a["duration"]
