"""Results that can be trusted (issue 13): non-finite scores are refused, never counted as
hits; names read from files stay inside their folder; the user API takes one path, both array
layouts, integer PCM and missing files as a user would give them, and reads only a crop.
"""

import json
import os
import pathlib
import tracemalloc

import numpy as np
import pytest
import soundfile

from data_pipelines import audio_io
from hade_jax import api, data, evaluator, locking, metrics, paths, search
from hade_jax import eval as hade_eval
from hade_jax.convert import common as convert_common
from tests.tiny_train_config import save_random_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory, minilm_dir) -> api.Hade:
  return api.Hade.load(save_random_checkpoint(tmp_path_factory.mktemp("wd"), minilm_dir))


# ---------------------------------------------------------------------------------------------
# Item 1: non-finite scores.

CLIP_OF = np.array([0, 0, 1, 1, 2, 2])


def good_scores() -> np.ndarray:
  rng = np.random.default_rng(0)
  return rng.standard_normal((3, 6))


def test_metrics_nonfinite_all_nan_is_refused_not_perfect():
  scores = np.full((3, 6), np.nan)
  with pytest.raises(metrics.NonFiniteScoresError, match="18 of 18 scores .* 3 clips .* 6 "):
    metrics.retrieval_metrics(scores, CLIP_OF)
  for fn in (metrics.t2a_ranks, metrics.a2t_gt_ranks):
    with pytest.raises(metrics.NonFiniteScoresError):
      fn(scores, CLIP_OF)


def test_metrics_nonfinite_one_nan_row_names_the_clip():
  scores = good_scores()
  scores[1] = np.nan
  with pytest.raises(metrics.NonFiniteScoresError, match=r"1 clips \(first: 1\)"):
    metrics.retrieval_metrics(scores, CLIP_OF)
  with pytest.raises(metrics.NonFiniteScoresError, match=r"1 clips \(first: b.wav\)"):
    metrics.check_finite_scores(scores, ["a.wav", "b.wav", "c.wav"])
  with pytest.raises(metrics.NonFiniteScoresError):
    metrics.two_stage_t2a_ranks(scores, good_scores(), CLIP_OF, 2)
  # The finite scores are measured as before.
  assert metrics.retrieval_metrics(good_scores(), CLIP_OF)["t2a/R@10"] == 100.0


def test_metrics_nonfinite_inf_is_refused_with_the_captions():
  scores = good_scores()
  scores[0, 4] = np.inf
  scores[2, 5] = -np.inf
  with pytest.raises(metrics.NonFiniteScoresError, match=r"2 captions \(first: 4, 5\)"):
    metrics.retrieval_metrics(scores, CLIP_OF)


def test_eval_nonfinite_embeddings_name_the_clips(model):
  rng = np.random.default_rng(1)
  waves = 0.1 * rng.standard_normal((3, model.num_samples)).astype(np.float32)
  waves[1, 100:200] = np.nan  # what a damaged model or a NaN input gives the encoder
  ids, mask = model.tokenizer(["a dog", "rain", "a car"])
  split = data.EvalSplit(
      lambda: iter([{"audio": waves, "clip_id": np.arange(3), "valid": np.ones(3, bool)}]),
      ids, mask, np.arange(3), np.arange(3), ["dog.wav", "rain.wav", "car.wav"],
      ["a dog", "rain", "a car"])
  with pytest.raises(metrics.NonFiniteScoresError, match=r"audio encoder .* 1 of 3 .*rain.wav"):
    evaluator.RetrievalEvaluator(batch_size=4, tile=4).scores(model.model, split)


# ---------------------------------------------------------------------------------------------
# Item 8: paths stay inside their folder.


def write_clotho_csv(path: pathlib.Path, names: list[str]) -> None:
  rows = ["file_name," + ",".join(f"caption_{j}" for j in range(1, 6))]
  rows += [f"{n}," + ",".join(f"sound number {j}" for j in range(1, 6)) for n in names]
  path.write_text("\n".join(rows) + "\n", encoding="utf-8")


