"""Retrieval metrics against hand-computed cases (docs/method.md section 8)."""

import numpy as np
import pytest

from hade_jax import metrics


def test_two_clips_with_a_tie_hand_computed():
  # captions 0,1 describe clip 0; captions 2,3 describe clip 1.
  scores = np.array([[0.9, 0.2, 0.5, 0.1],
                     [0.3, 0.4, 0.6, 0.1]])
  clip_of = np.array([0, 0, 1, 1])
  m = metrics.retrieval_metrics(scores, clip_of, true_recall=True)
  # T2A ranks: 1, 2, 1, 1 (caption 3 ties 0.1 vs 0.1: the tie favours the ground truth).
  assert m["t2a/R@1"] == pytest.approx(75.0)
  assert m["t2a/R@5"] == pytest.approx(100.0)
  assert m["t2a/mAP@10"] == pytest.approx(100 * (1 + 0.5 + 1 + 1) / 4)
  assert m["t2a/median_rank"] == 1.0 and m["t2a/mean_rank"] == pytest.approx(1.25)
  # A2T: clip 0 ground-truth ranks 1 and 3 -> AP (1/1 + 2/3)/2; clip 1 ranks 1 and 4.
  assert m["a2t/R@1"] == pytest.approx(100.0)
  assert m["a2t/mAP@10"] == pytest.approx(100 * ((1 + 2 / 3) / 2 + (1 + 2 / 4) / 2) / 2)
  assert m["a2t/trueR@1"] == pytest.approx(50.0)
  assert m["a2t/trueR@5"] == pytest.approx(100.0)


def test_five_captions_per_clip_hand_computed():
  # 3 clips x 5 captions; captions 5c..5c+4 describe clip c. Non-ground-truth scores are 0.5.
  scores = np.full((3, 15), 0.5)
  scores[0, 0:5] = [0.9, 0.8, 0.1, 0.05, 0.0]   # ranks 1, 2, 13, 14, 15
  scores[1, 5:10] = [0.6, 0.4, 0.4, 0.4, 0.4]   # ranks 1, 12, 13, 14, 15
  scores[2, 10:15] = [0.5, 0.5, 0.5, 0.5, 0.5]  # all tie with the 10 others: ranks 1..5
  clip_of = np.repeat(np.arange(3), 5)
  ranks, valid = metrics.a2t_gt_ranks(scores, clip_of)
  np.testing.assert_array_equal(ranks, [[1, 2, 13, 14, 15], [1, 12, 13, 14, 15], [1, 2, 3, 4, 5]])
  assert valid.all()
  m = metrics.retrieval_metrics(scores, clip_of, true_recall=True)
  ap = [(1 + 1) / 5, 1 / 5, 5 / 5]
  assert m["a2t/mAP@10"] == pytest.approx(100 * np.mean(ap))
  assert m["a2t/R@1"] == pytest.approx(100.0)
  assert m["a2t/trueR@5"] == pytest.approx(100 * np.mean([2 / 5, 1 / 5, 5 / 5]))
  # T2A: caption 2 of clip 0 scores 0.1 there but 0.5 on clips 1 and 2 -> rank 3.
  t2a = metrics.t2a_ranks(scores, clip_of)
  np.testing.assert_array_equal(t2a, [1, 1, 3, 3, 3, 1, 3, 3, 3, 3, 1, 1, 1, 1, 1])
  assert m["t2a/R@1"] == pytest.approx(100 * 8 / 15)
  assert m["t2a/mAP@10"] == pytest.approx(100 * (8 + 7 / 3) / 15)


def test_matches_sort_based_ranks_without_ties():
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(20, 100))
  clip_of = np.repeat(np.arange(20), 5)
  order = np.argsort(-scores, axis=0)  # clips sorted per caption
  want_t2a = np.array([1 + np.where(order[:, t] == clip_of[t])[0][0] for t in range(100)])
  np.testing.assert_array_equal(metrics.t2a_ranks(scores, clip_of), want_t2a)
  ranks, _ = metrics.a2t_gt_ranks(scores, clip_of)
  for a in range(20):
    order_a = np.argsort(-scores[a])
    pos = sorted(1 + np.where(np.isin(order_a, np.where(clip_of == a)[0]))[0])
    np.testing.assert_array_equal(ranks[a], pos)


def test_jackknife_mean_matches_explicit_leave_one_out():
  rng = np.random.default_rng(1)
  v = rng.normal(size=50)
  loo = np.array([np.delete(v, i).mean() for i in range(50)])
  want = 1.96 * np.sqrt(49 / 50 * np.sum((loo - loo.mean()) ** 2))
  assert metrics.jackknife_ci95(v) == pytest.approx(want)
  assert metrics.jackknife_ci95(np.ones(10)) == 0.0
  m = metrics.retrieval_metrics(rng.normal(size=(4, 8)), np.repeat(np.arange(4), 2),
                                intervals=True)
  assert m["t2a/R@1/ci95"] >= 0 and "a2t/median_rank/ci95" in m
  assert "T2A" in metrics.format_table(m)
