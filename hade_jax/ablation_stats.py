"""Statistics and tables of a multi-seed ablation (`python -m hade_jax.ablate`). No JAX.

Per metric and variant: the mean and the sample standard deviation (ddof=1) of the runs'
test metrics over seeds.

Per metric and variant, the difference from the baseline variant with a paired bootstrap 95 %
interval over the test queries (T2A: captions, A2T: clips), resampled in groups:
  1. per seed s present in both variants, the per-query values of the variant and of the
     baseline (recomputed from the saved ranks, `metrics.per_query_from_ranks`), paired by
     query: d[s, q] = variant[s, q] - baseline[s, q];
  2. pooled over seeds by averaging: d[q] = mean_s d[s, q] (every seed evaluates the same
     test queries; this is checked);
  3. `num_samples` replicates, each drawing the query groups with replacement (numpy's PCG64
     with a fixed seed, so the same inputs give the same interval) and taking the mean of d
     over the queries of the groups drawn; a group is drawn for all seeds at once, which keeps
     the per-query correlation between seeds. The groups (`test_results.query_groups`) are
     the units queries depend on: T2A captions by their clip (by its class in a labels split,
     where a class's captions repeat for each of its clips), A2T clips by class or each alone;
     counting dependent queries as independent would narrow the interval falsely;
  4. the interval is the 2.5th and 97.5th percentile of the replicates; the estimate is the
     mean of d (= the difference of the variants' mean metrics over the paired seeds).
The interval measures how much the difference depends on which test queries were drawn, for
these trained models; how much it moves between seeds is the standard deviation column.
An interval that excludes 0 is printed in bold.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

from hade_jax import metrics, test_results

DEFAULT_METRICS = tuple(f"{d}/{m}" for d in ("t2a", "a2t")
                        for m in [f"R@{k}" for k in metrics.KS] + ["mAP@10"])
NUM_SAMPLES = 2000
LEVEL = 0.95
_CHUNK = 256  # bootstrap replicates drawn at once (bounded memory: chunk x queries indices)


@dataclasses.dataclass(frozen=True)
class Interval:
  """A difference (variant - baseline) and its bootstrap interval."""

  estimate: float
  low: float
  high: float

  @property
  def excludes_zero(self) -> bool:
    return self.low > 0 or self.high < 0


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """(mean, sample standard deviation with ddof=1; NaN for fewer than 2 values)."""
  x = np.asarray(values, np.float64)
  if not len(x):
    return math.nan, math.nan
  return float(x.mean()), (float(x.std(ddof=1)) if len(x) > 1 else math.nan)


def bootstrap_difference(variant_SxQ: np.ndarray, baseline_SxQ: np.ndarray, *,
                         paired: bool = True, num_samples: int = NUM_SAMPLES, seed: int = 0,
                         level: float = LEVEL, groups_Q: np.ndarray | None = None) -> Interval:
  """mean(variant) - mean(baseline) with a percentile bootstrap interval over the queries.

  Args:
    variant_SxQ, baseline_SxQ: per-query values, one row per seed, the same queries in the
      same order in every row of both.
    paired: resample queries once for both (the module docstring's procedure); False resamples
      the variant's and the baseline's queries independently (ignores the pairing: wider when
      the two are correlated, as per-query retrieval results are).
    num_samples, seed, level: replicates, numpy seed, interval coverage.
    groups_Q: the group of each query (`test_results.query_groups`): whole groups are
      resampled (a cluster bootstrap: a replicate's difference is the mean over the queries of
      the groups drawn), so queries that depend on each other are not counted as independent
      evidence. None: every query its own group.
  """
  v_SxQ = np.atleast_2d(np.asarray(variant_SxQ, np.float64))
  b_SxQ = np.atleast_2d(np.asarray(baseline_SxQ, np.float64))
  if v_SxQ.shape != b_SxQ.shape or not v_SxQ.size:
    raise ValueError(f"per-query values of shapes {v_SxQ.shape} and {b_SxQ.shape}: expected "
                     "the same seeds and queries, at least one")
  v_Q, b_Q = v_SxQ.mean(0), b_SxQ.mean(0)
  groups_Q = np.arange(len(v_Q)) if groups_Q is None else np.asarray(groups_Q)
  if groups_Q.shape != v_Q.shape:
    raise ValueError(f"{groups_Q.shape} query groups for {v_Q.shape} queries")
  _, group_Q = np.unique(groups_Q, return_inverse=True)
  count_G = np.bincount(group_Q).astype(np.float64)
  v_G, b_G = np.bincount(group_Q, v_Q), np.bincount(group_Q, b_Q)  # per-group sums
  rng = np.random.default_rng(seed)
  g = len(count_G)

  def mean(sum_G, idx_BxG):
    return sum_G[idx_BxG].sum(1) / count_G[idx_BxG].sum(1)

  reps = []
  for start in range(0, num_samples, _CHUNK):
    n = min(_CHUNK, num_samples - start)
    idx_BxG = rng.integers(0, g, (n, g))
    if paired:
      reps.append(mean(v_G - b_G, idx_BxG))
    else:
      reps.append(mean(v_G, idx_BxG) - mean(b_G, rng.integers(0, g, (n, g))))
  reps_B = np.concatenate(reps)
  tail = 100 * (1 - level) / 2
  low, high = np.percentile(reps_B, [tail, 100 - tail])
  return Interval(float(v_Q.mean() - b_Q.mean()), float(low), float(high))


def per_query(ranks: Mapping, metric: str) -> np.ndarray | None:
  """Per-query values of a metric ('t2a/R@1', 'a2t/mAP@10', ...) from a run's saved ranks;
  None for a metric without per-query values (e.g. two-stage or zero-shot metrics)."""
  direction, _, name = metric.partition("/")
  if direction not in ("t2a", "a2t"):
    return None
  values = metrics.per_query_from_ranks(ranks, true_recall=name.startswith("trueR@"))
  return values[direction].get(name)


def _same_queries(ranks: Sequence[Mapping]) -> bool:
  first = ranks[0]
  return all(r["clips"] == first["clips"] and r["caption_clip"] == first["caption_clip"]
             for r in ranks[1:])


def summarize(runs: Sequence[Mapping], ranks: Mapping[tuple[str, int], Mapping], *,
              baseline: str, metric_names: Sequence[str] = DEFAULT_METRICS,
              num_samples: int = NUM_SAMPLES, seed: int = 0) -> dict:
  """Mean ± std per variant and metric, and paired bootstrap differences from `baseline`.

  Args:
    runs: finished runs, each {'variant', 'seed', 'metrics': {name: value}, 'wall_s'}.
    ranks: the saved test ranks (`test_results.read`) of each (variant, seed).
    baseline: the variant the differences are taken from.

  Returns:
    {'variants': [...], 'metrics': [...], 'baseline', 'num_samples', 'seed',
     'stats': {variant: {metric: {'mean', 'std', 'n'}}},
     'differences': {variant: {metric: {'estimate', 'low', 'high', 'seeds'} or None}}}

  Raises:
    ValueError: runs to be paired were evaluated on different test queries.
  """
  variants = list(dict.fromkeys(r["variant"] for r in runs))
  if len(ranks) and not _same_queries(list(ranks.values())):
    raise ValueError("the runs were evaluated on different test clips or captions: the paired "
                     "bootstrap needs the same test split in every run (same config data)")
  stats, diffs = {}, {}
  for v in variants:
    mine = [r for r in runs if r["variant"] == v]
    stats[v] = {}
    for m in [*metric_names, "wall_s"]:
      values = [r["metrics"][m] if m != "wall_s" else r["wall_s"] for r in mine
                if m == "wall_s" or m in r["metrics"]]
      mean, std = mean_std(values)
      stats[v][m] = {"mean": mean, "std": std, "n": len(values)}
    diffs[v] = {m: _difference(v, baseline, m, runs, ranks, num_samples, seed)
                for m in metric_names}
  return {"variants": variants, "metrics": list(metric_names), "baseline": baseline,
          "num_samples": num_samples, "seed": seed, "level": LEVEL, "stats": stats,
          "differences": diffs}


def _difference(variant: str, baseline: str, metric: str, runs, ranks, num_samples: int,
                seed: int) -> dict | None:
  seeds = sorted({r["seed"] for r in runs if r["variant"] == variant}
                 & {r["seed"] for r in runs if r["variant"] == baseline})
  if variant == baseline or not seeds:
    return None
  rows = [[per_query(ranks[(v, s)], metric) for s in seeds] for v in (variant, baseline)]
  if any(x is None for row in rows for x in row):
    return None
  groups = test_results.query_groups(ranks[(baseline, seeds[0])], metric.partition("/")[0])
  interval = bootstrap_difference(np.stack(rows[0]), np.stack(rows[1]),
                                  num_samples=num_samples, seed=seed, groups_Q=groups)
  return dataclasses.asdict(interval) | {"seeds": seeds}


# ---------------------------------------------------------------------------------------------
# Markdown.


def _cell(stat: Mapping) -> str:
  if stat["n"] == 0:
    return "-"
  if stat["n"] == 1:
    return f"{stat['mean']:.2f}"
  return f"{stat['mean']:.2f} ± {stat['std']:.2f}"


def _diff_cell(d: Mapping | None) -> str:
  if d is None:
    return "-"
  text = f"{d['estimate']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]"
  return f"**{text}**" if d["low"] > 0 or d["high"] < 0 else text


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def render_markdown(summary: Mapping, *, title: str = "Ablation") -> str:
  """Two tables: mean ± std per variant (and its seeds, wall time), then the differences from
  the baseline with their paired bootstrap intervals."""
  names = summary["metrics"]
  stats, diffs, base = summary["stats"], summary["differences"], summary["baseline"]
  rows = [[f"`{v}`", str(stats[v]["wall_s"]["n"]), *[_cell(stats[v][m]) for m in names],
           f"{stats[v]['wall_s']['mean'] / 60:.1f}"] for v in summary["variants"]]
  out = [f"## {title}\n", "Test metrics (`val/...`: validation, of the checkpoint the test "
         "evaluated) in percent, mean ± standard deviation over seeds (ddof=1):\n",
         _table(["variant", "seeds", *names, "wall (min)"], rows)]
  others = [v for v in summary["variants"] if v != base]
  if others:
    pct = round(100 * summary["level"])
    out += [f"\nDifference from `{base}` (points), with a paired bootstrap {pct} % interval "
            f"over the test queries, resampled by dependent groups ({summary['num_samples']} "
            "replicates of a cluster bootstrap, seed "
            f"{summary['seed']}; bold: the interval excludes 0):\n",
            _table(["variant", *names], [[f"`{v}`", *[_diff_cell(diffs[v][m]) for m in names]]
                                         for v in others])]
  return "\n".join(out)