@pytest.fixture()
def audio_folder(tmp_path) -> pathlib.Path:
  folder = tmp_path / "audio"
  folder.mkdir()
  soundfile.write(folder / "ok.wav", np.zeros(1600, np.float32), 16_000)
  soundfile.write(tmp_path / "secret.wav", np.zeros(1600, np.float32), 16_000)
  return folder


@pytest.mark.parametrize("name", ["../secret.wav", "sub/../../secret.wav", "/etc/passwd"])
def test_eval_csv_traversal_outside_the_audio_folder_is_refused(audio_folder, name):
  csv_path = audio_folder / "captions.csv"
  write_clotho_csv(csv_path, ["ok.wav", name])
  with pytest.raises(paths.PathOutsideError, match=rf"captions.csv line 3: '{name}'"):
    hade_eval.read_folder_clips(csv_path)


def test_eval_csv_symlink_outside_is_refused_unless_allowed(audio_folder):
  (audio_folder / "link.wav").symlink_to(audio_folder.parent / "secret.wav")
  csv_path = audio_folder / "captions.csv"
  write_clotho_csv(csv_path, ["ok.wav", "link.wav"])
  with pytest.raises(paths.PathOutsideError, match="line 3: 'link.wav' is a symlink"):
    hade_eval.read_folder_clips(csv_path)
  clips, _ = hade_eval.read_folder_clips(csv_path, allow_symlinks_outside=True)
  assert [c.name for c in clips] == ["ok.wav", "link.wav"]
  # A symlink that stays inside the folder is fine either way.
  (audio_folder / "inner.wav").symlink_to(audio_folder / "ok.wav")
  write_clotho_csv(csv_path, ["inner.wav"])
  assert [c.name for c in hade_eval.read_folder_clips(csv_path)[0]] == ["inner.wav"]


def test_safetensors_index_outside_the_folder_is_refused(tmp_path):
  folder = tmp_path / "model"
  folder.mkdir()
  (folder / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {"a.weight": "../elsewhere.safetensors"}}))
  with pytest.raises(paths.PathOutsideError, match="weight_map: '../elsewhere.safetensors'"):
    convert_common.load_state_dict(folder)


# ---------------------------------------------------------------------------------------------
# Item 10: API inputs.


@pytest.fixture(scope="module")
def tone(tmp_path_factory) -> pathlib.Path:
  path = tmp_path_factory.mktemp("audio") / "tone.flac"
  t = np.arange(int(44_100 * 2.5)) / 44_100
  x = 0.5 * np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 660 * t ** 1.2)], 1)
  soundfile.write(path, x.astype(np.float32), 44_100, subtype="PCM_16")
  return path


def test_api_one_path_as_str_or_path_is_one_item(model, tone):
  a = model.embed_audio(str(tone))
  b = model.embed_audio(tone)
  c = model.embed_audio([tone, str(tone)])
  assert a.global_AxD.shape[0] == 1 and c.global_AxD.shape[0] == 2
  np.testing.assert_allclose(a.global_AxD, b.global_AxD)
  np.testing.assert_allclose(c.global_AxD, np.concatenate([a.global_AxD] * 2), atol=1e-6)


def test_api_channels_first_arrays_equal_channels_last():
  rng = np.random.default_rng(0)
  x_Sx2 = 0.3 * rng.standard_normal((8000, 2)).astype(np.float32)
  last = api.array_to_mono(x_Sx2, 16_000, 16_000)
  np.testing.assert_array_equal(api.array_to_mono(x_Sx2.T, 16_000, 16_000), last)
  np.testing.assert_allclose(last, x_Sx2.mean(1))
  with pytest.raises(ValueError, match=r"shape \(20, 30\) is ambiguous"):
    api.array_to_mono(np.zeros((20, 30), np.float32), 16_000, 16_000)


