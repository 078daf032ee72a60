"""Retrieval metrics as the audio-text retrieval community reports them (docs/method.md section 8).

Pure numpy. Inputs: a score matrix `scores_AxT` (clips x captions, higher = better) and, for
every caption, the index of its clip (`caption_clip_T`).

Tie rule: rank = 1 + the number of STRICTLY greater scores among the candidates that are not
ground truth (ties resolve in favour of the ground truth; several ground-truth captions of one
clip never push each other down). AudioCaps' test set has identical captions on different
clips, so ties do occur; this rule is stated in every result.

Text-to-audio (T2A): each caption queries all clips; one ground-truth clip.
  R@k = fraction of captions whose clip ranks <= k; mAP@10 = mean of 1/rank if rank <= 10.
Audio-to-text (A2T): each clip queries all captions; its ground truth is its captions.
  R@k uses the best-ranked ground-truth caption; mAP@10 = sum_j (j / rank_j) over the
  ground-truth captions ranked <= 10 (j = 1, 2, ... in rank order), divided by the number of
  ground-truth captions (5 on Clotho and AudioCaps). "True recall" (DCASE 2023) counts the
  found fraction of the ground-truth captions in the top k.
Class-level T2A (a labels folder, `clip_group_A`): every clip of the caption's class is
  ground truth, and T2A uses A2T's formulas with clips as the candidates: R@k by the
  best-ranked relevant clip, mAP@10 = sum_j (j / rank_j) over relevant clips ranked <= 10,
  divided by the number of relevant clips. With one clip per group this is per-clip T2A.
  (The per-clip rule would cap R@1 at 1 / clips-per-class, as the captions of a class are
  identical.) A2T stays per-clip: identical captions of other clips tie with the clip's own,
  and ties favour the ground truth.
"""

from __future__ import annotations

import dataclasses

import numpy as np

TIE_RULE = ("rank = 1 + number of non-ground-truth candidates with a strictly greater score "
            "(ties favour the ground truth)")
KS = (1, 5, 10)
_SHOW = 5  # ids named in a non-finite error


class NonFiniteScoresError(ValueError):
  """Scores (or the embeddings they come from) hold NaN or Inf.

  A NaN compares false with everything, so under `TIE_RULE` it would rank first and count as
  a hit: such scores are refused instead of measured.
  """


def _first(ids, rows: np.ndarray) -> str:
  shown = [str(ids[i]) if ids is not None else str(int(i)) for i in rows[:_SHOW]]
  return ", ".join(shown) + (", ..." if len(rows) > _SHOW else "")


def check_finite_scores(scores_AxT: np.ndarray, clip_ids=None, caption_ids=None) -> None:
  """Raises NonFiniteScoresError naming the clips and captions whose scores are not finite.

  Args:
    scores_AxT: clips x captions.
    clip_ids, caption_ids: names shown in the message (default: row / column indices).
  """
  bad_AxT = ~np.isfinite(np.asarray(scores_AxT, np.float64))
  if not bad_AxT.any():
    return
  rows, cols = np.flatnonzero(bad_AxT.any(1)), np.flatnonzero(bad_AxT.any(0))
  raise NonFiniteScoresError(
      f"{int(bad_AxT.sum())} of {bad_AxT.size} scores are NaN or Inf: {len(rows)} clips "
      f"(first: {_first(clip_ids, rows)}) and {len(cols)} captions (first: "
      f"{_first(caption_ids, cols)}). Metrics of such scores would count them as hits; check "
      "the checkpoint (a damaged or diverged model) and the input audio.")


