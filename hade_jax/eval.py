"""Evaluation of a checkpoint with the metrics the field reports (docs/method.md section 8).

  python -m hade_jax.eval --workdir=/tmp/hade_demo --split=test
  python -m hade_jax.eval --checkpoint=WD/best/480 --csv=captions.csv --audio_dir=audio/ \
      --out=/tmp/eval --true_recall --shortlists=10,50
  python -m hade_jax.eval --workdir=WD --csv=captions.csv --eval_crop=windows  # long clips

From Python, `evaluate(config, checkpoint=..., split=...)` or, with weights in memory,
`evaluate(config, model=model, dataset=eval_split)` returns the same flat dict of metrics.

Data: a split of the config's prepared dataset (TFDS records, `data.eval_split`), or a plain
folder of audio files with a captions CSV: Clotho's layout (`file_name,caption_1..caption_N`,
other columns ignored; file names may hold sub-folders, relative to `audio_dir`, default the
CSV's folder) or AudioCaps' (`audiocap_id,youtube_id,start_time,caption`, files found as the
prepare step finds them). Unreadable files are skipped and reported; the clips evaluated are
listed in the results. Clips longer than the crop follow `data.eval_crop` (`--eval_crop`):
'head', 'center', or 'windows' every `data.window_hop_seconds` pooled per clip
(docs/method.md section 9).

Each modality is encoded once (per-level features and factors cached), then every (clip,
caption) pair is scored in tiles of `config.eval_tile` x `config.eval_tile`, the clips of a tile
split over all devices (`retrieval.Encoder`). Results in `--out`: `metrics.json` (metrics,
their jackknife 95% half-widths, the tie rule, the checkpoint and the list of clips) and
`dcase_top10.csv` (DCASE retrieval submission format: `caption,fname_1..fname_10`).
With `shortlists`, the text-to-audio metrics of two-stage search (global-cosine shortlist of S
clips, re-ranked by the full score) are reported next to the exhaustive ones, with the recall
each shortlist loses.

Several hosts (a TPU slice, GPU nodes): run the same command on every host, with
--coordinator_address/--num_processes/--process_id or their environment variables (see
hade_jax/distributed.py). Every process reads the whole evaluation set (the data and the
checkpoint must be readable on every host); the weights are replicated and each encoder batch
and score tile is split over all devices of all hosts; process 0 writes the results.

Legend: A: clips, T: captions, S: samples, M: words, D: joint width.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import json
import logging
import os
import pathlib
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
import soundfile
from absl import flags
from jax.sharding import Mesh

from data_pipelines import policy, readers
from hade_jax import (
  api,
  checkpoints,
  cli,
  data,
  distributed,
  evaluator,
  hade,
  host_memory,
  metrics,
  paths,
  tokenizer,
)

log = logging.getLogger("hade_jax.eval")


# ---------------------------------------------------------------------------------------------
# A plain folder of audio + a captions CSV as an evaluation split.


@dataclasses.dataclass(frozen=True)
class FolderClip:
  name: str  # the CSV's file name (Clotho) or clip id (AudioCaps): what results list
  path: pathlib.Path
  captions: list[str]


def read_folder_clips(csv_path: str | os.PathLike, audio_dir: str | os.PathLike | None = None,
                      *, allow_symlinks_outside: bool = False
                      ) -> tuple[list[FolderClip], list[readers.Issue]]:
  """The clips of a captions CSV whose audio is readable, and the issues of the others.

  Args:
    csv_path: the captions CSV (Clotho or AudioCaps layout).
    audio_dir: the audio folder (default: the CSV's folder); every clip must lie inside it.
    allow_symlinks_outside: accept audio reached through symlinks that leave `audio_dir`.

  Raises:
    readers.DataError: the CSV is unreadable or has neither layout, or no clip has audio.
    paths.PathOutsideError: a CSV entry names an absolute path or one outside `audio_dir`
      (the message gives the CSV line).
  """
  csv_path = pathlib.Path(csv_path).expanduser().absolute()
  audio_dir = pathlib.Path(audio_dir).expanduser().absolute() if audio_dir else csv_path.parent
  if not csv_path.is_file():
    raise readers.DataError(f"no captions CSV at {csv_path}")
  if not audio_dir.is_dir():
    raise readers.DataError(f"no audio folder at {audio_dir} (for {csv_path})")
  report = readers.Report()
  header, _ = readers.read_csv(csv_path, report=report)
  is_audiocaps = "youtube_id" in header
  reader = readers.read_audiocaps_captions if is_audiocaps else readers.read_clotho_captions
  entries = reader(csv_path, report=report)
  direct, rest = [], []
  def inside(name: str, entry: readers.ClipEntry) -> pathlib.Path:
    return paths.resolve_inside(audio_dir, name, what=f"{csv_path} line {entry.line}",
                                allow_symlinks_outside=allow_symlinks_outside)

  for entry in entries:
    # Clotho-style names may carry sub-folders (`audio_32k/clotho_eval/x.flac`).
    path = inside(entry.file_name, entry) if entry.file_name else None
    if path is not None and path.is_file():
      entry.audio_path = str(path)
      direct.append(entry)
    else:
      rest.append(entry)
  if rest:  # the prepare step's file-name quirks (DCASE ':' -> '_', other extensions, ...)
    direct += readers.resolve_audio(rest, readers.AudioFolder(audio_dir), report,
                                    dataset="audiocaps" if is_audiocaps else "clotho")
  order = {id(e): i for i, e in enumerate(entries)}
  clips = []
  for entry in sorted(direct, key=lambda e: order[id(e)]):
    inside(os.path.relpath(entry.audio_path, audio_dir), entry)  # a name resolve_audio found
    try:
      info = soundfile.info(entry.audio_path)
      if info.frames == 0:
        raise ValueError("zero audio frames")
    except (soundfile.LibsndfileError, RuntimeError, OSError, ValueError) as e:
      report.add(readers.Issue("unreadable", entry.audio_path, None,
                               f"{type(e).__name__}: {e}; clip skipped", clip=entry.clip_id))
      continue
    clips.append(FolderClip(entry.file_name or entry.clip_id, pathlib.Path(entry.audio_path),
                            list(entry.captions)))
  if not clips:
    raise readers.DataError(
        f"none of the {len(entries)} clips of {csv_path} has readable audio under {audio_dir}" +
        ("\n" + readers.format_issues(report.issues, "issues:") if report.issues else ""))
  return clips, report.issues


def folder_split(csv_path: str | os.PathLike, config: ml_collections.ConfigDict,
                 cfg: hade.HadeConfig, *, audio_dir: str | os.PathLike | None = None,
                 max_clips: int = 0, num_threads: int = 4
                 ) -> tuple[data.EvalSplit, list[readers.Issue]]:
  """A folder + captions CSV as an `EvalSplit`, cropped and tokenised as `config` says.

  Audio is decoded batch by batch when `audio_batches()` runs (an eval split of 30 s clips
  would not fit in memory decoded), each clip as `api.load_audio` makes it.
  """
  clips, issues = read_folder_clips(csv_path, audio_dir)
  if max_clips:
    clips = clips[:max_clips]
  d = config.data
  num_samples = int(round(d.crop_seconds * cfg.mel.sample_rate))
  settings = {"sample_rate": cfg.mel.sample_rate, "num_samples": num_samples,
              "crop": d.eval_crop, "pad_mode": d.pad_mode,
              "window_hop": policy.hop_samples(num_samples, d.get("window_hop_seconds", 0.0),
                                               cfg.mel.sample_rate)}
  policy.check_crop_policy(d.eval_crop, d.pad_mode)
  batch_size = int(config.eval_batch_size)
  tok = tokenizer.Tokenizer(pathlib.Path(d.tokenizer_dir).expanduser(), d.max_text_len)
  texts = [c for clip in clips for c in clip.captions]
  caption_clip = np.repeat(np.arange(len(clips)), [len(clip.captions) for clip in clips])
  ids_TxM, mask_TxM = tok(texts)

  def audio_batches():
    # Rows of `batch_size` windows (one per clip unless eval_crop is 'windows'), each with its
    # clip and window number; the last batch is padded with invalid rows.
    rows = []
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
      for start in range(0, len(clips), batch_size):
        chunk = clips[start:start + batch_size]
        for i, wave in enumerate(pool.map(lambda c: api.load_audio(c.path, **settings), chunk),
                                 start):
          rows += [(i, w, x) for w, x in enumerate(np.reshape(wave, (-1, num_samples)))]
        while len(rows) >= batch_size or (rows and start + batch_size >= len(clips)):
          yield _rows_batch(rows[:batch_size], batch_size)
          rows = rows[batch_size:]

  split = data.EvalSplit(audio_batches, ids_TxM, mask_TxM, caption_clip.astype(np.int64),
                         np.arange(len(clips)), [c.name for c in clips], texts)
  return split, issues


def _rows_batch(rows: list, batch_size: int) -> dict:
  """{audio [B, S], clip_id, window_index, valid} of (clip, window, wave) rows, padded to B."""
  n = len(rows)
  rows = rows + [rows[-1]] * (batch_size - n)
  return {"audio": np.stack([x for _, _, x in rows]),
          "clip_id": np.array([c for c, _, _ in rows]),
          "window_index": np.array([w for _, w, _ in rows]),
          "valid": np.arange(batch_size) < n}


def prepared_split(config: ml_collections.ConfigDict, cfg: hade.HadeConfig, split: str, *,
                   max_clips: int = 0) -> data.EvalSplit:
  """A split of the config's prepared (TFDS) dataset; the train split need not exist."""
  source = data.Dataset(data.input_config(config, cfg), splits={})
  return data.eval_split(config, source, split, max_clips=max_clips)


# ---------------------------------------------------------------------------------------------
# Evaluation.


def evaluate(config: ml_collections.ConfigDict | None = None, *,
             checkpoint: str | os.PathLike | None = None, which: str = "best",
             split: str | None = None, csv_path: str | os.PathLike | None = None,
             audio_dir: str | os.PathLike | None = None, model: hade.HadeModel | None = None,
             dataset: data.EvalSplit | None = None, out_dir: str | os.PathLike | None = None,
             true_recall: bool = False, intervals: bool = True, shortlists: Sequence[int] = (),
             max_clips: int = 0, save_scores: bool = False, mesh: Mesh | None = None
             ) -> dict[str, float]:
  """Retrieval metrics of a model on an evaluation set (docs/method.md section 8).

  Args:
    config: the training config (model, data.* for tokenizer/crop/dataset, eval_batch_size,
      eval_tile). Default: the one saved with `checkpoint`.
    checkpoint: a workdir, checkpoints folder or step folder (`checkpoints.step_dir`).
    which: for a workdir, 'best' or 'last'.
    split: a split of the config's prepared dataset (default `config.data.test_split`).
    csv_path: a captions CSV instead (see the module docstring), audio under `audio_dir`.
    audio_dir: the audio folder of `csv_path` (default: the CSV's folder).
    model: weights in memory instead of `checkpoint`.
    dataset: an `data.EvalSplit` in memory instead of `split` / `csv_path`.
    out_dir: where `metrics.json`, `dcase_top10.csv` (and `scores.npy`) go; None = nowhere.
    true_recall: also the DCASE 2023 "true recall" A2T variant ('a2t/trueR@k').
    intervals: jackknife 95% half-widths ('<metric>/ci95').
    shortlists: two-stage shortlist sizes to measure (see `evaluator.split_metrics`).
    max_clips: evaluate the first N clips only (0 = all).
    save_scores: also write the [A, T] score matrix.
    mesh: devices to shard over (default: all).

  Returns:
    The flat metrics dict ('t2a/R@1', ..., 'a2t/mAP@10', 't2a/median_rank', ...).
  """
  step_dir = None
  if model is None:
    if checkpoint is None:
      raise ValueError("evaluate needs a checkpoint (or a model in memory)")
    model, config, step_dir = api.load_model(checkpoint, config, which=which, mesh=mesh)
  if config is None:
    raise ValueError("evaluate with a model in memory needs its config")
  cfg = model.cfg
  issues: list[readers.Issue] = []
  if dataset is not None:
    described = "in-memory dataset"
  elif csv_path is not None:
    dataset, issues = folder_split(csv_path, config, cfg, audio_dir=audio_dir,
                                   max_clips=max_clips)
    described = f"{pathlib.Path(csv_path).absolute()} (audio: "
    described += f"{pathlib.Path(audio_dir or pathlib.Path(csv_path).parent).absolute()})"
  else:
    split = split or config.data.test_split
    dataset = prepared_split(config, cfg, split, max_clips=max_clips)
    described = f"{config.data.dataset}/{data.builder_config_name(config)} split {split!r}"
  if issues:
    log.warning("%s", readers.format_issues(issues, f"{len(issues)} clip(s) not evaluated:"))

  scored = evaluator.RetrievalEvaluator.from_config(
      config, mesh=mesh, true_recall=true_recall, intervals=intervals,
      shortlists=shortlists).evaluate(model, dataset)
  result, scores_AxT = scored.metrics, scored.scores_AxT
  if out_dir is not None and jax.process_index() == 0:
    write_results(out_dir, result, dataset, scores_AxT, checkpoint=step_dir, described=described,
                  issues=issues, save_scores=save_scores)
  return result


def write_results(out_dir: str | os.PathLike, result: dict[str, float], split: data.EvalSplit,
                  scores_AxT: np.ndarray, *, checkpoint: pathlib.Path | None, described: str,
                  issues: Sequence[readers.Issue] = (), save_scores: bool = False) -> None:
  """metrics.json (+ clip list, tie rule, checkpoint), dcase_top10.csv, optional scores.npy."""
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  record = {
      "checkpoint": str(checkpoint) if checkpoint else None,
      "step": int(checkpoint.name) if checkpoint and checkpoint.name.isdigit() else None,
      "data": described,
      "num_clips": len(split.clip_names),
      "num_captions": len(split.caption_clip),
      "tie_rule": metrics.TIE_RULE,
      "top10_order": metrics.TOP_K_ORDER,
      "metrics": result,
      "clips": list(split.clip_names),
      "not_evaluated": [i.to_json() for i in issues],
  }
  (out_dir / "metrics.json").write_text(json.dumps(record, indent=2))
  write_dcase_csv(out_dir / "dcase_top10.csv", scores_AxT, split.texts, split.clip_names)
  if save_scores:
    np.save(out_dir / "scores.npy", scores_AxT)


def write_dcase_csv(path: str | os.PathLike, scores_AxT: np.ndarray, captions: Sequence[str],
                    clip_names: Sequence[str], k: int = 10) -> None:
  """The DCASE retrieval submission CSV: `caption,fname_1,...,fname_k`, one row per caption."""
  top_TxK = metrics.top_k_clips(scores_AxT, k)
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(["caption"] + [f"fname_{i + 1}" for i in range(top_TxK.shape[1])])
    for caption, row in zip(captions, top_TxK, strict=True):
      writer.writerow([caption] + [clip_names[i] for i in row])


def summary(result: dict[str, float], shortlists: Sequence[int] = ()) -> str:
  """The console report: the metrics table, the tie rule, the global cosine's own T2A ranking
  and two-stage recall lost."""
  lines = [metrics.format_table(result), f"tie rule: {metrics.TIE_RULE}"]
  if "a2t/trueR@1" in result:
    lines.append("A2T true recall (DCASE 2023) R@1/5/10: " + " / ".join(
        f"{result[f'a2t/trueR@{k}']:.2f}" for k in metrics.KS))
  if "global/t2a/R@1" in result:  # what the two-stage shortlist ranks by
    lines.append("global cosine alone, T2A R@1/5/10, mAP@10: " + " / ".join(
        f"{result[f'global/t2a/{name}']:.2f}" for name in ("R@1", "R@5", "R@10", "mAP@10")))
  for s in shortlists:
    cells = [f"{name} {result[f'two_stage@{s}/t2a/{name}']:.2f} "
             f"(lost {result[f'two_stage@{s}/t2a/{name}/lost']:.2f})"
             for name in ("R@1", "R@5", "R@10", "mAP@10")]
    lines.append(f"two-stage T2A, shortlist {s}: " + ", ".join(cells))
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line.


def define_flags(fv: flags.FlagValues) -> None:
  cli.define_model_flags(fv, required=True)
  flags.DEFINE_string("split", "", "Split of the config's prepared dataset (default "
                      "data.test_split).", flag_values=fv)
  flags.DEFINE_string("csv", "", "Captions CSV of a plain audio folder.", flag_values=fv)
  flags.DEFINE_string("audio_dir", "", "Audio folder of --csv (default: its folder).",
                      flag_values=fv)
  flags.DEFINE_string("out", "", "Results folder (default: <workdir>/eval/<data>_step<N>).",
                      flag_values=fv)
  flags.DEFINE_bool("true_recall", False, "Also DCASE 2023 A2T recall.", flag_values=fv)
  flags.DEFINE_bool("no_intervals", False, "Skip jackknife intervals.", flag_values=fv)
  flags.DEFINE_list("shortlists", [], "Two-stage shortlist sizes, e.g. 10,50.", flag_values=fv)
  flags.DEFINE_integer("max_clips", 0, "First N clips only.", lower_bound=0, flag_values=fv)
  flags.DEFINE_bool("save_scores", False, "Also write scores.npy.", flag_values=fv)
  flags.DEFINE_enum("eval_crop", None, list(policy.EVAL_CROPS), "Clips longer than the crop: "
                    "the config's data.eval_crop instead ('windows': every window encoded, "
                    "pooled per clip).", flag_values=fv)
  flags.DEFINE_float("window_hop_seconds", None, "With 'windows': seconds between window "
                     "starts (data.window_hop_seconds; 0 = the crop).", flag_values=fv)
  cli.define_distributed_flags(fv)


def crop_config(config: ml_collections.ConfigDict | None, step_dir: pathlib.Path,
                crop: str | None, hop_seconds: float | None) -> ml_collections.ConfigDict | None:
  """`config` (default: the checkpoint's) with data.eval_crop / data.window_hop_seconds set."""
  if crop is None and hop_seconds is None:
    return config
  if config is None:
    config = ml_collections.ConfigDict(checkpoints.saved_config(step_dir))
  with config.unlocked():  # a checkpoint saved before window_hop_seconds existed lacks it
    if crop is not None:
      config.data.eval_crop = crop
    if hop_seconds is not None:
      config.data.window_hop_seconds = float(hop_seconds)
  return config


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
  """Evaluates as the command line says (argv without the program name); returns the metrics."""
  fv, rest = cli.parse(define_flags, argv, doc=__doc__, prog="python -m hade_jax.eval")
  if rest:
    raise cli.UsageError(f"unexpected arguments: {rest}")
  if fv.split and fv.csv:
    raise cli.UsageError("give --split or --csv, not both")
  try:
    shortlists = [int(s) for s in fv.shortlists]
  except ValueError:
    raise cli.UsageError(f"--shortlists={','.join(fv.shortlists)}: expected whole numbers, "
                         "e.g. 10,50") from None
  cli.setup_logging()
  # Every process runs this same command; they share the device work, process 0 writes.
  cli.start_distributed(fv)
  config = cli.model_config(fv)
  host_memory.keep_freed_pages()  # the scoring's tiles reuse their pages (host_memory.py)
  step_dir = checkpoints.step_dir(fv.checkpoint, fv.which)
  config = crop_config(config, step_dir, fv.eval_crop, fv.window_hop_seconds)
  out = fv.out
  if not out:
    name = pathlib.Path(fv.csv).stem if fv.csv else (fv.split or "test")
    out = step_dir.parent.parent / "eval" / f"{name}_step{step_dir.name}"
  result = evaluate(config, checkpoint=step_dir, split=fv.split or None,
                    csv_path=fv.csv or None, audio_dir=fv.audio_dir or None, out_dir=out,
                    true_recall=fv.true_recall, intervals=not fv.no_intervals,
                    shortlists=shortlists, max_clips=fv.max_clips,
                    save_scores=fv.save_scores)
  if distributed.is_main_process():
    print(summary(result, shortlists))
    print(f"results: {out}")
  return result


def run() -> None:
  """The console script (setup.py); the same as `python -m` of this module."""
  cli.main_entry(main)


if __name__ == "__main__":
  run()