def test_api_integer_arrays_are_scaled_by_their_range():
  x = np.array([0.0, 0.5, -0.5, -1.0])
  for dtype, values in [(np.int16, x * 32768), (np.int32, x * 2 ** 31),
                        (np.uint8, 128 + x * 128), (np.int8, x * 128)]:
    np.testing.assert_allclose(api.array_to_mono(values.astype(dtype), 16_000, 16_000), x)
  with pytest.raises(ValueError, match="dtype int64"):
    api.array_to_mono(np.zeros(4, np.int64), 16_000, 16_000)


def test_api_array_without_rate_or_with_rate_1_is_refused(model):
  wave = np.zeros(16_000, np.float32)
  with pytest.raises(ValueError, match="needs its rate: pass sample_rate"):
    model.embed_audio([wave])
  with pytest.raises(ValueError, match="sample_rate=1: .* at least 1000 Hz"):
    model.embed_audio([wave], sample_rate=1)
  with pytest.raises(ValueError, match="pass a list of clips"):
    model.embed_audio(np.zeros((2, 16_000), np.float32), sample_rate=16_000)


def test_api_missing_file_says_no_such_file(model, tmp_path):
  with pytest.raises(audio_io.AudioError, match=r"nope.wav: missing: no such file"):
    model.embed_audio(tmp_path / "nope.wav")


def test_api_on_error_skip_keeps_the_good_items(model, tone, tmp_path):
  (tmp_path / "bad.wav").write_bytes(b"RIFF not audio")
  items = [tone, tmp_path / "nope.wav", tmp_path / "bad.wav", str(tone)]
  with pytest.raises(audio_io.AudioError, match="nope.wav"):
    model.embed_audio(items)
  features, skipped = model.embed_audio(items, on_error="skip")
  assert [(s.position, s.item) for s in skipped] == [(1, str(tmp_path / "nope.wav")),
                                                    (2, str(tmp_path / "bad.wav"))]
  assert "missing" in skipped[0].reason and "unreadable" in skipped[1].reason
  np.testing.assert_allclose(features.global_AxD, model.embed_audio([tone, tone]).global_AxD,
                             atol=1e-6)


@pytest.mark.parametrize("crop", ["head", "center"])
@pytest.mark.parametrize("rate", [16_000, 32_000])
def test_api_crop_of_a_long_file_reads_only_its_frames(tone, crop, rate, monkeypatch):
  num_samples = rate // 2
  whole = audio_io.decode(tone, rate).samples
  start = 0 if crop == "head" else (len(whole) - num_samples) // 2
  read = []
  real_read = soundfile.SoundFile.read  # audio_io reads in blocks through SoundFile.read
  monkeypatch.setattr(soundfile.SoundFile, "read", lambda self, frames=-1, *a, **k: read.append(
      frames) or real_read(self, frames, *a, **k))
  part = audio_io.decode_crop(tone, rate, num_samples, crop)
  # Equal to the whole file decoded then cropped (to one int16 step: rounding after soxr).
  np.testing.assert_allclose(part.samples, whole[start:start + num_samples], atol=1)
  assert part.source_channels == 2 and "cropped" in part.notes
  # 0.5 s of the 2.5 s file, plus 50 ms of resampling margin on each side.
  assert read and 0 < read[-1] <= 0.61 * 44_100


def test_api_decoding_a_crop_of_a_long_file_holds_only_the_crop(tmp_path):
  # 60 s of 48 kHz 8-channel audio: 92 MB as float32 when decoded whole.
  path = tmp_path / "long.wav"
  with soundfile.SoundFile(path, "w", 48_000, 8, "PCM_16") as f:
    block = (0.1 * np.random.default_rng(0).standard_normal((48_000, 8))).astype(np.float32)
    for _ in range(60):
      f.write(block)

  def peak_bytes(fn, *args) -> int:
    tracemalloc.start()  # numpy reports its buffers to tracemalloc
    try:
      fn(path, *args)
      return tracemalloc.get_traced_memory()[1]
    finally:
      tracemalloc.stop()

  crop_kb = peak_bytes(audio_io.decode_crop, 16_000, 32_000, "center") // 1024
  whole_kb = peak_bytes(audio_io.decode, 16_000) // 1024
  assert whole_kb > 90_000 and crop_kb < 6_000, (whole_kb, crop_kb)  # 2 s of 60 s


