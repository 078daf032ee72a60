"""Evaluation of a checkpoint with the metrics the field reports (HADE.md section 8).

  python -m hade_jax.eval --workdir=/tmp/hade_demo --split=test
  python -m hade_jax.eval --checkpoint=WD/best/480 --csv=captions.csv --audio_dir=audio/ \
      --out=/tmp/eval --true_recall --shortlists=10,50

From Python, `evaluate(config, checkpoint=..., split=...)` or, with weights in memory,
`evaluate(config, model=model, dataset=eval_split)` returns the same flat dict of metrics.

Data: a split of the config's prepared dataset (TFDS records, `data.eval_split`), or a plain
folder of audio files with a captions CSV: Clotho's layout (`file_name,caption_1..caption_N`,
other columns ignored; file names may hold sub-folders, relative to `audio_dir`, default the
CSV's folder) or AudioCaps' (`audiocap_id,youtube_id,start_time,caption`, files found as the
prepare step finds them). Unreadable files are skipped and reported; the clips evaluated are
listed in the results.

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

import argparse
import ast
import concurrent.futures
import csv
import dataclasses
import importlib.util
import json
import logging
import os
import pathlib
import sys
import time
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
import soundfile
from jax.sharding import Mesh

from data_pipelines import readers
from hade_jax import api, checkpoints, data, distributed, hade, metrics, retrieval, tokenizer
from hade_jax import heads as hade_heads

log = logging.getLogger("hade_jax.eval")


# ---------------------------------------------------------------------------------------------
# A plain folder of audio + a captions CSV as an evaluation split.


@dataclasses.dataclass(frozen=True)
class FolderClip:
  name: str  # the CSV's file name (Clotho) or clip id (AudioCaps): what results list
  path: pathlib.Path
  captions: list[str]


def read_folder_clips(csv_path: str | os.PathLike, audio_dir: str | os.PathLike | None = None
                      ) -> tuple[list[FolderClip], list[readers.Issue]]:
  """The clips of a captions CSV whose audio is readable, and the issues of the others.

  Raises:
    readers.DataError: the CSV is unreadable or has neither layout, or no clip has audio.
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
  for entry in entries:
    # Clotho-style names may carry sub-folders (`audio_32k/clotho_eval/x.flac`).
    path = audio_dir / entry.file_name if entry.file_name else None
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
  settings = {"sample_rate": cfg.mel.sample_rate,
              "num_samples": int(round(d.crop_seconds * cfg.mel.sample_rate)),
              "crop": d.eval_crop, "pad_mode": d.pad_mode}
  api.check_crop_policy(d.eval_crop, d.pad_mode)
  batch_size = int(config.eval_batch_size)
  tok = tokenizer.Tokenizer(pathlib.Path(d.tokenizer_dir).expanduser(), d.max_text_len)
  texts = [c for clip in clips for c in clip.captions]
  caption_clip = np.repeat(np.arange(len(clips)), [len(clip.captions) for clip in clips])
  ids_TxM, mask_TxM = tok(texts)

  def audio_batches():
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
      for start in range(0, len(clips), batch_size):
        chunk = clips[start:start + batch_size]
        waves = list(pool.map(lambda c: api.load_audio(c.path, **settings), chunk))
        n = len(waves)
        waves += [waves[-1]] * (batch_size - n)
        yield {"audio": np.stack(waves), "clip_id": np.arange(start, start + batch_size),
               "valid": np.arange(batch_size) < n}

  split = data.EvalSplit(audio_batches, ids_TxM, mask_TxM, caption_clip.astype(np.int64),
                         np.arange(len(clips)), [c.name for c in clips], texts)
  return split, issues


def prepared_split(config: ml_collections.ConfigDict, cfg: hade.HadeConfig, split: str, *,
                   max_clips: int = 0) -> data.EvalSplit:
  """A split of the config's prepared (TFDS) dataset; the train split need not exist."""
  source = data.Dataset(data.input_config(config, cfg), splits={})
  return data.eval_split(config, source, split, max_clips=max_clips)


# ---------------------------------------------------------------------------------------------
# Evaluation.


