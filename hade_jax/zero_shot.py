"""Zero-shot audio classification with HADE's full score and CLAP-style prompt ensembling.

Each label is written into every template ("This is a sound of {}.", ...), giving L x P
prompts that are tokenised and encoded ONCE as one text batch; every (clip, prompt) pair is
scored with the full HADE score S = global + THA + DCR (`retrieval.Encoder.score`, tiled), and
a label's score is the MEAN OF ITS P PROMPTS' SCORES.

Why the mean of scores and not CLIP's mean of text embeddings: HADE's score is not a function
of one text vector. THA compares the prompt's word tokens with audio frames (templates differ
in words and length, so there is no "mean token sequence"), and DCR's confidence is an MLP of
each (audio factor, text factor) pair. Averaging the scores is defined for every term; for the
global term it equals the cosine with the mean of the prompts' normalised embeddings, i.e.
CLIP's ensemble without re-normalising the mean (which would only rescale each label's global
cosines by a constant, the norm of its mean embedding).

Probabilities are softmax over labels of `logit_scale * score`: the model's own trained
temperature, as its InfoNCE loss uses it (losses.hade_loss).

Ranking: labels by descending score; equal scores keep the order the labels were given.

Legend: A: clips, L: labels, P: templates (prompts per label), T: texts (L * P).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from hade_jax import hade, metrics, retrieval
from hade_jax import heads as hade_heads

# The default prompt templates: the one list every entry point uses. The first is LAION-CLAP's
# ESC-50 zero-shot prompt; the others vary the wording as CLIP's prompt ensembles do.
DEFAULT_TEMPLATES = (
    "This is a sound of {}.",
    "A sound of {}.",
    "The sound of {}.",
    "A recording of {}.",
    "{} can be heard.",
)
PLACEHOLDER = "{}"
RANK_ORDER = "labels by descending score; equal scores: the label given first first"
# texts -> (ids [T, M], mask [T, M]), e.g. a `tokenizer.Tokenizer` of the text tower.
Tokenize = Callable[[list[str]], tuple[np.ndarray, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class LabelScore:
  """One label of one clip's ranking."""

  label: str
  score: float  # mean over the templates of the full HADE score
  probability: float  # softmax over the labels of logit_scale * score


def check_labels(labels: Sequence[str]) -> list[str]:
  """The labels as a list; ValueError for none, a blank one, a non-string or a duplicate."""
  if isinstance(labels, str):
    raise ValueError(f"labels must be a list of strings, got one string {labels!r}; pass "
                     f"[{labels!r}] or split it")
  labels = list(labels)
  if not labels:
    raise ValueError("no labels: give at least one class label")
  seen = {}
  for i, label in enumerate(labels):
    if not isinstance(label, str) or not label.strip():
      raise ValueError(f"label {i + 1} of {len(labels)} is {label!r}: labels must be "
                       "non-empty strings")
    if label in seen:
      raise ValueError(f"label {label!r} is given twice (positions {seen[label] + 1} and "
                       f"{i + 1}): each label must be given once")
    seen[label] = i
  return labels


def check_templates(templates: Sequence[str]) -> list[str]:
  """The templates as a list; ValueError naming a template without exactly one '{}'."""
  if isinstance(templates, str):
    raise ValueError(f"templates must be a list of strings, got one string {templates!r}")
  templates = list(templates)
  if not templates:
    raise ValueError(f"no templates: give at least one, e.g. {DEFAULT_TEMPLATES[0]!r}")
  for i, template in enumerate(templates):
    if not isinstance(template, str) or not template.strip():
      raise ValueError(f"template {i + 1} of {len(templates)} is empty ({template!r}): each "
                       f"template is a text with one {PLACEHOLDER} where the label goes, e.g. "
                       f"{DEFAULT_TEMPLATES[0]!r}")
    if template.count(PLACEHOLDER) != 1:
      raise ValueError(f"template {i + 1} of {len(templates)} ({template!r}) holds "
                       f"{template.count(PLACEHOLDER)} '{PLACEHOLDER}': it needs exactly one, "
                       "where the label goes")
  return templates


def label_text(label: str) -> str:
  """The words a label puts into a template: ESC-50 style names read as words
  ('crackling_fire' -> 'crackling fire'); the label itself is reported unchanged."""
  return " ".join(label.replace("_", " ").split())


def prompts(labels: Sequence[str], templates: Sequence[str]) -> list[str]:
  """The L * P prompt texts, label-major: text l * P + p is label l in template p."""
  return [t.replace(PLACEHOLDER, label_text(label)) for label in labels for t in templates]


def ensemble(scores_AxT: np.ndarray, num_labels: int, num_templates: int) -> np.ndarray:
  """[A, L] label scores: the mean over each label's P prompts (columns label-major)."""
  scores_AxT = np.asarray(scores_AxT, np.float32)
  return scores_AxT.reshape(len(scores_AxT), num_labels, num_templates).mean(-1)