def check_finite_embeddings(features, ids, kind: str) -> None:
  """Raises NonFiniteScoresError naming the items (`ids`, one per row) whose features of any
  leaf (a dataclass of arrays with rows first, or one array) hold NaN or Inf."""
  leaves = ([getattr(features, f.name) for f in dataclasses.fields(features)]
            if dataclasses.is_dataclass(features) else [features])
  bad = np.zeros(len(ids), bool)
  for leaf in leaves:
    for x in (leaf if isinstance(leaf, tuple | list) else [leaf]):
      if x is not None and np.issubdtype(np.asarray(x).dtype, np.floating):
        x = np.asarray(x)
        bad |= ~np.isfinite(x.reshape(len(x), -1)).all(1)
  if bad.any():
    rows = np.flatnonzero(bad)
    raise NonFiniteScoresError(
        f"the {kind} encoder gave NaN or Inf embeddings for {len(rows)} of {len(ids)} {kind} "
        f"items (first: {_first(ids, rows)}); the model or its checkpoint is damaged or "
        "diverged (verify the checkpoint), or the input holds NaN")


def t2a_ranks(scores_AxT: np.ndarray, caption_clip_T: np.ndarray) -> np.ndarray:
  """[T] rank of each caption's clip among all clips.

  Raises:
    NonFiniteScoresError: a score is NaN or Inf (it would rank first).
  """
  scores_AxT = np.asarray(scores_AxT)
  caption_clip_T = np.asarray(caption_clip_T)
  check_finite_scores(scores_AxT)
  gt_T = scores_AxT[caption_clip_T, np.arange(scores_AxT.shape[1])]
  return 1 + (scores_AxT > gt_T[None, :]).sum(0)