def test_outside_path_helper_refuses_absolute_and_parent_names(tmp_path):
  with pytest.raises(paths.PathOutsideError, match="absolute"):
    paths.resolve_inside(tmp_path, "/etc/passwd", what="x")
  assert paths.resolve_inside(tmp_path, "a/../b.wav", what="x") == tmp_path / "a/../b.wav"


# ---------------------------------------------------------------------------------------------
# Item 3: the search index notices change and damage.


def write_tone(path: pathlib.Path, freq: float, seconds: float = 0.5) -> None:
  t = np.arange(int(16_000 * seconds)) / 16_000
  soundfile.write(path, (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32), 16_000)


@pytest.fixture()
def indexed(model, tmp_path) -> tuple[pathlib.Path, pathlib.Path]:
  """(audio folder, index folder): 4 tones indexed in shards of 2."""
  audio = tmp_path / "audio"
  audio.mkdir()
  for i, freq in enumerate([220, 440, 880, 1760]):
    write_tone(audio / f"t{i}.wav", freq)
  out = tmp_path / "index"
  search.build_index(model, audio, out, shard_size=2, batch_size=2, progress=False)
  return audio, out


def flip_byte(path: pathlib.Path, offset: int) -> None:
  data = bytearray(path.read_bytes())
  data[offset] ^= 0x40
  path.write_bytes(bytes(data))


def test_index_tamper_flipped_bytes_in_global_are_refused_naming_the_file(indexed):
  _, out = indexed
  target = out / "shards" / "000001" / "global.npy"
  flip_byte(target, target.stat().st_size - 5)  # a value, not the header
  with pytest.raises(search.DamagedIndexError, match=f"{target}: sha256 differs"):
    search.Index(out)
  problems = search.verify_index(out)
  assert problems and str(target) in problems[0]
  with pytest.raises(SystemExit):
    search.main(["verify", f"--index={out}"])


