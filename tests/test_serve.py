"""The search server's API (starlette's TestClient, no network): results equal the search
module's, paging, clip files with HTTP ranges, 404s for anything but a clip id, the limits,
upload errors, batching of concurrent queries, errors without tracebacks, and a damaged index
refused at start-up."""

import io
import pathlib
import shutil
import struct
import threading

import numpy as np
import pytest
import soundfile
from starlette import testclient

from hade_jax import cli, search, serve, serving, thumbnails, webapp

QUERY = "a dog barks"


@pytest.fixture(scope="module")
def served(served_folder):
  model, index = served_folder
  engine = serving.Engine(model, index, serving.Limits(max_upload_bytes=400_000,
                                                       max_upload_seconds=6.0))
  yield model, index, engine, testclient.TestClient(webapp.create_app(engine),
                                                    raise_server_exceptions=False)
  engine.close()


def test_search_pages_equal_the_search_module(served):
  model, index, _, client = served
  want = model.search([QUERY], index, k=6, shortlist=1000)[0]
  body = client.get("/api/search", params={"q": QUERY, "k": 6}).json()
  assert [r["name"] for r in body["results"]] == [h.name for h in want]
  np.testing.assert_allclose([r["score"] for r in body["results"]], [h.score for h in want],
                             atol=1e-5)
  assert [r["rank"] for r in body["results"]] == list(range(1, 7))
  page = client.get("/api/search", params={"q": QUERY, "k": 3, "offset": 3}).json()
  assert [r["name"] for r in page["results"]] == [h.name for h in want[3:6]]
  assert [r["rank"] for r in page["results"]] == [4, 5, 6]
  first = body["results"][0]
  assert first["duration"] == pytest.approx(5.0, abs=0.01)  # ESC-50 clips are 5 s
  assert first["audio"] == f"/audio/{first['clip']}"


def test_similar_ranks_the_others_by_global_cosine(served):
  _, index, _, client = served
  body = client.get("/api/similar", params={"clip": 2, "k": 5}).json()
  g = index.global_NxD / np.linalg.norm(index.global_NxD, axis=1, keepdims=True)
  cos = g @ g[2]
  cos[2] = -np.inf
  assert [r["clip"] for r in body["results"]] == list(np.argsort(-cos, kind="stable")[:5])
  assert client.get("/api/similar", params={"clip": 999}).status_code == 404


def test_audio_is_served_with_ranges_and_only_by_clip_id(served):
  _, index, _, client = served
  data = (pathlib.Path(index.manifest["audio"]["root"]) / index.names[1]).read_bytes()
  whole = client.get("/audio/1")
  assert whole.status_code == 200 and whole.content == data
  assert whole.headers["accept-ranges"] == "bytes"
  part = client.get("/audio/1", headers={"Range": "bytes=100-199"})
  assert part.status_code == 206 and part.content == data[100:200]
  assert part.headers["content-range"] == f"bytes 100-199/{len(data)}"
  for path in ("/audio/20", "/audio/-1", "/audio/1.0", "/audio/%2Fetc%2Fpasswd",
               "/audio/..%2F..%2Fetc%2Fpasswd", "/audio/../../etc/passwd", "/etc/passwd",
               "/audio/%C2%B2", "/thumbnail/..%2Fx"):
    response = client.get(path)
    assert response.status_code == 404, path
    assert "error" in response.json(), path


def test_thumbnail_is_a_png_rendered_once(served, monkeypatch):
  _, _, engine, client = served
  calls = []
  render = thumbnails.render
  monkeypatch.setattr(thumbnails, "render", lambda p: calls.append(p) or render(p))
  first, again = client.get("/thumbnail/4"), client.get("/thumbnail/4")
  assert first.headers["content-type"] == "image/png" and first.content == again.content
  assert first.content[:8] == b"\x89PNG\r\n\x1a\n"
  assert struct.unpack(">II", first.content[16:24]) == (thumbnails.WIDTH, thumbnails.HEIGHT)
  assert len(calls) == 1


