"""Multi-seed ablations: the statistics against hand computations, the tables, and one tiny
end-to-end ablation (2 variants x 2 seeds) that is rerun to show it skips and resumes."""

import json
import math
import pathlib

import numpy as np
import pytest

from hade_jax import ablate, ablation_stats, checkpoints, metrics, test_results
from hade_jax.report import runlog


def test_mean_std_is_the_sample_standard_deviation():
  assert ablation_stats.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
  mean, std = ablation_stats.mean_std([5.0])
  assert mean == 5.0 and math.isnan(std)


def test_paired_bootstrap_of_two_queries_hand_computed():
  # d = [0, 2]: a replicate's mean is 0, 1 or 2 with probabilities 1/4, 1/2, 1/4, so the 2.5th
  # and 97.5th percentiles of many replicates are 0 and 2; the estimate is the mean, 1.
  got = ablation_stats.bootstrap_difference([[3.0, 5.0]], [[3.0, 3.0]], num_samples=4000)
  assert (got.estimate, got.low, got.high) == (1.0, 0.0, 2.0)


def test_bootstrap_interval_contains_the_true_difference_and_pairing_narrows_it():
  # 400 queries of varying difficulty u, the same in both seeds; the variant finds a query
  # when u < 0.5, the baseline when u < 0.4 (+ seed noise): a true difference of 10 points.
  rng = np.random.default_rng(1)
  u_Q = rng.uniform(size=400)
  noise_SxQ = rng.normal(0, 0.05, (2, 400))
  variant_SxQ = 100.0 * (u_Q + noise_SxQ < 0.5)
  baseline_SxQ = 100.0 * (u_Q + noise_SxQ < 0.4)
  paired = ablation_stats.bootstrap_difference(variant_SxQ, baseline_SxQ, seed=3)
  unpaired = ablation_stats.bootstrap_difference(variant_SxQ, baseline_SxQ, paired=False, seed=3)
  assert paired.estimate == pytest.approx(variant_SxQ.mean() - baseline_SxQ.mean())
  assert paired.low < 10.0 < paired.high and paired.excludes_zero
  assert unpaired.low < 10.0 < unpaired.high
  # Per-query results of the two are correlated: ignoring the pairing widens the interval.
  assert paired.high - paired.low < 0.6 * (unpaired.high - unpaired.low)
  # A constant per-query difference has no query-sampling uncertainty when paired.
  same = ablation_stats.bootstrap_difference(baseline_SxQ + 2.0, baseline_SxQ)
  assert (same.estimate, same.low, same.high) == (2.0, 2.0, 2.0)


def test_cluster_bootstrap_counts_a_group_of_identical_queries_once():
  # 30 distinct queries, each repeated 5 times (as ESC-50's template captions repeat for every
  # clip of a class): resampling the groups gives exactly the interval of the 30 distinct
  # queries, and a per-query bootstrap that treats the 150 as independent is narrower.
  rng = np.random.default_rng(2)
  v_Q, b_Q = 100.0 * (rng.uniform(size=(2, 30)) < [[0.6], [0.4]])
  groups_Q = np.repeat(np.arange(30), 5)
  distinct = ablation_stats.bootstrap_difference([v_Q], [b_Q], seed=4)
  clustered = ablation_stats.bootstrap_difference([v_Q[groups_Q]], [b_Q[groups_Q]], seed=4,
                                                  groups_Q=groups_Q)
  assert (clustered.estimate, clustered.low, clustered.high) == pytest.approx(
      (distinct.estimate, distinct.low, distinct.high))
  naive = ablation_stats.bootstrap_difference([v_Q[groups_Q]], [b_Q[groups_Q]], seed=4)
  assert naive.high - naive.low < 0.6 * (clustered.high - clustered.low)
  with pytest.raises(ValueError, match="query groups"):
    ablation_stats.bootstrap_difference([v_Q], [b_Q], groups_Q=groups_Q)


def test_query_groups_are_clips_or_classes():
  ranks = {"clips": ["a", "b", "c"], "caption_clip": [0, 0, 1, 2, 2]}
  assert test_results.query_groups(ranks, "t2a").tolist() == [0, 0, 1, 2, 2]
  assert test_results.query_groups(ranks, "a2t").tolist() == [0, 1, 2]
  labelled = ranks | {"clip_group": [7, 3, 7]}  # clips a and c share class 7
  assert test_results.query_groups(labelled, "t2a").tolist() == [7, 7, 3, 7, 7]
  assert test_results.query_groups(labelled, "a2t").tolist() == [7, 3, 7]


def test_bootstrap_is_deterministic_given_its_seed():
  rng = np.random.default_rng(0)
  a_SxQ, b_SxQ = rng.normal(size=(2, 3, 50))
  first = ablation_stats.bootstrap_difference(a_SxQ, b_SxQ, seed=7)
  assert ablation_stats.bootstrap_difference(a_SxQ, b_SxQ, seed=7) == first
  assert ablation_stats.bootstrap_difference(a_SxQ, b_SxQ, seed=8) != first


def test_per_query_metrics_from_saved_ranks_hand_computed():
  # Clip 0 has captions 0, 1, 2; clip 1 has caption 3 only.
  scores = np.array([[0.9, 0.1, 0.5, 0.8],
                     [0.2, 0.3, 0.6, 0.7]])
  clip_of = np.array([0, 0, 0, 1])
  saved = json.loads(json.dumps(metrics.query_ranks(scores, clip_of)))
  assert saved == {"t2a": [1, 2, 2, 2], "a2t": [[1, 3, 4], [1]]}
  per = metrics.per_query_from_ranks(saved)
  np.testing.assert_allclose(per["t2a"]["mAP@10"], [100, 50, 50, 50])
  # A2T AP of clip 0: (1/1 + 2/3 + 3/4) / 3; clip 1: 1/1.
  np.testing.assert_allclose(per["a2t"]["mAP@10"], [100 * (1 + 2 / 3 + 3 / 4) / 3, 100])
  assert ablation_stats.per_query(saved, "a2t/R@1").tolist() == [100.0, 100.0]
  assert ablation_stats.per_query(saved, "two_stage@50/t2a/R@1/lost") is None