def a2t_gt_ranks(scores_AxT: np.ndarray, caption_clip_T: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Ranks of every ground-truth caption of every clip, sorted ascending.

  Returns (ranks_AxG, valid_AxG): G = the largest number of captions of a clip; entries past a
  clip's own number of captions are invalid (ranks set to a large value).

  Raises:
    NonFiniteScoresError: a score is NaN or Inf (it would rank first).
  """
  scores_AxT = np.asarray(scores_AxT)
  caption_clip_T = np.asarray(caption_clip_T)
  check_finite_scores(scores_AxT)
  is_gt_AxT = caption_clip_T[None, :] == np.arange(scores_AxT.shape[0])[:, None]
  return gt_ranks(scores_AxT, is_gt_AxT)


def gt_ranks(scores_QxC: np.ndarray, is_gt_QxC: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Ranks of every ground-truth candidate of every query (`TIE_RULE`), sorted ascending.

  Returns (ranks_QxG, valid_QxG): G = the most ground truths of a query; entries past a
  query's own count are invalid (ranks set to a large value).
  """
  num_q = scores_QxC.shape[0]
  counts_Q = is_gt_QxC.sum(1)
  g = int(counts_Q.max()) if num_q else 0
  ranks_QxG = np.full((num_q, g), np.iinfo(np.int64).max // 2, np.int64)
  neg_QxC = np.where(is_gt_QxC, -np.inf, scores_QxC)
  for q in range(num_q):  # a loop over queries, each vectorised over its candidates
    gt_scores = np.sort(scores_QxC[q, is_gt_QxC[q]])[::-1]
    # j-th ground truth (1-based) sits after the j-1 better ground truths and after every
    # non-ground-truth candidate scoring strictly more.
    beaten = (neg_QxC[q][None, :] > gt_scores[:, None]).sum(1)
    ranks_QxG[q, : len(gt_scores)] = np.arange(1, len(gt_scores) + 1) + beaten
  valid_QxG = np.arange(g)[None, :] < counts_Q[:, None]
  return ranks_QxG, valid_QxG


def multi_gt_metrics(ranks_QxG: np.ndarray, valid_QxG: np.ndarray,
                     num_gt_Q: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """Per-query R@k (best-ranked ground truth), mAP@10 (module docstring) and 'rank'.

  `num_gt_Q` is the mAP denominator when some ground truths are out of `ranks_QxG` (a
  two-stage shortlist that missed them); default: the valid entries.
  """
  best_Q = ranks_QxG[:, 0] if ranks_QxG.shape[1] else np.full(len(ranks_QxG), np.inf)
  out = {f"R@{k}": 100.0 * (best_Q <= k) for k in KS}
  n_gt_Q = valid_QxG.sum(1) if num_gt_Q is None else np.asarray(num_gt_Q)
  j_QxG = np.arange(1, ranks_QxG.shape[1] + 1)[None, :]
  hit_QxG = valid_QxG & (ranks_QxG <= 10)
  prec_QxG = np.where(hit_QxG, j_QxG / np.maximum(ranks_QxG, 1), 0.0)
  out["mAP@10"] = 100.0 * prec_QxG.sum(1) / np.maximum(n_gt_Q, 1)
  out["rank"] = best_Q.astype(np.float64)
  return out


def class_relevance(caption_clip_T: np.ndarray, clip_group_A: np.ndarray) -> np.ndarray:
  """[A, T] bool: clip a is of the class (group) of caption t's clip."""
  clip_group_A = np.asarray(clip_group_A)
  return clip_group_A[:, None] == clip_group_A[np.asarray(caption_clip_T)][None, :]


def _summary(prefix: str, per_query: dict[str, np.ndarray]) -> dict[str, float]:
  return {f"{prefix}/{k}": float(np.mean(v)) for k, v in per_query.items()}


def per_query_metrics(scores_AxT: np.ndarray, caption_clip_T: np.ndarray, *,
                      true_recall: bool = False, clip_group_A: np.ndarray | None = None
                      ) -> dict[str, dict[str, np.ndarray]]:
  """Per-query values whose means are the reported metrics (percent for R and mAP).

  `clip_group_A` (class index per clip) makes T2A class-level (module docstring).
  """
  return per_query_from_ranks(query_ranks(scores_AxT, caption_clip_T, clip_group_A=clip_group_A),
                              true_recall=true_recall)


def query_ranks(scores_AxT: np.ndarray, caption_clip_T: np.ndarray, *,
                clip_group_A: np.ndarray | None = None) -> dict[str, list]:
  """The ranks every per-query metric is computed from, as JSON-ready values.

  Returns {'t2a': the rank of each caption's clip (class-level, `clip_group_A` given: a list
  per caption, the ascending ranks of every clip of its class), 'a2t': for each clip the
  ascending ranks of its ground-truth captions (a list per clip: clips may have different
  numbers)}. `per_query_from_ranks` turns them into per-query R@k / mAP@10 (the test set's
  `test_ranks.json` holds them, so that `hade_jax.ablate` can resample queries).

  Raises:
    NonFiniteScoresError: a score is NaN or Inf (it would rank first).
  """
  scores_AxT = np.asarray(scores_AxT)
  caption_clip_T = np.asarray(caption_clip_T)
  ranks_AxG, valid_AxG = a2t_gt_ranks(scores_AxT, caption_clip_T)
  return {"t2a": t2a_query_ranks(scores_AxT, caption_clip_T, clip_group_A=clip_group_A),
          "a2t": [r[v].tolist() for r, v in zip(ranks_AxG, valid_AxG, strict=True)]}


def t2a_query_ranks(scores_AxT: np.ndarray, caption_clip_T: np.ndarray, *,
                    clip_group_A: np.ndarray | None = None) -> list:
  """`query_ranks`' 't2a' alone: each caption's clip rank, or with `clip_group_A` the ascending
  ranks of every clip of its class."""
  scores_AxT = np.asarray(scores_AxT)
  caption_clip_T = np.asarray(caption_clip_T)
  if clip_group_A is None:
    return t2a_ranks(scores_AxT, caption_clip_T).tolist()
  check_finite_scores(scores_AxT)
  relevant_AxT = class_relevance(caption_clip_T, clip_group_A)
  ranks_TxG, valid_TxG = gt_ranks(scores_AxT.T, relevant_AxT.T)
  return [r[v].tolist() for r, v in zip(ranks_TxG, valid_TxG, strict=True)]


def per_query_from_ranks(ranks: dict, *, true_recall: bool = False
                         ) -> dict[str, dict[str, np.ndarray]]:
  """Per-query R@k, mAP@10 (percent) and 'rank' of `query_ranks`' output (or its JSON): every
  query through `multi_gt_metrics` (one ground truth: R@k = rank <= k, AP@10 = 1 / rank).
  Ranks with only 't2a' (`t2a_query_ranks`) give only T2A."""
  out = {}
  for direction in ("t2a", "a2t") if "a2t" in ranks else ("t2a",):
    ranks_QxG, valid_QxG = _padded_ranks(ranks[direction])
    out[direction] = multi_gt_metrics(ranks_QxG, valid_QxG)
  if true_recall:
    ranks_AxG, valid_AxG = _padded_ranks(ranks["a2t"])
    n_gt_A = valid_AxG.sum(1)
    for k in KS:
      out["a2t"][f"trueR@{k}"] = (100.0 * (valid_AxG & (ranks_AxG <= k)).sum(1)
                                  / np.maximum(n_gt_A, 1))
  return out


def _padded_ranks(per_query: list) -> tuple[np.ndarray, np.ndarray]:
  """(ranks_QxG ascending, valid_QxG) from a rank or a list of ranks per query."""
  lists = [sorted(int(x) for x in (r if isinstance(r, list | tuple | np.ndarray) else [r]))
           for r in per_query]
  g = max((len(r) for r in lists), default=0)
  ranks_QxG = np.full((len(lists), g), np.iinfo(np.int64).max // 2, np.int64)
  for q, r in enumerate(lists):
    ranks_QxG[q, :len(r)] = r
  valid_QxG = np.arange(g)[None, :] < np.array([len(r) for r in lists], np.int64)[:, None]
  return ranks_QxG, valid_QxG


def retrieval_metrics(scores_AxT: np.ndarray, caption_clip_T: np.ndarray, *,
                      true_recall: bool = False, intervals: bool = False,
                      clip_group_A: np.ndarray | None = None) -> dict[str, float]:
  """Flat dict: 't2a/R@1' ... 't2a/mAP@10', 't2a/median_rank', 't2a/mean_rank', same for a2t.

  With `intervals`, each metric also gets '<name>/ci95' = half-width of a jackknife 95%
  interval over the queries. With `clip_group_A` (class index per clip) T2A is class-level.

  Raises:
    NonFiniteScoresError: a score is NaN or Inf, naming the clips and captions affected.
  """
  per = per_query_metrics(scores_AxT, caption_clip_T, true_recall=true_recall,
                          clip_group_A=clip_group_A)
  out: dict[str, float] = {}
  for direction, values in per.items():
    ranks = values.pop("rank")
    out |= _summary(direction, values)
    out[f"{direction}/median_rank"] = float(np.median(ranks))
    out[f"{direction}/mean_rank"] = float(np.mean(ranks))
    if intervals:
      for name, v in values.items():
        out[f"{direction}/{name}/ci95"] = jackknife_ci95(v, np.mean)
      out[f"{direction}/median_rank/ci95"] = jackknife_ci95(ranks, np.median)
      out[f"{direction}/mean_rank/ci95"] = jackknife_ci95(ranks, np.mean)
  return out


def jackknife_ci95(values: np.ndarray, statistic=np.mean) -> float:
  """Half-width of the 95% jackknife (leave-one-query-out) normal interval of `statistic`."""
  values = np.asarray(values, np.float64)
  n = len(values)
  if n < 2:
    return float("nan")
  if statistic is np.mean:  # closed form of the leave-one-out means
    loo = (values.sum() - values) / (n - 1)
  else:
    loo = np.array([statistic(np.delete(values, i)) for i in range(n)])
  var = (n - 1) / n * np.sum((loo - loo.mean()) ** 2)
  return float(1.96 * np.sqrt(var))


def format_table(metrics: dict[str, float]) -> str:
  """A two-row table (T2A, A2T) of R@1/5/10, mAP@10 and ranks for the console or README."""
  cols = ["R@1", "R@5", "R@10", "mAP@10", "median_rank", "mean_rank"]
  lines = ["| direction | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
  for direction in ("t2a", "a2t"):
    cells = []
    for c in cols:
      v = metrics.get(f"{direction}/{c}")
      ci = metrics.get(f"{direction}/{c}/ci95")
      cells.append("-" if v is None else f"{v:.2f}" + (f" ± {ci:.2f}" if ci is not None else ""))
    lines.append(f"| {direction.upper()} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Rankings for submissions and for two-stage search.

TOP_K_ORDER = "clips by descending score; equal scores: the clip listed first in the split first"


def top_k_clips(scores_AxT: np.ndarray, k: int = 10) -> np.ndarray:
  """[T, k] indices of each caption's k best clips (order: `TOP_K_ORDER`)."""
  scores_AxT = np.asarray(scores_AxT)
  k = min(k, scores_AxT.shape[0])
  # A stable sort of the negated scores keeps the split's order among equal scores.
  return np.argsort(-scores_AxT.T, axis=1, kind="stable")[:, :k]


def two_stage_t2a_ranks(scores_AxT: np.ndarray, global_AxT: np.ndarray,
                        caption_clip_T: np.ndarray, shortlist: int) -> np.ndarray:
  """[T] T2A ranks when only the `shortlist` best clips by global cosine are re-ranked.

  The shortlist of a caption is its `shortlist` best clips by `global_AxT` (equal cosines:
  the lower clip index first, as `jax.lax.top_k`); inside it the rank follows `TIE_RULE` on
  the full `scores_AxT`. A ground-truth clip left out of the shortlist is never retrieved: its
  rank is `num_clips + 1`.
  """
  scores_AxT = np.asarray(scores_AxT)
  global_AxT = np.asarray(global_AxT)
  check_finite_scores(scores_AxT)
  check_finite_scores(global_AxT)
  caption_clip_T = np.asarray(caption_clip_T)
  num_a, num_t = scores_AxT.shape
  order_TxA = np.argsort(-global_AxT.T, axis=1, kind="stable")
  in_list_TxA = np.zeros((num_t, num_a), bool)
  np.put_along_axis(in_list_TxA, order_TxA[:, :min(shortlist, num_a)], True, axis=1)
  cols = np.arange(num_t)
  gt_T = scores_AxT[caption_clip_T, cols]
  beaten_T = (in_list_TxA & (scores_AxT.T > gt_T[:, None])).sum(1)
  found_T = in_list_TxA[cols, caption_clip_T]
  return np.where(found_T, 1 + beaten_T, num_a + 1)


def two_stage_t2a_class(scores_AxT: np.ndarray, global_AxT: np.ndarray,
                       caption_clip_T: np.ndarray, clip_group_A: np.ndarray,
                       shortlist: int) -> dict[str, float]:
  """Class-level T2A R@1/5/10 and mAP@10 (percent) when only the `shortlist` best clips by
  global cosine are re-ranked (shortlist as `two_stage_t2a_ranks`); relevant clips left out
  are never retrieved but still count in mAP's denominator."""
  scores_AxT, global_AxT = np.asarray(scores_AxT), np.asarray(global_AxT)
  check_finite_scores(scores_AxT)
  check_finite_scores(global_AxT)
  num_a, num_t = scores_AxT.shape
  order_TxA = np.argsort(-global_AxT.T, axis=1, kind="stable")
  in_list_TxA = np.zeros((num_t, num_a), bool)
  np.put_along_axis(in_list_TxA, order_TxA[:, :min(shortlist, num_a)], True, axis=1)
  relevant_TxA = class_relevance(caption_clip_T, clip_group_A).T
  # Clips out of the shortlist are not candidates: -inf never beats a relevant clip.
  listed_TxA = np.where(in_list_TxA, scores_AxT.T, -np.inf)
  ranks_TxG, valid_TxG = gt_ranks(listed_TxA, relevant_TxA & in_list_TxA)
  per = multi_gt_metrics(ranks_TxG, valid_TxG, relevant_TxA.sum(1))
  return {k: float(np.mean(v)) for k, v in per.items() if k != "rank"}


def t2a_from_ranks(ranks_T: np.ndarray) -> dict[str, float]:
  """R@1/5/10 and mAP@10 (percent) of text-to-audio ranks."""
  r_T = np.asarray(ranks_T)
  out = {f"R@{k}": float(100.0 * np.mean(r_T <= k)) for k in KS}
  out["mAP@10"] = float(100.0 * np.mean(np.where(r_T <= 10, 1.0 / r_T, 0.0)))
  return out


# ---------------------------------------------------------------------------------------------
# Zero-shot classification: clips x classes.

ZERO_SHOT_KS = (1, 5)
CLASS_TIE_RULE = ("rank of the true class = 1 + number of other classes with a strictly "
                  "greater score (ties favour the true class, as TIE_RULE)")


def class_ranks(scores_AxL: np.ndarray, true_A: np.ndarray) -> np.ndarray:
  """[A] rank of each clip's true class among the L classes (`CLASS_TIE_RULE`).

  Raises:
    NonFiniteScoresError: a score is NaN or Inf (it would rank first).
    ValueError: the shapes disagree or a true class index is outside [0, L).
  """
  scores_AxL = np.asarray(scores_AxL)
  true_A = np.asarray(true_A)
  if scores_AxL.ndim != 2 or true_A.shape != scores_AxL.shape[:1]:
    raise ValueError(f"expected scores [clips, classes] and one true class per clip, got "
                     f"scores {scores_AxL.shape} and classes {true_A.shape}")
  if not len(true_A) or not scores_AxL.shape[1]:
    raise ValueError(f"no clips or no classes to measure (scores {scores_AxL.shape})")
  if not np.issubdtype(true_A.dtype, np.integer):
    raise ValueError(f"true classes must be integer indices, got dtype {true_A.dtype}")
  bad = np.flatnonzero((true_A < 0) | (true_A >= scores_AxL.shape[1]))
  if len(bad):
    raise ValueError(f"{len(bad)} clips have a class index outside [0, {scores_AxL.shape[1]}) "
                     f"(first: clip {int(bad[0])}, class {int(true_A[bad[0]])})")
  check_finite_scores(scores_AxL)
  true_scores_A = scores_AxL[np.arange(len(true_A)), true_A]
  return 1 + (scores_AxL > true_scores_A[:, None]).sum(1)


def zero_shot_accuracy(scores_AxL: np.ndarray, true_A: np.ndarray,
                       class_names: list[str] | None = None) -> dict[str, float]:
  """Top-1 / top-5 accuracy (percent) and the accuracy of each class.

  Args:
    scores_AxL: clips x classes, higher = more likely.
    true_A: each clip's class index.
    class_names: the L names used in 'zero_shot/per_class/<name>' (default: the indices).

  Returns:
    'zero_shot/top1', 'zero_shot/top5' (over clips), 'zero_shot/mean_per_class' (the mean of
    the per-class top-1 accuracies: balanced accuracy) and 'zero_shot/per_class/<name>' (top-1
    accuracy over the clips of that class; classes without clips are left out).
  """
  ranks_A = class_ranks(scores_AxL, true_A)
  true_A = np.asarray(true_A)
  num_classes = np.shape(scores_AxL)[1]
  names = [str(i) for i in range(num_classes)] if class_names is None else list(class_names)
  if len(names) != num_classes:
    raise ValueError(f"{len(names)} class names for {num_classes} score columns")
  out = {f"zero_shot/top{k}": float(100.0 * np.mean(ranks_A <= k)) for k in ZERO_SHOT_KS}
  per_class = {}
  for c in np.unique(true_A):
    per_class[names[c]] = float(100.0 * np.mean(ranks_A[true_A == c] <= 1))
  out["zero_shot/mean_per_class"] = float(np.mean(list(per_class.values())))
  out |= {f"zero_shot/per_class/{name}": v for name, v in per_class.items()}
  return out