def test_limits_are_enforced_with_json_messages(served):
  _, _, _, client = served
  cases = {("", 10, None): "empty", ("x" * 301, 10, None): "at most 300",
           (QUERY, 0, None): "between 1 and 100", (QUERY, 101, None): "between 1 and 100",
           (QUERY, 10, 7): "shortlist=7", (QUERY, "many", None): "k:"}
  for (q, k, shortlist), message in cases.items():
    params = {"q": q, "k": k} | ({"shortlist": shortlist} if shortlist else {})
    response = client.get("/api/search", params=params)
    assert response.status_code == 400, params
    assert message in response.json()["error"], (params, response.json())
  deep = client.get("/api/search", params={"q": QUERY, "k": 100, "offset": 401})
  assert deep.status_code == 400 and "paging stops" in deep.json()["error"]
  assert client.get("/api/search").status_code == 400  # no q


def test_upload_searches_by_example_and_reports_bad_files(served):
  _, index, _, client = served
  root = pathlib.Path(index.manifest["audio"]["root"])
  data = (root / index.names[3]).read_bytes()
  body = client.post("/api/upload", params={"k": 3},
                     files={"file": ("mine.flac", data, "audio/flac")}).json()
  assert body["results"][0]["clip"] == 3  # the clip itself is closest to itself
  assert body["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
  bad = client.post("/api/upload", files={"file": ("notes.wav", b"RIFF not audio", "audio/wav")})
  assert bad.status_code == 400 and bad.json()["error"].startswith("notes.wav: unreadable")
  assert "/tmp" not in bad.json()["error"]  # the server's scratch path is not shown
  big = client.post("/api/upload", files={"file": ("big.wav", b"0" * 500_000, "audio/wav")})
  assert big.status_code == 413 and "400000 bytes" in big.json()["error"]
  long_wave = io.BytesIO()
  soundfile.write(long_wave, np.zeros(8000 * 7, np.int16), 8000, format="WAV")
  too_long = client.post("/api/upload", files={"file": ("long.wav", long_wave.getvalue())})
  assert too_long.status_code == 400 and "limited to 6 s" in too_long.json()["error"]


def test_concurrent_queries_share_one_encoder_call(served):
  model, index, _, _ = served
  engine = serving.Engine(model, index, serving.Limits(max_pending=6))
  gate = threading.Event()
  engine.hade = _Gated(model, gate)
  try:
    engine.embed_upload(np.zeros(model.num_samples, np.float32))  # holds the worker
    queries = ["a dog barks", "rain", "a door knocks", "birds sing", "an engine"]
    futures = [engine.search_text(q, 3, 0, None) for q in queries]
    with pytest.raises(serving.Busy):  # the queue holds max_pending calls
      engine.search_text("one too many", 3, 0, None)
    gate.set()
    results = [f.result(timeout=60) for f in futures]
  finally:
    engine.close()
  assert {r[2]["batch"] for r in results} == {len(queries)}
  for q, (rows, scores, _) in zip(queries, results, strict=True):
    alone = model.search([q], index, k=3)[0]
    assert list(rows) == [h.row for h in alone]
    np.testing.assert_allclose(scores, [h.score for h in alone], atol=1e-5)


class _Gated:
  """The model, with audio embedding waiting for a gate (to hold the worker busy)."""

  def __init__(self, model, gate):
    self._model, self._gate = model, gate

  def embed_waves(self, waves, batch_size=None):
    self._gate.wait(60)
    return self._model.embed_waves(waves, batch_size)

  def __getattr__(self, name):
    return getattr(self._model, name)


def test_an_unexpected_error_is_json_without_traceback(served, monkeypatch):
  _, _, engine, client = served
  monkeypatch.setattr(engine, "hits", lambda *a: 1 / 0)
  response = client.get("/api/similar", params={"clip": 0})
  assert response.status_code == 500
  assert response.json()["error"].startswith("internal error (ZeroDivisionError)")
  assert "Traceback" not in response.text
  page = client.get("/nowhere", headers={"accept": "text/html"})
  assert page.status_code == 404 and "<h1>404</h1>" in page.text


def test_a_damaged_index_is_refused_at_start_up(served, tmp_path, capsys):
  _, index, _, _ = served
  damaged = tmp_path / "index"
  shutil.copytree(index.path, damaged)
  target = damaged / "shards" / "000000" / "level0.npy"
  target.write_bytes(target.read_bytes()[:-8])
  with pytest.raises(search.DamagedIndexError, match="level0.npy: .* bytes"):
    serve.build_app(str(damaged), warm_up=False)
  assert cli.run(serve.main, [f"--index={damaged}", "--port=1"]) == 1
  err = capsys.readouterr().err
  assert "level0.npy" in err and "Traceback" not in err
