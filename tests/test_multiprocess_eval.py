"""Evaluation and search from the command line in two processes (2 x 4 CPU devices, Gloo)
give what one process with 8 devices gives: the same metrics, the same index, the same hits;
only process 0 writes and prints.
"""

import csv
import json
import pathlib

import jax
import numpy as np
import pytest
import soundfile

from hade_jax import api, search
from hade_jax import eval as hade_eval
from tests.processes import run_in_processes
from tests.tiny_train_config import save_random_checkpoint

QUERIES = ["a high tone", "noise that gets louder"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> pathlib.Path:
  """Eleven 16 kHz clips (tones, noise, chirps) with two captions each, Clotho's CSV layout;
  plus one broken file the CSV names (skipped and reported)."""
  root = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(0)
  t = np.arange(int(16_000 * 1.5)) / 16_000
  rows = []
  for i in range(11):
    kind = ("tone", "noise", "chirp")[i % 3]
    if kind == "tone":
      x = np.sin(2 * np.pi * (220 + 110 * i) * t)
    elif kind == "noise":
      x = rng.standard_normal(len(t)) * np.linspace(0.05, 0.5 + 0.05 * i, len(t))
    else:
      x = np.sin(2 * np.pi * (200 + 50 * i) * t ** 2)
    name = f"{kind}_{i:02d}.wav"
    soundfile.write(root / name, (0.5 * x).astype(np.float32), 16_000, subtype="PCM_16")
    rows.append([name, f"a {kind} number {i}", f"{kind} sound, variant {i}"])
  (root / "zz_broken.wav").write_bytes(b"RIFF not audio at all")
  rows.append(["zz_broken.wav", "a broken file", "nothing"])
  with open(root / "captions.csv", "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(["file_name", "caption_1", "caption_2"])
    writer.writerows(rows)
  return root


def test_eval_and_search_in_two_processes_equal_one(corpus, minilm_dir, tmp_path):
  assert jax.device_count() == 8, "conftest must simulate 8 CPU devices"
  workdir = save_random_checkpoint(tmp_path / "wd", minilm_dir)
  ckpt = workdir / "checkpoints" / "0"
  two = {"processes": 2, "devices_per_process": 4}

  # Evaluation: python -m hade_jax.eval on every process, results written by process 0.
  one_metrics = hade_eval.evaluate(checkpoint=ckpt, csv_path=corpus / "captions.csv",
                                   out_dir=tmp_path / "eval_one", shortlists=(3,))
  outputs = run_in_processes(
      "hade_jax.eval", [f"--checkpoint={ckpt}", f"--csv={corpus / 'captions.csv'}",
                        f"--out={tmp_path / 'eval_two'}", "--shortlists=3"],
      tmp_path / "eval", **two)
  written = json.loads((tmp_path / "eval_two" / "metrics.json").read_text())
  reference = json.loads((tmp_path / "eval_one" / "metrics.json").read_text())
  assert written["clips"] == reference["clips"] and len(written["clips"]) == 11
  assert written["metrics"] == pytest.approx(reference["metrics"], abs=1e-4)
  assert written["metrics"] == pytest.approx(one_metrics, abs=1e-4)
  assert (tmp_path / "eval_two" / "dcase_top10.csv").read_text() == (
      tmp_path / "eval_one" / "dcase_top10.csv").read_text()
  assert "results:" in outputs[0] and "results:" not in outputs[1]
  assert "process 0 of 2" in outputs[0] and "4 local / 8 global devices" in outputs[0]
  assert "zz_broken.wav" in outputs[0]  # the skipped clip is reported

  # Index: both processes embed, process 0 writes; then query it from two processes.
  model = api.Hade.load(workdir)
  one_index = search.build_index(model, corpus, tmp_path / "index_one", shard_size=4,
                                 progress=False)
  run_in_processes("hade_jax.search", ["index", f"--checkpoint={ckpt}",
                                       f"--audio_dir={corpus}", f"--out={tmp_path / 'index_two'}",
                                       "--shard_size=4", "--batch_size=3", "--no_progress"],
                   tmp_path / "index", **two)
  index = search.Index(tmp_path / "index_two")
  assert index.names == one_index.names and len(index) == 11
  assert [s["file"] for s in index.skipped] == ["zz_broken.wav"]
  assert index.manifest["model"]["fingerprint"] == model.fingerprint()
  rows = np.arange(len(index))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               index.take(rows), one_index.take(rows))

  hits, _ = search.query(model, one_index, QUERIES, k=3, shortlist=5)
  outputs = run_in_processes("hade_jax.search", ["query", f"--index={tmp_path / 'index_two'}",
                                                 "--k=3", "--shortlist=5", *QUERIES],
                             tmp_path / "query", **two)
  for query_hits in hits:
    for rank, hit in enumerate(query_hits, 1):
      assert f"{rank:4d}  {hit.score:9.4f}  {hit.name}" in outputs[0]
  assert "two-stage: 5 of 11 clips" in outputs[0]
  assert QUERIES[0] not in outputs[1]  # only process 0 prints results
