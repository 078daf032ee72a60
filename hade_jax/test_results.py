"""The final test evaluation's files in a training workdir: their names, format and checks.

  test_ranks.json    per-query ranks (`metrics.query_ranks`): 't2a' the rank of each caption's
                     clip, 'a2t' each clip's ground-truth caption ranks; with 'caption_clip',
                     the clip names and, for a labels split, 'clip_group' (each clip's class
                     index), so that any per-query metric can be recomputed
                     (`metrics.per_query_from_ranks`) and queries resampled by the groups
                     they depend on (`query_groups`, hade_jax.ablate)
  test_metrics.json  the metrics of the best checkpoint on the test split

Both are written atomically, the ranks first: a `test_metrics.json` that exists means the run
finished its test evaluation and its ranks are complete (`read` verifies that they match).
Pure Python + numpy (no JAX): the ablation runner reads them.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np

from hade_jax import metrics

METRICS_FILE = "test_metrics.json"
RANKS_FILE = "test_ranks.json"


class IncompleteResultsError(ValueError):
  """A workdir's test files exist but are damaged or do not belong together."""


def _write_json(path: pathlib.Path, obj, indent: int | None = None) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(obj, indent=indent))
  os.replace(tmp, path)  # atomic: a kill never leaves half a file that looks finished


def write(workdir: str | os.PathLike, *, split: str, clips: Sequence[str],
          caption_clip: Sequence[int], values: Mapping[str, float], ranks: Mapping,
          clip_group: Sequence[int] | None = None) -> None:
  """Writes test_ranks.json, then test_metrics.json (the run's 'finished' mark)."""
  workdir = pathlib.Path(workdir)
  _write_json(workdir / RANKS_FILE, {
      "split": split, "tie_rule": metrics.TIE_RULE, "clips": list(clips),
      "caption_clip": [int(c) for c in caption_clip], "t2a": list(ranks["t2a"]),
      "a2t": list(ranks["a2t"]),
      "clip_group": None if clip_group is None else [int(g) for g in clip_group]})
  _write_json(workdir / METRICS_FILE, {
      "split": split, "clips": list(clips), "tie_rule": metrics.TIE_RULE,
      "metrics": dict(values), "ranks_file": RANKS_FILE}, indent=2)


def is_finished(workdir: str | os.PathLike) -> bool:
  return (pathlib.Path(workdir) / METRICS_FILE).is_file()


def read(workdir: str | os.PathLike) -> tuple[dict[str, float], dict]:
  """(metrics, ranks) of a finished run, checked to belong together.

  Raises:
    FileNotFoundError: the run has no test_metrics.json (it has not finished).
    IncompleteResultsError: a file is not valid JSON, the ranks file is missing, or the two
      disagree (split, clips, numbers of queries); the message names the file.
  """
  workdir = pathlib.Path(workdir)
  out = []
  for name in (METRICS_FILE, RANKS_FILE):
    path = workdir / name
    if name == RANKS_FILE and not path.is_file():
      raise IncompleteResultsError(
          f"{workdir / METRICS_FILE} has no {RANKS_FILE} beside it (written by an older "
          "hade_jax?): delete test_metrics.json and rerun the training command to re-evaluate")
    try:
      out.append(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
      raise IncompleteResultsError(f"{path} is not valid JSON ({e}): delete it and rerun the "
                                   "training command") from None
  summary, ranks = out
  problem = _mismatch(summary, ranks)
  if problem:
    raise IncompleteResultsError(f"{workdir / RANKS_FILE} {problem}: delete {METRICS_FILE} "
                                 "and rerun the training command to re-evaluate")
  return summary["metrics"], ranks


def query_groups(ranks: Mapping, direction: str) -> np.ndarray:
  """[Q] the group each query of a direction depends on, the unit a bootstrap resamples.

  Queries of one group are not independent: a clip's captions share their target, and in a
  labels split (`clip_group`) every caption of a class asks for the same clips, its templates
  repeated for each clip (identical queries). T2A queries are grouped by their clip's class,
  else by their clip; A2T queries (clips) by class, else each is its own.
  """
  caption_clip = np.asarray(ranks["caption_clip"], np.int64)
  group_A = ranks.get("clip_group")
  if direction == "t2a":
    return caption_clip if group_A is None else np.asarray(group_A, np.int64)[caption_clip]
  return np.arange(len(ranks["clips"])) if group_A is None else np.asarray(group_A, np.int64)


def _mismatch(summary: dict, ranks: dict) -> str:
  for key in ("split", "clips"):
    if summary.get(key) != ranks.get(key):
      return f"does not match {METRICS_FILE} in {key!r}"
  if len(ranks.get("t2a", ())) != len(ranks.get("caption_clip", ())):
    return "has a T2A rank count different from its caption count"
  if len(ranks.get("a2t", ())) != len(ranks["clips"]):
    return "has an A2T rank list count different from its clip count"
  if ranks.get("clip_group") is not None and len(ranks["clip_group"]) != len(ranks["clips"]):
    return "has a clip_group count different from its clip count"
  return ""
