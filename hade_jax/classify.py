"""Zero-shot classification of audio files with a trained HADE (`api.Hade.classify`).

  python -m hade_jax.classify --model=/tmp/hade_demo --labels=dog,rain,siren a.wav b.flac
  python -m hade_jax.classify --model=RUN --labels_file=classes.txt --top_k=3 --json clips/*.wav

--model is a training workdir (its best step; --which=last for the last), a checkpoints folder
or a step folder. Labels come from --labels (comma-separated) or --labels_file (one label per
line); templates from --templates_file (one per line, each with one `{}` where the label goes)
or the defaults of `hade_jax.zero_shot.DEFAULT_TEMPLATES`. Blank lines of both files are
skipped. Each label's score is the mean over the templates of the full HADE score (see
hade_jax/zero_shot.py for why the scores and not the embeddings are averaged); the probability
is the softmax over the labels with the model's trained temperature.

Output: per audio file, its top_k labels best first (rank, score, probability, label); with
--json, one JSON document {"model", "templates", "results": [{"audio", "labels": [{"label",
"score", "probability"}, ...]}, ...]}. Errors: one line on stderr, exit status 2 for the
command line (no labels, a missing audio file or labels/templates file, a bad template) and 1
for failures while running (an unreadable audio file, a damaged checkpoint).
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Sequence

from absl import flags

from hade_jax import cli, zero_shot


def define_flags(fv: flags.FlagValues) -> None:
  cli.define_model_flags(fv, required=False)
  flags.DEFINE_alias("model", "checkpoint", flag_values=fv)
  flags.DEFINE_list("labels", [], "Class labels, comma-separated (or --labels_file).",
                    flag_values=fv)
  flags.DEFINE_string("labels_file", "", "A text file with one class label per line.",
                      flag_values=fv)
  flags.DEFINE_string("templates_file", "", "A text file with one prompt template per line, "
                      "each with one {} for the label (default: hade_jax.zero_shot's list).",
                      flag_values=fv)
  flags.DEFINE_integer("top_k", 5, "Labels printed per audio file (0 = all).", lower_bound=0,
                       flag_values=fv)
  flags.DEFINE_bool("json", False, "Print one JSON document instead of the table.",
                    flag_values=fv)
  cli.define_distributed_flags(fv)


def read_lines(path: str, flag: str) -> list[str]:
  """The non-blank lines of a text file (stripped), or a UsageError naming the flag."""
  file = pathlib.Path(path).expanduser()
  if not file.is_file():
    raise cli.UsageError(f"{flag}={path}: no such file (from {os.getcwd()})")
  try:
    text = file.read_text(encoding="utf-8")
  except (OSError, UnicodeDecodeError) as e:
    raise cli.UsageError(f"{flag}={path}: cannot be read as UTF-8 text ({e})") from None
  return [line.strip() for line in text.splitlines() if line.strip()]


def parse_inputs(fv: flags.FlagValues, audio: Sequence[str]
                 ) -> tuple[list[str], list[str], list[str]]:
  """(labels, templates, audio paths) of the command line, checked before any model loads."""
  if not fv.checkpoint:
    raise cli.UsageError("--model is required: a training workdir, checkpoints folder or step "
                         "folder (see --help)")
  if fv.labels and fv.labels_file:
    raise cli.UsageError("give --labels or --labels_file, not both")
  if fv.labels_file:
    labels = read_lines(fv.labels_file, "--labels_file")
  else:
    labels = [x.strip() for x in fv.labels]
  templates = (read_lines(fv.templates_file, "--templates_file") if fv.templates_file
               else list(zero_shot.DEFAULT_TEMPLATES))
  where = f" in {fv.templates_file}" if fv.templates_file else ""
  try:
    labels = zero_shot.check_labels(labels)
  except ValueError as e:
    raise cli.UsageError(f"{e} (--labels=a,b,c or --labels_file=FILE)") from None
  try:
    templates = zero_shot.check_templates(templates)
  except ValueError as e:
    raise cli.UsageError(f"{e}{where}") from None
  if not audio:
    raise cli.UsageError("no audio: give one or more audio files after the flags")
  missing = [a for a in audio if not pathlib.Path(a).expanduser().is_file()]
  if missing:
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise cli.UsageError(f"no audio file {missing[0]}{more} (from {os.getcwd()})")
  return labels, templates, list(audio)


def as_json(step_dir: str, templates: Sequence[str], audio: Sequence[str],
            ranked: list[list[zero_shot.LabelScore]]) -> dict:
  return {"model": step_dir, "templates": list(templates),
          "results": [{"audio": a, "labels": [{"label": s.label, "score": s.score,
                                               "probability": s.probability} for s in r]}
                      for a, r in zip(audio, ranked, strict=True)]}


def format_table(audio: Sequence[str], ranked: list[list[zero_shot.LabelScore]]) -> str:
  lines = []
  for a, r in zip(audio, ranked, strict=True):
    lines.append(a)
    lines += [f"{i + 1:4d}  {s.score:9.4f}  {s.probability:7.4f}  {s.label}"
              for i, s in enumerate(r)]
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
  """Classifies as the command line says (argv without the program name); returns the JSON
  document it prints with --json."""
  fv, rest = cli.parse(define_flags, argv, doc=__doc__, prog="python -m hade_jax.classify")
  labels, templates, audio = parse_inputs(fv, rest)
  cli.setup_logging()
  cli.start_distributed(fv)
  from hade_jax import api, distributed  # lazily: JAX, after the command line is checked

  hade = api.Hade.load(fv.checkpoint, cli.model_config(fv), which=fv.which)
  ranked = hade.classify(audio, labels, templates=templates, top_k=fv.top_k or None)
  doc = as_json(hade.checkpoint, templates, audio, ranked)
  if distributed.is_main_process():
    print(json.dumps(doc, indent=1) if fv.json else format_table(audio, ranked))
  return doc


def run() -> None:
  """The console script (setup.py); the same as `python -m` of this module."""
  cli.main_entry(main)


if __name__ == "__main__":
  run()