def test_index_tamper_in_a_token_array_is_found_by_verify(indexed, capsys):
  _, out = indexed
  assert search.verify_index(out) == []
  search.main(["verify", f"--index={out}"])
  assert "every file verified" in capsys.readouterr().out
  target = out / "shards" / "000000" / "level0.npy"
  flip_byte(target, target.stat().st_size // 2 + 3)
  assert any(str(target) in p and "differs" in p for p in search.verify_index(out))


def test_index_integrity_truncated_shard_names_the_file(indexed):
  _, out = indexed
  target = out / "shards" / "000000" / "level0.npy"
  target.write_bytes(target.read_bytes()[:-100])
  with pytest.raises(search.DamagedIndexError, match=f"{target}: .* bytes, the manifest "):
    search.Index(out)
  # Without the manifest's record (an old index), the loader's error names the file too.
  manifest = json.loads((out / search.MANIFEST).read_text())
  for shard in manifest["shards"]:
    del shard["files"]
  (out / search.MANIFEST).write_text(json.dumps(manifest))
  with pytest.raises(search.DamagedIndexError, match=f"{target}: unreadable"):
    search.Index(out)


def test_index_stale_replaced_audio_is_re_embedded(model, indexed):
  audio, out = indexed
  write_tone(audio / "t1.wav", 3000, seconds=0.7)
  index = search.build_index(model, audio, out, shard_size=2, batch_size=2, progress=False)
  assert index.changes == {"added": 0, "changed": 1, "removed": 0}
  assert sorted(index.names) == ["t0.wav", "t1.wav", "t2.wav", "t3.wav"]
  row = index.names.index("t1.wav")
  want = model.embed_audio(audio / "t1.wav")
  np.testing.assert_allclose(index.take(np.array([row])).global_AxD, want.global_AxD,
                             atol=1e-5)
  assert search.verify_index(out) == []
  # Nothing changed since: nothing is embedded again.
  again = search.build_index(model, audio, out, shard_size=2, batch_size=2, progress=False)
  assert again.changes == {"added": 0, "changed": 0, "removed": 0}


def test_index_stale_deleted_audio_is_dropped(model, indexed):
  audio, out = indexed
  (audio / "t2.wav").unlink()
  (audio / "t3.wav").unlink()
  write_tone(audio / "t4.wav", 500)
  index = search.build_index(model, audio, out, shard_size=2, batch_size=2, progress=False)
  assert index.changes == {"added": 1, "changed": 0, "removed": 2}
  assert sorted(index.names) == ["t0.wav", "t1.wav", "t4.wav"]
  assert sorted(search.Index(out).names) == sorted(index.names)
  assert search.verify_index(out) == []


def test_index_integrity_user_files_under_shards_survive(model, indexed):
  audio, out = indexed
  shards = out / "shards"
  (shards / "mine").mkdir()
  (shards / "mine" / "notes.txt").write_text("my notes")
  (shards / "000077").mkdir()
  (shards / "000077" / "notes.txt").write_text("also mine")
  (shards / "README").write_text("mine too")
  partial = shards / ".tmp-000005"  # an interrupted shard write
  partial.mkdir()
  (partial / search.SHARD_MARKER).write_text("")
  (partial / "global.npy").write_bytes(b"half")
  search.build_index(model, audio, out, shard_size=2, batch_size=2, progress=False)
  assert not partial.exists()
  assert (shards / "mine" / "notes.txt").read_text() == "my notes"
  assert (shards / "000077" / "notes.txt").read_text() == "also mine"
  assert (shards / "README").read_text() == "mine too"


def test_index_lock_refuses_a_second_writer_naming_the_holder(model, indexed):
  audio, out = indexed
  manifest = (out / search.MANIFEST).read_bytes()
  with locking.WorkdirLock(out, purpose="search index"):  # another `index` run, mid-build
    with pytest.raises(locking.LockedError, match=f"search index.*pid {os.getpid()}"):
      search.build_index(model, audio, out, shard_size=2, batch_size=2, progress=False)
  assert (out / search.MANIFEST).read_bytes() == manifest  # nothing written by the refused run
  search.build_index(model, audio, out, shard_size=2, batch_size=2, progress=False)  # free again


def test_index_outside_manifest_shard_dir_is_refused(indexed):
  _, out = indexed
  manifest = json.loads((out / search.MANIFEST).read_text())
  manifest["shards"][0]["dir"] = "../../elsewhere"
  (out / search.MANIFEST).write_text(json.dumps(manifest))
  with pytest.raises(paths.PathOutsideError, match="shard dir '../../elsewhere'"):
    search.Index(out)


def test_index_nonfinite_embeddings_of_a_damaged_model_are_refused(model, tmp_path):
  import jax
  from flax import nnx

  graphdef, state = nnx.split(model.model)
  state = jax.tree.map(lambda x: x * np.nan if np.issubdtype(x.dtype, np.floating) else x, state)
  damaged = api.Hade(nnx.merge(graphdef, state), model.config)
  audio = tmp_path / "audio"
  audio.mkdir()
  write_tone(audio / "a.wav", 440)
  with pytest.raises(metrics.NonFiniteScoresError, match=r"1 of 1 audio items \(first: a.wav\)"):
    search.build_index(damaged, audio, tmp_path / "index", progress=False)
  with pytest.raises(metrics.NonFiniteScoresError, match="a.wav"):
    damaged.embed_audio(audio / "a.wav")