def probabilities(scores_AxL: np.ndarray, logit_scale: float) -> np.ndarray:
  """[A, L] softmax over the labels of `logit_scale * scores` (float64, rows sum to 1)."""
  z_AxL = float(logit_scale) * np.asarray(scores_AxL, np.float64)
  z_AxL = np.exp(z_AxL - z_AxL.max(axis=1, keepdims=True))
  return z_AxL / z_AxL.sum(axis=1, keepdims=True)


def _encoder(model_or_encoder: hade.HadeModel | retrieval.Encoder) -> retrieval.Encoder:
  if isinstance(model_or_encoder, retrieval.Encoder):
    return model_or_encoder
  return retrieval.Encoder(model_or_encoder)


def label_scores(model_or_encoder: hade.HadeModel | retrieval.Encoder,
                 tokenize: Tokenize, audio: hade_heads.AudioFeatures,
                 labels: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES, *,
                 batch_size: int = 64, tile: int = 256) -> np.ndarray:
  """[A, L] ensembled full HADE scores of every clip for every label.

  Args:
    model_or_encoder: a HadeModel, or a `retrieval.Encoder` (reused: nothing compiles again).
    tokenize: the text tower's tokenizer (`tokenizer.Tokenizer`, or any `Tokenize`).
    audio: the clips' cached features (`Hade.embed_audio`, `Encoder.audio`).
    labels: class labels (unique, non-empty).
    templates: prompt templates, each with one '{}' (default `DEFAULT_TEMPLATES`).
    batch_size: prompts per text-encoder call.
    tile: clips x prompts per scoring tile.

  Raises:
    ValueError: bad labels or templates (named).
    metrics.NonFiniteScoresError: NaN/Inf scores (a damaged model), naming clips and prompts.
  """
  labels, templates = check_labels(labels), check_templates(templates)
  enc = _encoder(model_or_encoder)
  texts = prompts(labels, templates)
  ids_TxM, mask_TxM = tokenize(texts)
  text = enc.text(ids_TxM, mask_TxM, batch_size)
  metrics.check_finite_embeddings(text, texts, "text")
  scores_AxT = enc.score(audio, text, tile=tile)
  metrics.check_finite_scores(scores_AxT, caption_ids=texts)
  return ensemble(scores_AxT, len(labels), len(templates))


def rank(scores_AxL: np.ndarray, labels: Sequence[str], logit_scale: float,
         top_k: int | None = None) -> list[list[LabelScore]]:
  """Per clip, its labels ranked (`RANK_ORDER`) with scores and probabilities; the first
  `top_k` (default: all)."""
  if top_k is not None and (isinstance(top_k, bool) or int(top_k) < 1):
    raise ValueError(f"top_k={top_k!r}: give a number of labels of at least 1, or None for all")
  scores_AxL = np.asarray(scores_AxL)
  prob_AxL = probabilities(scores_AxL, logit_scale)
  k = len(labels) if top_k is None else min(int(top_k), len(labels))
  # A stable sort of the negated scores keeps the given label order among equal scores.
  order_AxL = np.argsort(-scores_AxL, axis=1, kind="stable")[:, :k]
  return [[LabelScore(labels[j], float(scores_AxL[a, j]), float(prob_AxL[a, j]))
           for j in order_AxL[a]] for a in range(len(scores_AxL))]


def zero_shot_metrics(model_or_encoder: hade.HadeModel | retrieval.Encoder,
                      tokenize: Tokenize, audio: hade_heads.AudioFeatures,
                      label_names: Sequence[str], clip_labels_A: Sequence[int],
                      templates: Sequence[str] = DEFAULT_TEMPLATES, *, batch_size: int = 64,
                      tile: int = 256) -> dict[str, float]:
  """Zero-shot accuracy of a split whose clips carry class labels (`metrics.zero_shot_accuracy`).

  Args:
    model_or_encoder: a HadeModel or the evaluator's `retrieval.Encoder` (already loaded with
      the weights to evaluate).
    tokenize: the text tower's tokenizer, e.g. `tokenizer.Tokenizer(config.data.tokenizer_dir,
      config.data.max_text_len)`.
    audio: the split's audio features, one row per clip ([A] rows, as `Encoder.audio_batches`).
    label_names: the L class names (their order defines the class indices).
    clip_labels_A: each clip's class index into `label_names`.
    templates: prompt templates (default `DEFAULT_TEMPLATES`).

  Returns:
    'zero_shot/top1', 'zero_shot/top5', 'zero_shot/mean_per_class' and
    'zero_shot/per_class/<name>' (percent).
  """
  scores_AxL = label_scores(model_or_encoder, tokenize, audio, label_names, templates,
                            batch_size=batch_size, tile=tile)
  return metrics.zero_shot_accuracy(scores_AxL, clip_labels_A, label_names)