@dataclasses.dataclass
class Scored:
  """Everything an evaluation computed, for callers that want more than the metrics."""

  scores_AxT: np.ndarray
  global_AxT: np.ndarray  # cosine of the global embeddings (the two-stage shortlist's score)
  split: data.EvalSplit
  metrics: dict[str, float]


def score_split(model: hade.HadeModel, split: data.EvalSplit, *, batch_size: int, tile: int,
                mesh: Mesh | None = None) -> tuple[np.ndarray, np.ndarray]:
  """([A, T] full scores, [A, T] global cosines) of every clip and caption of a split."""
  enc = retrieval.Encoder(model, mesh)
  t0 = time.perf_counter()
  audio = enc.audio_batches(split.audio_batches(), split.clip_ids)
  t1 = time.perf_counter()
  text = enc.text(split.input_ids, split.attention_mask, batch_size)
  t2 = time.perf_counter()
  scores_AxT = enc.score(audio, text, tile=tile)
  t3 = time.perf_counter()
  log.info("encoded %d clips in %.1f s, %d captions in %.1f s; scored %d pairs in %.1f s "
           "(tiles of %d, %d devices)", len(split.clip_ids), t1 - t0, len(split.caption_clip),
           t2 - t1, scores_AxT.size, t3 - t2, tile, enc.num_devices)
  global_AxT = (np.asarray(hade_heads.normalize(audio.global_AxD))
                @ np.asarray(hade_heads.normalize(text.global_TxD)).T)
  return scores_AxT, global_AxT


def split_metrics(scores_AxT: np.ndarray, global_AxT: np.ndarray, caption_clip_T: np.ndarray,
                  *, true_recall: bool = False, intervals: bool = True,
                  shortlists: Sequence[int] = ()) -> dict[str, float]:
  """The flat metrics dict: `metrics.retrieval_metrics` plus, per shortlist size S,
  'two_stage@S/t2a/<metric>' and 'two_stage@S/t2a/<metric>/lost' (exhaustive minus two-stage)."""
  out = metrics.retrieval_metrics(scores_AxT, caption_clip_T, true_recall=true_recall,
                                  intervals=intervals)
  for s in shortlists:
    ranks_T = metrics.two_stage_t2a_ranks(scores_AxT, global_AxT, caption_clip_T, int(s))
    for name, value in metrics.t2a_from_ranks(ranks_T).items():
      out[f"two_stage@{s}/t2a/{name}"] = value
      out[f"two_stage@{s}/t2a/{name}/lost"] = out[f"t2a/{name}"] - value
  return out


def evaluate(config: ml_collections.ConfigDict | None = None, *,
             checkpoint: str | os.PathLike | None = None, which: str = "best",
             split: str | None = None, csv_path: str | os.PathLike | None = None,
             audio_dir: str | os.PathLike | None = None, model: hade.HadeModel | None = None,
             dataset: data.EvalSplit | None = None, out_dir: str | os.PathLike | None = None,
             true_recall: bool = False, intervals: bool = True, shortlists: Sequence[int] = (),
             max_clips: int = 0, save_scores: bool = False, mesh: Mesh | None = None
             ) -> dict[str, float]:
  """Retrieval metrics of a model on an evaluation set (HADE.md section 8).

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
    shortlists: two-stage shortlist sizes to measure (see `split_metrics`).
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

  scores_AxT, global_AxT = score_split(model, dataset, batch_size=int(config.eval_batch_size),
                                       tile=int(config.eval_tile), mesh=mesh)
  result = split_metrics(scores_AxT, global_AxT, dataset.caption_clip, true_recall=true_recall,
                         intervals=intervals, shortlists=shortlists)
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
  """The console report: the metrics table, the tie rule and two-stage recall lost."""
  lines = [metrics.format_table(result), f"tie rule: {metrics.TIE_RULE}"]
  if "a2t/trueR@1" in result:
    lines.append("A2T true recall (DCASE 2023) R@1/5/10: " + " / ".join(
        f"{result[f'a2t/trueR@{k}']:.2f}" for k in metrics.KS))
  for s in shortlists:
    cells = [f"{name} {result[f'two_stage@{s}/t2a/{name}']:.2f} "
             f"(lost {result[f'two_stage@{s}/t2a/{name}/lost']:.2f})"
             for name in ("R@1", "R@5", "R@10", "mAP@10")]
    lines.append(f"two-stage T2A, shortlist {s}: " + ", ".join(cells))
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line.


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """`path/to/config.py[:arg]` -> its `get_config(arg)`, as `--config` of hade_jax.train."""
  path, _, arg = spec.partition(":")
  file = pathlib.Path(path).expanduser()
  if not file.is_file():
    raise FileNotFoundError(f"no config file at {file} (from --config={spec})")
  module_spec = importlib.util.spec_from_file_location(f"_hade_config_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
  """`key.sub=value` strings (values as Python literals, else strings) set on `config`."""
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep:
      raise ValueError(f"--set {item!r}: expected key=value")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    target = config
    *path, leaf = key.strip().split(".")
    for part in path:
      target = target[part]
    if leaf not in target:
      raise KeyError(f"--set {item!r}: the config has no field {key!r}")
    target[leaf] = value


def model_config_for(args: argparse.Namespace) -> ml_collections.ConfigDict | None:
  """The config of --config / --set, or the checkpoint's own with --set applied (None: the
  checkpoint's own, unchanged)."""
  if args.config:
    config = load_config_file(args.config)
  elif args.set:
    config = ml_collections.ConfigDict(checkpoints.saved_config(
        checkpoints.step_dir(args.checkpoint, args.which)))
  else:
    return None
  apply_overrides(config, args.set)
  return config


