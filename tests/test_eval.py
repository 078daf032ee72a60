"""Evaluation: ranking helpers against hand-computed cases, and `evaluate` end to end from a
trained checkpoint on the real caption_eval21 set (a folder of FLAC files + captions CSV) and
on a prepared TFDS split, from Python and from the command line.
"""

import csv
import json
import pathlib

import numpy as np
import pytest

from hade_jax import api, checkpoints, data, evaluator, metrics, retrieval, trainer
from hade_jax import eval as hade_eval
from tests.tiny_train_config import tiny_config


def test_top_k_clips_breaks_ties_by_split_order():
  scores = np.array([[0.5, 0.1],
                     [0.9, 0.1],
                     [0.5, 0.3],
                     [0.2, 0.1]])
  np.testing.assert_array_equal(metrics.top_k_clips(scores, 3), [[1, 0, 2], [2, 0, 1]])
  assert metrics.top_k_clips(scores, 10).shape == (2, 4)


def test_two_stage_ranks_hand_computed():
  # 4 clips x 3 captions; captions 0, 1 describe clip 0, caption 2 describes clip 3.
  full = np.array([[0.9, 0.2, 0.1],
                   [0.5, 0.8, 0.5],
                   [0.95, 0.1, 0.7],
                   [0.3, 0.4, 0.5]])
  glob = np.array([[0.9, 0.2, 0.0],
                   [0.8, 0.9, 0.9],
                   [0.1, 0.8, 0.8],
                   [0.2, 0.2, 0.1]])
  clip_of = np.array([0, 0, 3])
  # Shortlist 2: caption 0 keeps clips {0, 1}: rank 1; captions 1 and 2 keep {1, 2} and miss
  # their clip: rank 4 + 1.
  np.testing.assert_array_equal(metrics.two_stage_t2a_ranks(full, glob, clip_of, 2), [1, 5, 5])
  # Shortlist 3: caption 0 keeps {0, 1, 3}: clip 2 (0.95) would beat the ground truth but is
  # not shortlisted: rank 1. Caption 1: clips 0 and 3 tie at global 0.2, the lower index (0)
  # is kept: {1, 2, 0}, clip 1 beats it: rank 2. Caption 2 keeps {1, 2, 3}: clip 1 ties the
  # ground truth's 0.5 (no penalty), clip 2 beats it: rank 2.
  np.testing.assert_array_equal(metrics.two_stage_t2a_ranks(full, glob, clip_of, 3), [1, 2, 2])
  # The whole corpus: the exhaustive ranks.
  np.testing.assert_array_equal(metrics.t2a_ranks(full, clip_of), [2, 3, 2])
  np.testing.assert_array_equal(metrics.two_stage_t2a_ranks(full, glob, clip_of, 4), [2, 3, 2])
  m = metrics.t2a_from_ranks(np.array([1, 5, 5]))
  assert m["R@1"] == pytest.approx(100 / 3) and m["R@5"] == pytest.approx(100.0)
  assert m["mAP@10"] == pytest.approx(100 * (1 + 0.2 + 0.2) / 3)


def test_split_metrics_adds_the_global_terms_ranking_and_two_stage_loss():
  full = np.array([[0.9, 0.2, 0.1],  # the example above
                   [0.5, 0.8, 0.5],
                   [0.95, 0.1, 0.7],
                   [0.3, 0.4, 0.5]])
  glob = np.array([[0.9, 0.2, 0.0],
                   [0.8, 0.9, 0.9],
                   [0.1, 0.8, 0.8],
                   [0.2, 0.2, 0.1]])
  m = evaluator.split_metrics(full, glob, np.array([0, 0, 3]), shortlists=(2,))
  # By the global cosine alone: caption 0 ranks clip 0 first; caption 1 has clips 1 and 2
  # above clip 0 (clip 3 ties it: no penalty), rank 3; caption 2 has clips 1, 2 above, rank 3.
  assert m["global/t2a/R@1"] == pytest.approx(100 / 3)
  assert m["global/t2a/mAP@10"] == pytest.approx(100 * (1 + 1 / 3 + 1 / 3) / 3)
  # Exhaustive ranks [2, 3, 2], two-stage at 2 [1, 5, 5]: R@1 0 -> 33.3 (the shortlist dropped
  # a clip that outscored the ground truth); R@5 keeps all three (rank 5 counts).
  assert m["t2a/R@1"] == 0.0 and m["two_stage@2/t2a/R@1"] == pytest.approx(100 / 3)
  assert m["two_stage@2/t2a/R@1/lost"] == pytest.approx(-100 / 3)
  assert m["two_stage@2/t2a/R@5/lost"] == 0.0


