"""The report's model sections: THA level weights, the DCR confidence over the test split's
pairs, and the top-5 clips of a few test captions with their audio.

The model is loaded through `api.load_model` (the one verified checkpoint reader); the test
split through `eval.prepared_split`, encoded once by a `retrieval.Encoder`.

Legend: A: clips, T: captions, K: factors, d: factor width, L: levels, P: pairs, S: samples.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import logging
import pathlib

import jax.numpy as jnp
import ml_collections
import numpy as np
import soundfile

from data_pipelines import policy
from hade_jax import api, checkpoints, hade, input_pipeline, metrics, retrieval
from hade_jax import eval as hade_eval
from hade_jax.report import page, plots

log = logging.getLogger("hade_jax.report")

TOP_K = 5
PAIR_CHUNK = 64  # pairs per confidence call: its [P, P, K, 4d] hidden layer stays small
MAX_UNMATCHED_PAIRS = 4096  # the unmatched pairs are a random sample of this size
SAMPLE_SEED = 0


@dataclasses.dataclass
class ModelPart:
  sections: list[page.Section]  # levels, confidence, examples
  step_dir: str  # the checkpoint loaded ('' when none could be)


def build(workdir: pathlib.Path, *, which: str, test_split: str | None, num_captions: int,
          audio_dir: pathlib.Path | None, max_clips: int = 0) -> ModelPart:
  """The three model sections; a missing checkpoint or test split is said in the sections."""
  levels = page.Section("levels", "THA level weights")
  confidence = page.Section("confidence", "DCR confidence")
  examples = page.Section("examples", "Test captions and their top-5 clips")
  sections = [levels, confidence, examples]
  try:
    model, config, step_dir = api.load_model(workdir, which=which)
  except FileNotFoundError as e:
    return ModelPart(_all_missing(sections, f"no checkpoint to load ({e})"), "")
  except (checkpoints.CorruptCheckpointError, ValueError) as e:  # damaged, or a bad config
    return ModelPart(_all_missing(sections, f"the checkpoint cannot be used: {e}"), "")
  _fill_levels(levels, model)
  split_name = test_split or config.get("final_eval_split") or config.data.get("test_split")
  if not split_name:
    _all_missing(sections[1:], "the run's config names no test split (final_eval_split)")
    return ModelPart(sections, str(step_dir))
  try:
    view = view_split(model, config, split_name, num_captions=num_captions,
                      audio_dir=audio_dir, max_clips=max_clips)
  except (FileNotFoundError, ValueError, OSError) as e:
    _all_missing(sections[1:], f"the test split {split_name!r} could not be evaluated: {e}")
    return ModelPart(sections, str(step_dir))
  _fill_confidence(confidence, model, view)
  _fill_examples(examples, view, num_captions)
  return ModelPart(sections, str(step_dir))


def _all_missing(sections: list[page.Section], why: str) -> list[page.Section]:
  for s in sections:
    s.missing = why
  return sections


def _fill_levels(section: page.Section, model: hade.HadeModel) -> None:
  found = level_weights(model)
  if found is None:
    section.missing = "THA is off in this model (heads.use_tha=False)"
    return
  names, weights_L, learned = found
  section.add_image("level_weights", plots.level_weights(names, weights_L, learned),
                    "THA level weights")
  values = ", ".join(f"{n}: {w:.3f}" for n, w in zip(names, weights_L, strict=True))
  section.notes.append(f"lambda = softmax(level logits): {values} (uniform: "
                       f"{1 / len(names):.3f}). Levels pair an audio stage with a text block.")


def _fill_confidence(section: page.Section, model: hade.HadeModel, view: SplitView) -> None:
  if view.matched_PxK is None:
    section.missing = "DCR is off in this model (heads.use_dcr=False)"
    return
  section.add_image("dcr_confidence", plots.confidence(view.matched_PxK, view.unmatched_PxK),
                    "DCR confidence distribution")
  section.notes.append(
      f"c_k(a, t) of the {view.split} split ({view.num_clips} clips): all "
      f"{len(view.matched_PxK)} matched pairs (each caption with its clip), mean "
      f"{view.matched_PxK.mean():.3f}; {len(view.unmatched_PxK)} unmatched pairs (all of "
      f"them up to {MAX_UNMATCHED_PAIRS}, else that many drawn at random, seed {SAMPLE_SEED}), "
      f"mean {view.unmatched_PxK.mean():.3f}. "
      f"confidence_norm={model.heads.cfg.confidence_norm!r}.")


def _fill_examples(section: page.Section, view: SplitView, num_captions: int) -> None:
  if not num_captions:
    section.missing = "none asked for (--num_captions=0)"
    return
  section.examples = view.examples
  section.notes.append(
      f"{len(view.examples)} of the {view.num_captions} captions of the {view.split} split, "
      f"spread evenly; each ranks all {view.num_clips} clips by the full HADE score (its own "
      "clip highlighted).")
  if view.audio_note:
    section.notes.append(f"Audio: {view.audio_note}")


def level_weights(model: hade.HadeModel) -> tuple[list[str], np.ndarray, bool] | None:
  """(level names, lambda [L], learned?) of the THA levels; None when THA is off."""
  cfg = model.heads.cfg
  if not cfg.use_tha:
    return None
  names = [f"stage {h} / block {l}" for h, l in cfg.levels]
  return names, np.asarray(model.heads.level_weights()), bool(cfg.learn_level_weights)


def pair_confidence(model: hade.HadeModel, a_PxKxd: np.ndarray, t_PxKxd: np.ndarray
                    ) -> np.ndarray:
  """[P, K] confidence c_k(a_p, t_p) of P given pairs (row p of each side).

  `heads.dcr_score` scores all pairs of its two inputs: it is called on chunks and the
  diagonal kept, so the formula has one owner (heads.py).
  """
  out = []
  for start in range(0, len(a_PxKxd), PAIR_CHUNK):
    a, t = a_PxKxd[start:start + PAIR_CHUNK], t_PxKxd[start:start + PAIR_CHUNK]
    _, c_PxPxK = model.heads.dcr_score(jnp.asarray(a), jnp.asarray(t))
    n = len(a)
    out.append(np.asarray(c_PxPxK)[np.arange(n), np.arange(n)])
  return np.concatenate(out) if out else np.zeros((0, model.heads.cfg.num_factors))


@dataclasses.dataclass
class Hit:
  rank: int
  name: str
  score: float
  correct: bool  # the caption's own clip
  audio_src: str  # a file path or a WAV data URI ('' when none)


@dataclasses.dataclass
class Example:
  caption: str
  clip: str  # the caption's own clip
  rank: int  # the rank of its own clip
  hits: list[Hit]


@dataclasses.dataclass
class SplitView:
  """What the report computed on the test split."""

  split: str
  num_clips: int
  num_captions: int
  matched_PxK: np.ndarray | None  # confidences of every caption with its own clip
  unmatched_PxK: np.ndarray | None  # of a random sample of other pairs
  examples: list[Example]
  audio_note: str


def view_split(model: hade.HadeModel, config: ml_collections.ConfigDict, split_name: str, *,
               num_captions: int, audio_dir: pathlib.Path | None, max_clips: int = 0
               ) -> SplitView:
  """Encodes the split, scores every pair and picks the examples (see the module docstring).

  Raises:
    FileNotFoundError / ValueError: the prepared dataset or split is missing (named).
  """
  split = hade_eval.prepared_split(config, model.cfg, split_name, max_clips=max_clips)
  enc = retrieval.Encoder(model)
  audio = enc.audio_batches(split.audio_batches(), split.clip_ids)
  text = enc.text(split.input_ids, split.attention_mask, int(config.eval_batch_size))
  scores_AxT = enc.score(audio, text, tile=int(config.eval_tile))
  matched = unmatched = None
  if model.heads.cfg.use_dcr:
    matched, unmatched = _confidences(model, audio.factors_AxKxd, text.factors_TxKxd,
                                      split.caption_clip)
  examples, audio_note = _examples(config, model.cfg, split_name, split, scores_AxT,
                                   num_captions, audio_dir)
  return SplitView(split_name, len(split.clip_ids), len(split.caption_clip), matched,
                   unmatched, examples, audio_note)


def _confidences(model, a_AxKxd, t_TxKxd, caption_clip_T):
  """(matched [T, K], unmatched [P, K]) confidences; the unmatched pairs are all the others
  when they are few, else `MAX_UNMATCHED_PAIRS` of them drawn without replacement."""
  a_AxKxd, t_TxKxd = np.asarray(a_AxKxd), np.asarray(t_TxKxd)
  matched = pair_confidence(model, a_AxKxd[caption_clip_T], t_TxKxd)
  num_a, num_t = len(a_AxKxd), len(t_TxKxd)
  is_gt_P = (np.arange(num_a)[:, None] == caption_clip_T[None, :]).ravel()  # [A * T]
  pairs_P = np.flatnonzero(~is_gt_P)
  if len(pairs_P) > MAX_UNMATCHED_PAIRS:
    rng = np.random.default_rng(SAMPLE_SEED)
    pairs_P = np.sort(rng.choice(pairs_P, MAX_UNMATCHED_PAIRS, replace=False))
  clip_P, text_P = np.divmod(pairs_P, num_t)
  unmatched = pair_confidence(model, a_AxKxd[clip_P], t_TxKxd[text_P])
  return matched, unmatched


def _examples(config, cfg, split_name, split, scores_AxT, num_captions, audio_dir):
  """`num_captions` captions spread over the split, each with its top-5 clips and audio."""
  num_t = scores_AxT.shape[1]
  picked = np.unique(np.linspace(0, num_t - 1, min(num_captions, num_t)).round().astype(int))
  top_TxK = metrics.top_k_clips(scores_AxT[:, picked], TOP_K)
  ranks_T = metrics.t2a_ranks(scores_AxT, split.caption_clip)
  audio = ClipAudio(config, cfg, split_name, audio_dir)
  examples = []
  for row, t in enumerate(picked):
    own = int(split.caption_clip[t])
    hits = [Hit(rank=i + 1, name=split.clip_names[a], score=float(scores_AxT[a, t]),
                correct=int(a) == own, audio_src=audio.src(int(a)))
            for i, a in enumerate(top_TxK[row])]
    examples.append(Example(split.texts[t], split.clip_names[own], int(ranks_T[t]), hits))
  return examples, audio.note()


class ClipAudio:
  """The audio of a split's clips for <audio> players: the original file when it is local
  (under `audio_dir`, by the file name the prepare step recorded), otherwise a WAV data URI of
  the crop the model heard, decoded from the prepared record."""

  def __init__(self, config, cfg, split_name: str, audio_dir: pathlib.Path | None):
    from hade_jax import data  # the prepared records (TFDS)

    icfg = data.input_config(config, cfg)
    self.source = input_pipeline.open_source(icfg, split_name)
    self.rate = icfg.sample_rate
    self.num_samples = icfg.num_samples
    self.crop = config.data.eval_crop
    self.audio_dir = audio_dir
    self.files = self.embedded = 0

  def src(self, position: int) -> str:
    record = self.source[position]
    if self.audio_dir is not None:
      path = (self.audio_dir / record["file_name"]).absolute()
      if path.is_file():
        self.files += 1
        return path.as_uri()
    self.embedded += 1
    return _wav_uri(self._crop(record["audio"]), self.rate)

  def _crop(self, audio_S: np.ndarray) -> np.ndarray:
    n = len(audio_S)
    # 'windows' (several crops per clip) plays the first window.
    crop = self.crop if self.crop in ("head", "center") else "head"
    start = policy.crop_start(n, self.num_samples, crop)
    return audio_S[start:start + self.num_samples]

  def note(self) -> str:
    parts = []
    if self.files:
      parts.append(f"the original files under {self.audio_dir} ({self.files} of the players)")
    if self.embedded:
      seconds = self.num_samples / self.rate
      parts.append(
          f"the clip as the model heard it, embedded in the page: the prepared record's audio "
          f"at {self.rate} Hz, its {seconds:g} s '{self.crop}' crop ({self.embedded} of the "
          "players" + ("" if self.audio_dir else
                       "; --audio_dir=<the download folder> plays the original files") + ")")
    return "; ".join(parts) + "." if parts else ""


def _wav_uri(audio_S: np.ndarray, rate: int) -> str:
  buf = io.BytesIO()
  soundfile.write(buf, np.asarray(audio_S), rate, format="WAV", subtype="PCM_16")
  return "data:audio/wav;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
