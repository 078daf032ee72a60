"""How the evaluation crop of long clips changes retrieval: head vs center vs windows.

  python -m tools.long_audio --checkpoint=/tmp/hade_demo \
      --csv=../shared/data/clotho_eval7/clotho_captions_evaluation.csv \
      --audio_dir=../shared/data/clotho_eval7/evaluation --readme=README.md

Evaluates ONE model on one captions CSV once per crop policy ('head', 'center', 'windows' with
hops of the crop and half the crop), writes tools/results/long_audio.json and, with --readme,
fills the README's `long_audio` table from it (`tools.markdown`).
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

from absl import app, flags

from data_pipelines import policy
from tools import markdown

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Workdir or step folder.", required=True)
_CSV = flags.DEFINE_string("csv", None, "Captions CSV.", required=True)
_AUDIO_DIR = flags.DEFINE_string("audio_dir", "", "Audio folder of --csv.")
_OUT = flags.DEFINE_string("out", "tools/results/long_audio.json", "Results JSON.")
_README = flags.DEFINE_string("readme", "", "Markdown file whose long_audio table is filled.")

METRICS = ("t2a/R@1", "t2a/R@5", "t2a/mAP@10", "a2t/R@1", "a2t/R@5", "a2t/mAP@10")


def crops(crop_seconds: float) -> list[tuple[str, str, float]]:
  """(label, eval_crop, window_hop_seconds) of every policy measured."""
  out = [(c, c, 0.0) for c in policy.EVAL_CROPS if c != "windows"]
  return out + [(f"windows, hop {h:g} s", "windows", h)
                for h in (crop_seconds, crop_seconds / 2)]


def measure() -> dict:
  from hade_jax import checkpoints, eval  # lazily: JAX

  step_dir = checkpoints.step_dir(_CHECKPOINT.value, "best")
  crop_seconds = float(checkpoints.saved_config(step_dir)["data"]["crop_seconds"])
  rows = []
  for label, crop, hop in crops(crop_seconds):
    config = eval.crop_config(None, step_dir, crop, hop)
    t0 = time.perf_counter()
    result = eval.evaluate(config, checkpoint=step_dir, csv_path=_CSV.value,
                           audio_dir=_AUDIO_DIR.value or None, intervals=True)
    rows.append({"policy": label, "eval_crop": crop, "window_hop_seconds": hop,
                 "seconds": time.perf_counter() - t0,
                 "metrics": {k: v for k, v in result.items() if k in METRICS
                             or k.removesuffix("/ci95") in METRICS}})
  return {"checkpoint": str(step_dir), "csv": str(pathlib.Path(_CSV.value).absolute()),
          "crop_seconds": crop_seconds, "rows": rows}


def long_audio_table(results: dict) -> str:
  def cell(m, k):
    ci = m.get(f"{k}/ci95")
    return f"{m[k]:.1f}" + (f" ± {ci:.1f}" if ci is not None else "")

  return markdown.table(["eval crop", *METRICS],
                        [[r["policy"], *(cell(r["metrics"], k) for k in METRICS)]
                         for r in results["rows"]])


def main(argv) -> None:
  del argv
  results = measure()
  out = pathlib.Path(_OUT.value)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(results, indent=1))
  table = long_audio_table(results)
  sys.stdout.write(table)
  if _README.value:
    path = pathlib.Path(_README.value)
    path.write_text(markdown.fill(path.read_text(), {"long_audio": table}, str(path)))


if __name__ == "__main__":
  app.run(main)
