"""The approximate shortlist (hade_jax/ann.py) and compact re-ranking features (quantize.py):
the shortlist keeps the exact top k of a small clustered corpus, survives a save/load round
trip, a damaged file is refused by name, the on-disk index builds it and queries through it,
and bfloat16/int8 features score within a stated tolerance of float32.
"""

import json

import jax
import numpy as np
import pytest

from hade_jax import ann, quantize, retrieval, search
from tests.test_search import QUERIES, corpus, model, random_features, workdir  # noqa: F401


def clustered(n: int = 1600, d: int = 32, clusters: int = 40, seed: int = 0):
  """(corpus [n, d], queries [12, d]): clusters plus noise; queries near corpus clips."""
  rng = np.random.default_rng(seed)
  centres = rng.standard_normal((clusters, d)).astype(np.float32)
  x = centres[rng.integers(clusters, size=n)] + 0.5 * rng.standard_normal((n, d), np.float32)
  t = x[rng.choice(n, 12, replace=False)] + 0.3 * rng.standard_normal((12, d), np.float32)
  return x, t


def exact_top(x, t, k):
  sims = ann.normalized(t) @ ann.normalized(x).T
  return np.argsort(-sims, axis=1, kind="stable")[:, :k], sims


def build(x, **kw) -> ann.Shortlister:
  cfg = ann.AnnConfig(**kw)
  return ann.Shortlister.build(x, np.array_split(x, 3), len(x), cfg)


def test_ivfpq_shortlist_holds_the_exact_top_k_with_every_cell_probed():
  x, t = clustered()
  want, sims = exact_top(x, t, 5)
  shortlister = build(x, nlist=8, pq_bytes=8, nprobe=8)
  rows, approx = shortlister.search(t, 40)
  assert rows.shape == (12, 40) and rows.dtype == np.int64
  for q in range(12):
    assert set(want[q]) <= set(rows[q]), q  # re-ranking the 40 recovers the exact top 5
    assert len(set(rows[q])) == 40
  # The PQ similarities approximate the cosines (8 bytes for 32 dims: a coarse code).
  error = np.abs(approx - np.take_along_axis(sims, rows, 1))
  assert error.mean() < 0.05 and error.max() < 0.2


def test_the_refine_code_reorders_the_candidates_by_a_finer_cosine():
  # 4-byte PQ codes of 32 dims are coarse. A refine re-orders k_factor x S of their candidates
  # by a finer code: the float vectors ('Flat') give the exact top 5 in the exact order, 1 byte
  # per dimension ('SQ8', the default) nearly so, both far better than the PQ order.
  x, t = clustered()
  want, sims = exact_top(x, t, 5)
  coarse = build(x, nlist=8, pq_bytes=4, nprobe=8, refine="")
  flat = build(x, nlist=8, pq_bytes=4, nprobe=8, refine="Flat", k_factor=40)
  sq8 = build(x, nlist=8, pq_bytes=4, nprobe=8, k_factor=40)
  assert "Refine(SQ8)" in ann.factory_string(sq8.cfg, len(x), x.shape[1])
  assert flat.code_bytes_per_clip() == coarse.code_bytes_per_clip() + 4 * x.shape[1]
  assert sq8.code_bytes_per_clip() == coarse.code_bytes_per_clip() + x.shape[1]
  rows, approx = flat.search(t, 5)
  np.testing.assert_array_equal(rows, want)
  np.testing.assert_allclose(approx, np.take_along_axis(sims, rows, 1), atol=1e-5)

  def kept(s):
    return np.mean([len(set(r) & set(w)) / 5 for r, w in zip(s.search(t, 5)[0], want,
                                                               strict=True)])

  assert kept(sq8) >= 0.9 and kept(coarse) < kept(sq8) - 0.1
  # k_factor is a query-time setting: 1 re-orders only the S PQ candidates themselves.
  sq8.set_query_params(k_factor=1)
  assert faiss_k_factor(sq8) == 1.0 and sq8.cfg.k_factor == 1
  with pytest.raises(ValueError, match="ann refine 'PQ4': choose one of"):
    ann.AnnConfig(refine="PQ4")


def faiss_k_factor(shortlister) -> float:
  import faiss

  return faiss.downcast_index(shortlister.index).k_factor


def test_hnsw_returns_the_exact_top_k_and_cosines():
  x, t = clustered(n=800)
  want, sims = exact_top(x, t, 10)
  rows, approx = build(x, kind="hnsw", ef_search=400).search(t, 10)
  np.testing.assert_array_equal(np.sort(rows, 1), np.sort(want, 1))
  np.testing.assert_allclose(approx, np.take_along_axis(sims, rows, 1), atol=1e-5)


def test_a_short_probe_is_widened_until_the_shortlist_is_full():
  x, t = clustered()
  rows, _ = build(x, nlist=32, pq_bytes=8, nprobe=1).search(t, 300)  # ~50 clips per cell
  assert (rows >= 0).all() and all(len(set(r)) == 300 for r in rows)