def _ranks(t2a):
  return {"clips": ["a", "b"], "caption_clip": [0, 0, 1, 1], "t2a": t2a, "a2t": [[1, 2], [1, 2]]}


def test_summary_and_markdown_tables():
  runs = [{"variant": "global", "seed": 0, "metrics": {"t2a/R@1": 50.0}, "wall_s": 60.0},
          {"variant": "global", "seed": 1, "metrics": {"t2a/R@1": 25.0}, "wall_s": 120.0},
          {"variant": "full", "seed": 0, "metrics": {"t2a/R@1": 100.0}, "wall_s": 60.0},
          {"variant": "full", "seed": 1, "metrics": {"t2a/R@1": 100.0}, "wall_s": 60.0}]
  ranks = {("global", 0): _ranks([1, 2, 1, 2]), ("global", 1): _ranks([2, 2, 1, 2]),
           ("full", 0): _ranks([1, 1, 1, 1]), ("full", 1): _ranks([1, 1, 1, 1])}
  summary = ablation_stats.summarize(runs, ranks, baseline="global", metric_names=["t2a/R@1"],
                                     num_samples=500)
  assert summary["stats"]["global"]["t2a/R@1"] == pytest.approx(
      {"mean": 37.5, "std": math.sqrt(2 * 12.5 ** 2), "n": 2})
  diff = summary["differences"]["full"]["t2a/R@1"]
  assert diff["estimate"] == pytest.approx(62.5) and diff["seeds"] == [0, 1]
  assert summary["differences"]["global"]["t2a/R@1"] is None
  text = ablation_stats.render_markdown(summary, title="T")
  assert "| `global` | 2 | 37.50 ± 17.68 | 1.5 |" in text
  assert "| `full` | 2 | 100.00 ± 0.00 | 1.0 |" in text
  assert f"| `full` | **+62.50 [{diff['low']:+.2f}, {diff['high']:+.2f}]** |" in text
  with pytest.raises(ValueError, match="different test clips"):
    ablation_stats.summarize(runs, ranks | {("full", 1): {**_ranks([1] * 4), "clips": ["a"]}},
                             baseline="global")


@pytest.fixture(scope="module")
def ablation(tiny_data, minilm_dir, tmp_path_factory):
  """A finished tiny ablation (global, full) x seeds (0, 1), 1 training step each."""
  workdir = tmp_path_factory.mktemp("ablation")
  argv = ["--config=tests/tiny_train_config.py", f"--workdir={workdir}",
          "--variants=global,full", "--seeds=0,1", "--bootstrap_samples=200",
          "--config.total_steps=1", f"--config.data.data_dir={tiny_data}",
          f"--config.data.tokenizer_dir={minilm_dir}"]
  ablate.main(argv)
  return workdir, argv


def _records(workdir):
  return json.loads((workdir / ablate.RESULTS_JSON).read_text())


def test_ablation_runs_every_variant_and_seed_and_writes_the_tables(ablation):
  workdir, _ = ablation
  results = _records(workdir)
  assert [(r["variant"], r["seed"], r["status"]) for r in results["runs"]] == [
      ("global", 0, "finished"), ("global", 1, "finished"), ("full", 0, "finished"),
      ("full", 1, "finished")]
  for r in results["runs"]:
    saved, ranks = test_results.read(r["workdir"])
    test_part = {k: v for k, v in r["metrics"].items() if not k.startswith("val/")}
    assert test_part == saved and r["attempts"] == 1 and r["wall_s"] > 0
    # The validation metrics of the checkpoint the test evaluated come along (for choosing).
    best = int(checkpoints.step_dir(r["workdir"], "best").name)
    val = {k: v for k, v in r["metrics"].items() if k.startswith("val/")}
    assert val and val == runlog.validation_at(pathlib.Path(r["workdir"]), best)
    # The summary's metrics are the means of the saved per-query ranks.
    assert saved["t2a/R@5"] == pytest.approx(ablation_stats.per_query(ranks, "t2a/R@5").mean())
    saved_config = json.loads((workdir / r["variant"]).joinpath(
        f"seed_{r['seed']}", ablate.RUN_RECORD).read_text())["command"]
    assert f"--config.seed={r['seed']}" in saved_config
  assert results["summary"]["differences"]["full"]["t2a/R@1"]["seeds"] == [0, 1]
  table = (workdir / ablate.RESULTS_MD).read_text()
  assert "| `global` | 2 |" in table and "Difference from `global`" in table


def test_ablation_rerun_skips_finished_runs_and_resumes_unfinished_ones(ablation):
  workdir, argv = ablation
  before = _records(workdir)["runs"]
  unfinished = workdir / "full" / "seed_1"
  (unfinished / test_results.METRICS_FILE).unlink()  # as if killed before its test evaluation
  ablate.main(argv)
  after = _records(workdir)["runs"]
  assert [r["attempts"] for r in after] == [1, 1, 1, 2]
  # The resumed run continued from its last checkpoint (step 1 of 1): the same test results.
  assert [r["metrics"] for r in after] == [r["metrics"] for r in before]
  last_attempt = (unfinished / ablate.RUN_LOG).read_text().split("\n=== ")[-1]
  assert "resumed from" in last_attempt and "at step 1" in last_attempt