def test_dcase_csv(tmp_path):
  scores = np.array([[0.1, 0.7], [0.3, 0.2], [0.2, 0.9]])
  names = ["a, with comma.wav", "b.wav", "c.wav"]
  hade_eval.write_dcase_csv(tmp_path / "x.csv", scores, ["first caption", 'a "quoted" one'],
                            names, k=10)
  with open(tmp_path / "x.csv", newline="") as f:
    rows = list(csv.reader(f))
  assert rows == [["caption", "fname_1", "fname_2", "fname_3"],
                  ["first caption", "b.wav", "c.wav", "a, with comma.wav"],
                  ['a "quoted" one', "c.wav", "a, with comma.wav", "b.wav"]]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, minilm_dir) -> tuple[pathlib.Path, pathlib.Path]:
  """(workdir, data_dir): a tiny HADE trained for 2 steps on synthcaps tiny_16k."""
  from data_pipelines import builders

  data_dir = tmp_path_factory.mktemp("tfds")
  builders.prepare("synthcaps", "tiny_16k", data_dir=data_dir)
  workdir = tmp_path_factory.mktemp("wd")
  # total_steps 3, stopping after 2: the trainer writes checkpoints/2 and skips its own evals.
  config = tiny_config(data_dir, minilm_dir, total_steps=3, max_steps_per_run=2,
                       final_eval_split="", best_metric="")
  trainer.train_and_evaluate(config, workdir)
  return workdir, data_dir


def test_evaluate_a_checkpoint_on_caption_eval21(trained, shared_data, tmp_path):
  workdir, _ = trained
  csv_path = shared_data / "caption_eval21" / "caption_eval21.csv"
  out = tmp_path / "out"
  m = hade_eval.evaluate(checkpoint=workdir, csv_path=csv_path, out_dir=out, true_recall=True,
                         shortlists=(5, 21), save_scores=True)
  record = json.loads((out / "metrics.json").read_text())
  with open(csv_path, newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  assert record["clips"] == [r["file_name"] for r in rows]
  assert (record["num_clips"], record["num_captions"]) == (21, 105)
  assert record["tie_rule"] == metrics.TIE_RULE
  assert record["checkpoint"] == str(workdir / "checkpoints" / "2")
  assert record["metrics"] == pytest.approx(m)

  # The scores are the untiled score of the clips and captions as the user API embeds them.
  scores = np.load(out / "scores.npy")
  model, config, _ = api.load_model(workdir)
  user = api.Hade(model, config)
  texts = [" ".join(r[f"caption_{j}"].split()) for r in rows for j in range(1, 6)]
  want = retrieval.score_untiled(
      model, user.embed_audio([csv_path.parent / r["file_name"] for r in rows]),
      user.embed_text(texts))
  np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-5)

  # Metrics follow from the scores; a shortlist of the whole corpus loses nothing.
  clip_of = np.repeat(np.arange(21), 5)
  expected = metrics.retrieval_metrics(scores, clip_of, true_recall=True, intervals=True)
  assert {k: m[k] for k in expected} == pytest.approx(expected)
  for name in ("R@1", "R@5", "R@10", "mAP@10"):
    assert m[f"two_stage@21/t2a/{name}/lost"] == pytest.approx(0.0, abs=1e-9)
  assert 0 <= m["a2t/trueR@10"] <= m["a2t/R@10"]

  # The DCASE CSV: each caption's 10 best clips by score.
  with open(out / "dcase_top10.csv", newline="", encoding="utf-8") as f:
    top = list(csv.reader(f))
  assert top[0] == ["caption"] + [f"fname_{i}" for i in range(1, 11)]
  assert [r[0] for r in top[1:]] == texts
  for t, row in enumerate(top[1:]):
    assert row[1:] == [record["clips"][a] for a in np.argsort(-scores[:, t], kind="stable")[:10]]

  # The command line gives the same numbers, with other tiles.
  cli = hade_eval.main([f"--workdir={workdir}", f"--csv={csv_path}", f"--out={tmp_path / 'cli'}",
                        "--set", "eval_tile=7", "--true_recall"])
  assert {k: cli[k] for k in expected} == pytest.approx(expected, abs=1e-4)


def test_evaluate_prepared_split_matches_the_trainer(trained, minilm_dir):
  workdir, data_dir = trained
  model, config, _ = api.load_model(workdir)
  m = hade_eval.evaluate(checkpoint=workdir, split="test", intervals=False)
  split = hade_eval.prepared_split(config, model.cfg, "test")
  want = evaluator.RetrievalEvaluator(batch_size=8, tile=8).evaluate(model, split).metrics
  assert m == pytest.approx(want, abs=1e-4)
  # Weights and data in memory.
  again = hade_eval.evaluate(config, model=model, dataset=split, intervals=False)
  assert again == pytest.approx(want, abs=1e-4)
  assert isinstance(split, data.EvalSplit) and len(split.clip_names) == 6


def test_missing_csv_and_checkpoint_errors_name_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "nothing")):
    checkpoints.step_dir(tmp_path / "nothing")
  with pytest.raises(ValueError, match="no captions CSV at"):
    hade_eval.read_folder_clips(tmp_path / "captions.csv")


def test_summary_shows_the_global_cosine_and_two_stage_lines():
  full = np.array([[0.9, 0.2], [0.1, 0.8]])
  m = evaluator.split_metrics(full, full[::-1], np.array([0, 1]), shortlists=(1,))
  text = hade_eval.summary(m, shortlists=(1,))
  assert "global cosine alone, T2A R@1/5/10, mAP@10: 0.00 / 100.00 / 100.00 / 50.00" in text
  assert "two-stage T2A, shortlist 1: R@1 0.00 (lost 100.00)" in text
