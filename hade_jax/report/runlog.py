"""What a training workdir logged: metrics.jsonl series and test_metrics.json, with intervals.

Pure Python and numpy (no JAX): the report reads these even where no model can be loaded.
The names are the trainer's (`trainer.MetricWriter`): 'train/loss*', 'train/lr/<group>',
'val/<direction>/R@k', 'test/...'; test_metrics.json is `{split, clips, tie_rule, metrics}`
(+ per-query ranks where the evaluation saved them).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
from collections.abc import Mapping

import numpy as np

from hade_jax import metrics

log = logging.getLogger("hade_jax.report")

METRICS_FILE = "metrics.jsonl"
TEST_FILE = "test_metrics.json"
DIRECTIONS = ("t2a", "a2t")
BOOTSTRAP_SAMPLES = 1000
BOOTSTRAP_SEED = 0  # the same workdir always gives the same intervals


@dataclasses.dataclass
class Series:
  """Per-metric (steps, values) read from metrics.jsonl."""

  values: dict[str, tuple[np.ndarray, np.ndarray]]
  skipped_lines: int  # torn or malformed lines (a killed run's last line)

  def matching(self, predicate) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {k: v for k, v in sorted(self.values.items()) if predicate(k)}

  def losses(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return self.matching(lambda k: k.startswith("train/loss"))

  def learning_rates(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return self.matching(lambda k: k.startswith("train/lr/"))

  def validation_recalls(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return self.matching(lambda k: k.startswith("val/") and k.rsplit("/", 1)[-1] in
                         {f"R@{k}" for k in metrics.KS})


def read_series(workdir: pathlib.Path) -> Series | None:
  """The metrics.jsonl of `workdir` as series (None: the file does not exist)."""
  path = workdir / METRICS_FILE
  if not path.is_file():
    return None
  points: dict[str, list[tuple[int, float]]] = {}
  skipped = 0
  for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
    if not line.strip():
      continue
    try:
      entry = json.loads(line)
      step = int(entry.pop("step"))
    except (ValueError, KeyError, TypeError, AttributeError):
      skipped += 1
      continue
    for name, value in entry.items():
      if isinstance(value, int | float) and math.isfinite(value):
        points.setdefault(name, []).append((step, float(value)))
  if skipped:
    log.warning("%s: %d unreadable lines skipped", path, skipped)
  series = {}
  for name, pairs in points.items():
    # A resumed run may repeat a step: the later line wins (MetricWriter's supersede rule).
    last = dict(pairs)
    steps = np.array(sorted(last), np.int64)
    series[name] = (steps, np.array([last[s] for s in steps], np.float64))
  return Series(series, skipped)


def validation_at(workdir: pathlib.Path, step: int) -> dict[str, float]:
  """The validation metrics ('val/...') logged at `step` ({} when none were)."""
  series = read_series(workdir)
  if series is None:
    return {}
  out = {}
  for name, (steps, values) in series.matching(lambda k: k.startswith("val/")).items():
    at = np.flatnonzero(steps == step)
    if len(at):
      out[name] = float(values[at[-1]])
  return out


# ---------------------------------------------------------------------------------------------
# Test metrics and their intervals.


@dataclasses.dataclass
class TestTable:
  """The test metrics as rows of (direction, metric, value, low, high) plus how the interval
  was obtained ('saved' jackknife half-widths, 'bootstrap' over queries, or 'none')."""

  split: str
  rows: list[dict]
  interval_kind: str
  note: str


def read_test(workdir: pathlib.Path) -> dict | None:
  path = workdir / TEST_FILE
  if not path.is_file():
    return None
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except ValueError as e:
    raise ValueError(f"{path} is not valid JSON ({e}); rerun the evaluation "
                     "(python -m hade_jax.eval --workdir=...)") from None


def per_query_ranks(test: Mapping) -> dict[str, np.ndarray]:
  """The per-query ranks a test_metrics.json holds, by direction ({} when it holds none).

  Accepts ranks under any key holding 'rank' whose path names the direction ('t2a'/'a2t'),
  e.g. {'ranks': {'t2a': [...]}} or {'per_query': {'a2t/rank': [...]}}; a 2-D A2T array (every
  ground-truth caption's rank per clip) counts its best caption, as A2T R@k does.
  """
  found: dict[str, np.ndarray] = {}

  def visit(node, path: str):
    if isinstance(node, Mapping):
      for key, value in node.items():
        if key != "metrics":  # the summary numbers, not per query
          visit(value, f"{path}/{key}")
      return
    if not (isinstance(node, list) and node and "rank" in path):
      return
    for direction in DIRECTIONS:
      if direction in path and direction not in found:
        try:
          ranks = np.asarray(node, np.float64)
        except (TypeError, ValueError):
          return
        found[direction] = ranks.min(axis=1) if ranks.ndim == 2 else ranks.reshape(-1)

  visit(test, "")
  return found


def bootstrap_ci(values_Q: np.ndarray, samples: int = BOOTSTRAP_SAMPLES,
                 seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
  """Percentile 95 % bootstrap interval of the mean of per-query values."""
  rng = np.random.default_rng(seed)
  n = len(values_Q)
  means_B = values_Q[rng.integers(0, n, size=(samples, n))].mean(axis=1)
  low, high = np.percentile(means_B, [2.5, 97.5])
  return float(low), float(high)


def test_table(test: Mapping) -> TestTable:
  """The rows of the test metrics with the best interval the file allows."""
  m = test.get("metrics", {})
  names = [f"R@{k}" for k in metrics.KS] + ["mAP@10", "median_rank", "mean_rank"]
  has_saved = any(k.endswith("/ci95") for k in m)
  ranks = per_query_ranks(test) if not has_saved else {}
  rows = []
  for direction in DIRECTIONS:
    for name in names:
      value = m.get(f"{direction}/{name}")
      if value is None:
        continue
      low = high = None
      ci = m.get(f"{direction}/{name}/ci95")
      if ci is not None and math.isfinite(ci):
        low, high = value - ci, value + ci
      elif direction in ranks and name.startswith("R@"):
        k = int(name[2:])
        low, high = bootstrap_ci(100.0 * (ranks[direction] <= k))
      elif direction == "t2a" and direction in ranks and name == "mAP@10":
        r = ranks[direction]
        low, high = bootstrap_ci(100.0 * np.where(r <= 10, 1.0 / r, 0.0))
      rows.append({"direction": direction.upper(), "metric": name, "value": value,
                   "low": low, "high": high})
  if has_saved:
    kind, note = "saved", ("95 % intervals: the jackknife (leave-one-query-out) half-widths "
                           "saved with the metrics.")
  elif ranks:
    kind, note = "bootstrap", (
        f"95 % intervals: percentile bootstrap over the queries ({BOOTSTRAP_SAMPLES} "
        f"resamples, seed {BOOTSTRAP_SEED}) from the per-query ranks in {TEST_FILE}; "
        "R@k (both directions) and T2A mAP@10 only.")
  else:
    kind, note = "none", (
        f"{TEST_FILE} holds neither intervals nor per-query ranks: the values are shown "
        "without intervals (python -m hade_jax.eval --workdir=... computes jackknife "
        "intervals into its own metrics.json).")
  return TestTable(str(test.get("split", "test")), rows, kind, note)
