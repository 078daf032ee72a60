"""Search: sharded tiles equal the untiled score, two-stage search equals exhaustive search when
the shortlist is the whole corpus, the on-disk index resumes exactly, and the query command
returns the clip the full score ranks first.

The model is the tiny test HADE, randomly initialised and saved as a checkpoint (search needs a
model, not a good one: the expected results are computed here from the untiled score).
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile
from flax import nnx

from hade_jax import api, metrics, retrieval, search
from hade_jax import heads as hade_heads
from tests.tiny_train_config import save_random_checkpoint


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, minilm_dir) -> pathlib.Path:
  """A checkpoint of a randomly initialised tiny HADE, laid out as the trainer writes it."""
  return save_random_checkpoint(tmp_path_factory.mktemp("wd"), minilm_dir)


@pytest.fixture(scope="module")
def model(workdir) -> api.Hade:
  return api.Hade.load(workdir)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> pathlib.Path:
  """Audio files in several formats, rates, channel counts and lengths, plus a broken one."""
  root = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(0)
  t = lambda sr, s: np.arange(int(sr * s)) / sr  # noqa: E731
  files = {
      "tones/a440.wav": (16_000, np.sin(2 * np.pi * 440 * t(16_000, 2.0)), "PCM_16"),
      "tones/a880.flac": (32_000, np.sin(2 * np.pi * 880 * t(32_000, 1.5)), "PCM_16"),
      "noise/white.ogg": (22_050, 0.3 * rng.standard_normal(int(22_050 * 3.0)), "VORBIS"),
      "noise/short_stereo.wav": (44_100, 0.2 * rng.standard_normal((int(44_100 * 0.6), 2)),
                                 "PCM_24"),
      "chirp.wav": (48_000, np.sin(2 * np.pi * 3000 * t(48_000, 1.3) ** 2), "FLOAT"),
      "clicks.flac": (16_000, (np.arange(16_000) % 1600 == 0).astype(float), "PCM_16"),
      "hum.wav": (16_000, 0.5 * np.sin(2 * np.pi * 60 * t(16_000, 4.0)), "PCM_16"),
  }
  for name, (sr, x, subtype) in files.items():
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(root / name, np.asarray(x, np.float32) * 0.9, sr, subtype=subtype)
  (root / "broken.wav").write_bytes(b"RIFF this is not audio")
  (root / "notes.txt").write_text("not audio, not listed")
  return root


def random_features(model: api.Hade, num_clips: int, texts: list[str], seed: int):
  rng = np.random.default_rng(seed)
  waves = 0.3 * rng.standard_normal((num_clips, model.num_samples)).astype(np.float32)
  return model.embed_waves(list(waves), batch_size=5), model.embed_text(texts)


QUERIES = ["a dog barks while cars pass", "a high tone", "rain falls on a metal roof",
           "someone claps twice", "the hum of a fridge"]


def test_sharded_tiles_equal_untiled_and_one_device(model):
  assert jax.device_count() == 8, "conftest must simulate 8 CPU devices"
  audio, text = random_features(model, 13, QUERIES, seed=1)
  want = retrieval.score_untiled(model.model, audio, text)
  # 13 clips in tiles of 3 (rounded up to 8 rows, one per device) x 2 captions.
  tiled = model.encoder.score(audio, text, tile=3, tile_text=2)
  np.testing.assert_allclose(tiled, want, rtol=1e-5, atol=1e-5)
  one = retrieval.Encoder(model.model, retrieval.device_mesh(jax.devices()[:1]))
  np.testing.assert_allclose(one.score(audio, text, tile=4), want, rtol=1e-5, atol=1e-5)
  # The batch-sharded encoders agree with one unsharded call of the model.
  ids, mask = model.tokenizer(QUERIES)
  direct = model.model.encode_text(jnp.asarray(ids), jnp.asarray(mask))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), text,
               jax.tree.map(np.asarray, direct))


def test_captions_are_scored_by_length_in_cut_tiles(model, monkeypatch):
  # Encoder.score orders the captions by length and cuts each text tile to its longest
  # caption (rounded up to WORD_BUCKET words): fewer words multiplied, the same scores.
  texts = ["rain", "a dog barks twice while many cars pass by on a wet road",
           "a high tone", "hum", "someone claps twice in a small room", "wind"]
  audio, text = random_features(model, 5, texts, seed=6)
  full_width = text.levels[0].shape[1]
  widths = retrieval.text_widths(text)
  np.testing.assert_array_equal(widths, np.asarray(text.level_masks[0]).sum(1))
  seen = []
  score = model.encoder._score
  monkeypatch.setattr(model.encoder, "_score",
                      lambda s, a, t: seen.append(t.levels[0].shape[1]) or score(s, a, t))
  got = model.encoder.score(audio, text, tile=5, tile_text=3)
  short = sorted(widths)[2]  # the three shortest captions share the first tile
  assert seen == [-(-short // retrieval.WORD_BUCKET) * retrieval.WORD_BUCKET, full_width]
  np.testing.assert_allclose(got, retrieval.score_untiled(model.model, audio, text),
                             rtol=1e-5, atol=1e-5)


def test_two_stage_with_the_whole_corpus_equals_exhaustive(model):
  audio, text = random_features(model, 19, QUERIES, seed=2)
  index = retrieval.MemoryIndex(audio)
  searcher = retrieval.Searcher(model.encoder, index)
  want = retrieval.score_untiled(model.model, audio, text)  # [A, Q]
  exhaustive = searcher.exhaustive(text, k=7, tile=4, chunk=6)
  two_stage = searcher.search(text, k=7, shortlist=19, rerank_rows=40)
  assert exhaustive.shortlist == two_stage.shortlist == 19
  np.testing.assert_array_equal(two_stage.rows_QxK, exhaustive.rows_QxK)
  np.testing.assert_allclose(two_stage.scores_QxK, exhaustive.scores_QxK, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(exhaustive.rows_QxK, np.argsort(-want.T, axis=1)[:, :7])
  np.testing.assert_allclose(exhaustive.scores_QxK, -np.sort(-want.T, axis=1)[:, :7], atol=1e-5)


def test_two_stage_rescores_exactly_the_global_shortlist(model):
  audio, text = random_features(model, 23, QUERIES, seed=3)
  searcher = retrieval.Searcher(model.encoder, retrieval.MemoryIndex(audio))
  result = searcher.search(text, k=6, shortlist=6)
  g_AxQ = (np.asarray(hade_heads.normalize(audio.global_AxD))
           @ np.asarray(hade_heads.normalize(text.global_TxD)).T)
  full_AxQ = retrieval.score_untiled(model.model, audio, text)
  for q in range(len(QUERIES)):
    assert set(result.rows_QxK[q]) == set(np.argsort(-g_AxQ[:, q])[:6])
    np.testing.assert_allclose(result.scores_QxK[q], full_AxQ[result.rows_QxK[q], q], atol=1e-5)
    assert np.all(np.diff(result.scores_QxK[q]) <= 0)
  # The evaluator's two-stage T2A ranks describe the same search: a caption whose clip is q.
  clip_of = np.argsort(-full_AxQ, axis=0)[2]  # each query's 3rd best clip as ground truth
  ranks = metrics.two_stage_t2a_ranks(full_AxQ, g_AxQ, clip_of, 6)
  for q, clip in enumerate(clip_of):
    rows = list(result.rows_QxK[q])
    assert ranks[q] == (rows.index(clip) + 1 if clip in rows else len(audio.global_AxD) + 1)


def test_embedding_is_deterministic_and_files_equal_arrays(model, corpus):
  files = [corpus / n for n in ("tones/a440.wav", "noise/white.ogg", "chirp.wav", "hum.wav")]
  a = model.embed_audio(files, batch_size=3)
  b = model.embed_audio(files[::-1], batch_size=8)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y[::-1], rtol=1e-5, atol=1e-6), a, b)
  # A 16 kHz PCM16 file is the model's own input: its samples as an array embed the same.
  samples, sr = soundfile.read(files[0], dtype="int16")
  c = model.embed_audio([samples], sample_rate=sr)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x[:1], y, rtol=1e-6, atol=1e-6), a, c)
  # Long clips: the crop policy takes the head, so the first 1.27 s decide.
  wave = model.load_audio(files[3])
  full, _ = soundfile.read(files[3], dtype="float32")
  np.testing.assert_allclose(wave, full[:model.num_samples], atol=1 / 32768)


def test_index_resumes_and_query_returns_the_best_clip(model, workdir, corpus, tmp_path,
                                                       capsys):
  out = tmp_path / "index"
  # An interrupted run: 3 new clips, then a shard left half-written by a crash.
  partial = search.build_index(model, corpus, out, max_new_clips=3, shard_size=2,
                               progress=False)
  assert len(partial) == 2 and [s["file"] for s in partial.skipped] == ["broken.wav"]
  (out / "shards" / ".tmp-000009").mkdir()
  (out / "shards" / "000042").mkdir()
  # The command line resumes it without being told the model again.
  search.main(["index", f"--audio_dir={corpus}", f"--out={out}", "--no_progress",
               "--shard_size=2", "--batch_size=3"])
  index = search.Index(out)
  straight = search.build_index(model, corpus, tmp_path / "straight", progress=False)
  assert index.names == straight.names == [n for n in search.list_audio(corpus)
                                           if n != "broken.wav"]
  assert [s["file"] for s in index.skipped] == ["broken.wav"]
  assert sorted(p.name for p in (out / "shards").iterdir()) == [
      s["dir"] for s in index.manifest["shards"]]
  rows = np.arange(len(index))[::-1]
  jax.tree.map(np.testing.assert_array_equal, index.take(rows), straight.take(rows))
  manifest = json.loads((out / search.MANIFEST).read_text())
  assert manifest["model"]["fingerprint"] == model.fingerprint()

  # The expected ranking, from the files embedded directly and the untiled score.
  audio = model.embed_audio([corpus / n for n in index.names])
  text = model.embed_text(QUERIES[:2])
  want_AxQ = retrieval.score_untiled(model.model, audio, text)
  capsys.readouterr()
  hits = search.main(["query", f"--index={out}", "--k=3", "--shortlist=0", *QUERIES[:2]])
  printed = capsys.readouterr().out
  for q in range(2):
    best = [index.names[i] for i in np.argsort(-want_AxQ[:, q])[:3]]
    assert [h.name for h in hits[q]] == best
    np.testing.assert_allclose([h.score for h in hits[q]], -np.sort(-want_AxQ[:, q])[:3],
                               atol=1e-5)
    assert f"   1  {hits[q][0].score:9.4f}  {best[0]}" in printed
  # Two-stage with the whole corpus shortlisted gives the same answer.
  two_stage = model.search(QUERIES[:2], index, k=3, shortlist=len(index))
  assert [[h.name for h in q] for q in two_stage] == [[h.name for h in q] for q in hits]


def test_an_index_refuses_another_model(model, corpus, tmp_path):
  index = search.build_index(model, corpus, tmp_path / "index", max_new_clips=2,
                             progress=False)
  graphdef, state = nnx.split(model.model)
  state = jax.tree.map(lambda x: x + 1e-3 if x.dtype == jnp.float32 else x, state)
  other = api.Hade(nnx.merge(graphdef, state), model.config)
  with pytest.raises(ValueError, match="built with the model of"):
    search.check_same_model(index, other)
  with pytest.raises(ValueError, match="built with the model of"):
    search.build_index(other, corpus, tmp_path / "index", progress=False)