def add_model_flags(parser: argparse.ArgumentParser, required: bool = True) -> None:
  parser.add_argument("--checkpoint", "--workdir", dest="checkpoint", required=required,
                      help="training workdir (its best step), checkpoints folder or step folder")
  parser.add_argument("--which", default="best", choices=("best", "last"),
                      help="for a workdir: the best validation step or the last step")
  parser.add_argument("--config", default="",
                      help="config file[:arg] (default: the config saved with the checkpoint)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override, e.g. --set eval_tile=128 (repeatable)")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m hade_jax.eval", description=__doc__.split(
      "\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  add_model_flags(parser)
  parser.add_argument("--split", default="",
                      help="split of the config's prepared dataset (default data.test_split)")
  parser.add_argument("--csv", default="", help="captions CSV of a plain audio folder")
  parser.add_argument("--audio_dir", default="", help="audio folder of --csv (default: its "
                      "folder)")
  parser.add_argument("--out", default="", help="results folder (default: "
                      "<workdir>/eval/<data>_step<N>)")
  parser.add_argument("--true_recall", action="store_true", help="also DCASE 2023 A2T recall")
  parser.add_argument("--no_intervals", action="store_true", help="skip jackknife intervals")
  parser.add_argument("--shortlists", default="", help="two-stage shortlist sizes, e.g. 10,50")
  parser.add_argument("--max_clips", type=int, default=0, help="first N clips only")
  parser.add_argument("--save_scores", action="store_true", help="also write scores.npy")
  distributed.add_argparse_flags(parser)
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
  args = parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                      force=True)  # a library may have configured the root logger on import
  if args.split and args.csv:
    raise SystemExit("give --split or --csv, not both")
  # Every process runs this same command; they share the device work, process 0 writes.
  distributed.initialize_from_args(args)
  config = model_config_for(args)
  shortlists = [int(s) for s in args.shortlists.split(",") if s.strip()]
  step_dir = checkpoints.step_dir(args.checkpoint, args.which)
  out = args.out
  if not out:
    name = pathlib.Path(args.csv).stem if args.csv else (args.split or "test")
    out = step_dir.parent.parent / "eval" / f"{name}_step{step_dir.name}"
  result = evaluate(config, checkpoint=step_dir, split=args.split or None,
                    csv_path=args.csv or None, audio_dir=args.audio_dir or None, out_dir=out,
                    true_recall=args.true_recall, intervals=not args.no_intervals,
                    shortlists=shortlists, max_clips=args.max_clips,
                    save_scores=args.save_scores)
  if distributed.is_main_process():
    print(summary(result, shortlists))
    print(f"results: {out}")
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
