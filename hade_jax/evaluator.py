"""The retrieval evaluator: every clip against every caption of a split, scored by HADE's S.

Built once per run (`RetrievalEvaluator.from_config`) and used by the trainer's periodic and
final evaluations and by `python -m hade_jax.eval`. It holds one `retrieval.Encoder`, so its
jitted encoders and tile scorer compile once per run: a later evaluation only loads new
weights into it.

Legend: A: audios, T: texts.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from jax.sharding import Mesh

from hade_jax import hade, metrics, retrieval, zero_shot
from hade_jax import heads as hade_heads

if TYPE_CHECKING:  # data imports the input pipeline; evaluating needs only the split's arrays
  from hade_jax import data

log = logging.getLogger("hade_jax")


@dataclasses.dataclass
class Scored:
  """Everything an evaluation computed, for callers that want more than the metrics."""

  scores_AxT: np.ndarray
  global_AxT: np.ndarray  # cosine of the global embeddings (the two-stage shortlist's score)
  split: data.EvalSplit
  metrics: dict[str, float]

  def query_ranks(self) -> dict:
    """Per-query ranks (`metrics.query_ranks`) behind `metrics`: saved with test results."""
    return metrics.query_ranks(self.scores_AxT, self.split.caption_clip,
                               clip_group_A=self.split.clip_group)


def split_metrics(scores_AxT: np.ndarray, global_AxT: np.ndarray, caption_clip_T: np.ndarray,
                  *, true_recall: bool = False, intervals: bool = False,
                  shortlists: Sequence[int] = (), clip_group_A: np.ndarray | None = None
                  ) -> dict[str, float]:
  """The flat metrics dict: `metrics.retrieval_metrics`, 'global/t2a/<metric>' (the global
  cosine alone, two-stage search's shortlist score) and, per shortlist size S,
  'two_stage@S/t2a/<metric>' and 'two_stage@S/t2a/<metric>/lost' (exhaustive minus two-stage).
  `clip_group_A` (a labels split's `EvalSplit.clip_group`) makes T2A class-level."""
  out = metrics.retrieval_metrics(scores_AxT, caption_clip_T, true_recall=true_recall,
                                  intervals=intervals, clip_group_A=clip_group_A)
  # T2A only: the global cosine is the shortlist score of text queries.
  global_T = metrics.per_query_from_ranks({"t2a": metrics.t2a_query_ranks(
      global_AxT, caption_clip_T, clip_group_A=clip_group_A)})["t2a"]
  out |= {f"global/t2a/{name}": float(np.mean(v)) for name, v in global_T.items()
          if name != "rank"}
  for s in shortlists:
    if clip_group_A is None:
      ranks_T = metrics.two_stage_t2a_ranks(scores_AxT, global_AxT, caption_clip_T, int(s))
      values = metrics.t2a_from_ranks(ranks_T)
    else:
      values = metrics.two_stage_t2a_class(scores_AxT, global_AxT, caption_clip_T,
                                           clip_group_A, int(s))
    for name, value in values.items():
      out[f"two_stage@{s}/t2a/{name}"] = value
      out[f"two_stage@{s}/t2a/{name}/lost"] = out[f"t2a/{name}"] - value
  return out


class RetrievalEvaluator:
  """All-pairs retrieval metrics of a model on evaluation splits.

  Args:
    batch_size: clips / captions per encoder call (`config.eval_batch_size`).
    tile: clips x captions per scoring tile (`config.eval_tile`).
    mesh: devices to shard over (default: all, `retrieval.device_mesh`).
    true_recall: also the DCASE 2023 "true recall" A2T variant ('a2t/trueR@k').
    intervals: jackknife 95% half-widths ('<metric>/ci95').
    shortlists: two-stage shortlist sizes to measure (see `split_metrics`).
  """

  def __init__(self, *, batch_size: int, tile: int, mesh: Mesh | None = None,
               true_recall: bool = False, intervals: bool = False,
               shortlists: Sequence[int] = ()):
    self.batch_size, self.tile, self.mesh = int(batch_size), int(tile), mesh
    self.options = {"true_recall": true_recall, "intervals": intervals,
                    "shortlists": tuple(int(s) for s in shortlists)}
    self.encoder: retrieval.Encoder | None = None  # built by the first evaluation

  @classmethod
  def from_config(cls, config: Mapping[str, Any], mesh: Mesh | None = None, **options
                  ) -> RetrievalEvaluator:
    """From a training config's `eval_batch_size` and `eval_tile`; `options` as __init__'s."""
    return cls(batch_size=config["eval_batch_size"], tile=config["eval_tile"], mesh=mesh,
               **options)

  def _encoder(self, model: hade.HadeModel) -> retrieval.Encoder:
    if self.encoder is None:
      self.encoder = retrieval.Encoder(model, self.mesh)
    else:
      self.encoder.load(model)
    return self.encoder

  def scores(self, model: hade.HadeModel, split: data.EvalSplit
             ) -> tuple[np.ndarray, np.ndarray]:
    """([A, T] full scores, [A, T] global cosines) of every clip and caption of a split."""
    scores_AxT, global_AxT, _ = self._scores(model, split)
    return scores_AxT, global_AxT

  def _scores(self, model: hade.HadeModel, split: data.EvalSplit
              ) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """`scores`, and a labels split's zero-shot accuracy (`zero_shot.zero_shot_metrics`: the
    class names in the default templates against the same audio features)."""
    enc = self._encoder(model)
    t0 = time.perf_counter()
    audio = enc.audio_batches(split.audio_batches(), split.clip_ids)
    t1 = time.perf_counter()
    text = enc.text(split.input_ids, split.attention_mask, self.batch_size)
    t2 = time.perf_counter()
    # NaN embeddings would score NaN, and NaN ranks first: refuse them naming the inputs.
    metrics.check_finite_embeddings(audio, split.clip_names, "audio")
    metrics.check_finite_embeddings(text, split.texts, "text")
    scores_AxT = enc.score(audio, text, tile=self.tile)
    t3 = time.perf_counter()
    log.info("encoded %d clips in %.1f s, %d captions in %.1f s; scored %d pairs in %.1f s "
             "(tiles of %d, %d devices)", len(split.clip_ids), t1 - t0, len(split.caption_clip),
             t2 - t1, scores_AxT.size, t3 - t2, self.tile, enc.num_devices)
    global_AxT = (np.asarray(hade_heads.normalize(audio.global_AxD))
                  @ np.asarray(hade_heads.normalize(text.global_TxD)).T)
    accuracy = {}
    if split.labels is not None and split.tokenize is not None:
      accuracy = zero_shot.zero_shot_metrics(enc, split.tokenize, audio, split.classes,
                                             split.clip_group, batch_size=self.batch_size,
                                             tile=self.tile)
    return scores_AxT, global_AxT, accuracy

  def evaluate(self, model: hade.HadeModel, split: data.EvalSplit) -> Scored:
    """Scores and metrics of `model` on `split` (every clip x every caption; with labels also
    'zero_shot/top1', 'zero_shot/top5', ... over the split's classes)."""
    scores_AxT, global_AxT, accuracy = self._scores(model, split)
    result = split_metrics(scores_AxT, global_AxT, split.caption_clip,
                           clip_group_A=split.clip_group, **self.options) | accuracy
    return Scored(scores_AxT, global_AxT, split, result)