def test_save_load_round_trip_and_a_damaged_file_is_named(tmp_path):
  x, t = clustered()
  shortlister = build(x, nlist=8, pq_bytes=8, nprobe=4)
  shortlister.save(tmp_path / "a.faiss")
  loaded = ann.load(tmp_path / "a.faiss", shortlister.cfg)
  for got, want in zip(loaded.search(t, 20), shortlister.search(t, 20), strict=True):
    np.testing.assert_array_equal(got, want)
  (tmp_path / "bad.faiss").write_bytes(b"not a faiss index at all")
  with pytest.raises(ValueError, match="bad.faiss: not a readable FAISS index"):
    ann.load(tmp_path / "bad.faiss", shortlister.cfg)


def test_recommended_keeps_exact_below_the_crossover():
  assert ann.recommended(ann.EXACT_BELOW - 1) is None
  assert ann.recommended(ann.EXACT_BELOW) == "ivfpq"
  with pytest.raises(ValueError, match="pq_bytes=48 does not divide"):
    ann.factory_string(ann.AnnConfig(pq_bytes=48), 10_000, 256)


def test_searcher_with_a_whole_corpus_shortlist_equals_exact(model):  # noqa: F811
  audio, text = random_features(model, 64, QUERIES, seed=5)
  index = retrieval.MemoryIndex(audio)
  shortlister = build(np.asarray(audio.global_AxD), nlist=4, pq_bytes=4, nprobe=4)
  approx = retrieval.Searcher(model.encoder, index, shortlister).search(text, k=5, shortlist=64)
  exact = retrieval.Searcher(model.encoder, index).search(text, k=5, shortlist=64)
  np.testing.assert_array_equal(approx.rows_QxK, exact.rows_QxK)
  np.testing.assert_allclose(approx.scores_QxK, exact.scores_QxK, atol=1e-5)


def test_index_cli_builds_and_queries_the_shortlist(model, corpus, tmp_path, capsys):  # noqa: F811
  out = tmp_path / "index"
  index = search.build_index(model, corpus, out, progress=False)
  n = len(index)
  search.main(["ann", f"--index={out}", "--pq_bytes=4", "--k_factor=8"])
  manifest = json.loads((out / search.MANIFEST).read_text())
  assert manifest["ann"]["num_clips"] == n and manifest["ann"]["config"]["kind"] == "ivfpq"
  assert manifest["ann"]["config"]["refine"] == "SQ8" and manifest["ann"]["config"]["k_factor"] == 8
  assert search.verify_index(out) == []
  capsys.readouterr()
  approx = search.main(["query", f"--index={out}", "--k=3", f"--shortlist={n}", QUERIES[0]])
  assert f"{n} of {n} clips (ivfpq shortlist)" in capsys.readouterr().out
  exact = search.main(["query", f"--index={out}", "--k=3", f"--shortlist={n}", "--exact",
                       QUERIES[0]])
  assert "exhaustive over" in capsys.readouterr().out  # the whole corpus, exactly
  assert [h.name for h in approx[0]] == [h.name for h in exact[0]]
  # A damaged file (same size, altered bytes) is refused, naming it.
  path = out / search.ANN_FILE
  data = bytearray(path.read_bytes())
  data[len(data) // 2:len(data) // 2 + 64] = bytes(64)
  path.write_bytes(bytes(data))
  with pytest.raises(search.DamagedIndexError, match=f"{path}: sampled hash differs"):
    search.open_ann(search.Index(out))
  assert any(str(path) in p for p in search.verify_index(out))


# Stated tolerances of the full score from stored features (the tiny model's scores are O(1)):
# bfloat16 rounds each value by at most 2^-9 relative, int8 each vector by max|x| / 254.
TOLERANCE = {"float32": 0.0, "bfloat16": 0.02, "int8": 0.05}


@pytest.mark.parametrize("dtype", quantize.DTYPES)
def test_compact_features_score_within_tolerance(model, dtype):  # noqa: F811
  audio, text = random_features(model, 12, QUERIES, seed=6)
  stored = quantize.QuantizedIndex(audio, dtype)
  rows = np.array([3, 0, 11, 3])
  restored = stored.take(rows)
  jax.tree.map(lambda a, b: np.testing.assert_equal(a.dtype, b.dtype), restored,
               jax.tree.map(lambda x: x[rows], audio))
  want = model.score(jax.tree.map(lambda x: np.asarray(x)[rows], audio), text)
  got = model.score(restored, text)
  assert np.abs(got - want).max() <= TOLERANCE[dtype]
  full = quantize.QuantizedIndex(audio, "float32").bytes_per_clip()
  # Masks stay bool; int8 adds a float32 scale per vector (large at the tiny width of 16).
  assert stored.bytes_per_clip() <= full * {"float32": 1, "bfloat16": 0.55, "int8": 0.4}[dtype]
