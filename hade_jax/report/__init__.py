"""One self-contained HTML page about a training run.

  python -m hade_jax.report --workdir=/tmp/hade_demo                 # -> /tmp/hade_demo/report.html
  python -m hade_jax.report --workdir=RUN --out=run.html --audio_dir=/data/clotho
  hade-report --workdir=RUN --save_images=plots/                     # also each figure as PNG

Sections, each from its source in the workdir (a missing source gives a page that says what is
missing, never a traceback):
  training      loss terms and learning rates over steps          metrics.jsonl
  validation    validation R@1/5/10 over steps, T2A and A2T       metrics.jsonl
  test          the test metrics with 95 % intervals              test_metrics.json
  levels        the THA level weights lambda                      the checkpoint (best, or --which)
  confidence    DCR confidence over the test split's pairs        the checkpoint + the test split
  examples      top-5 clips of a few test captions, with <audio>  the checkpoint + the test split

Figures are matplotlib PNGs embedded as base64 data URIs; the audio players play the original
files when `--audio_dir` holds them (the prepared records know each clip's file name relative
to the download folder, not the folder), otherwise the crop the model heard, embedded as WAV.
The page layout is `template.html` next to this file (jinja2). Needs the `report` extra:
`pip install hade_jax[report]` (matplotlib, jinja2).
"""

from __future__ import annotations

import importlib.util
import logging
import pathlib
from collections.abc import Sequence

from absl import flags

from hade_jax import cli
from hade_jax.report import page, runlog

log = logging.getLogger("hade_jax.report")

DEFAULT_NAME = "report.html"
EXTRA_MODULES = ("matplotlib", "jinja2")  # setup.py extras_require["report"]


def check_extras() -> None:
  """Raises ImportError naming the extra when matplotlib or jinja2 is not installed."""
  absent = [m for m in EXTRA_MODULES if importlib.util.find_spec(m) is None]
  if absent:
    raise ImportError(f"the report needs {' and '.join(absent)}: pip install "
                      "'hade_jax[report]' (or pip install matplotlib jinja2)")


def build(workdir: str | pathlib.Path, *, which: str = "best", num_captions: int = 3,
          audio_dir: str | pathlib.Path | None = None, max_clips: int = 0) -> page.Report:
  """The report of a training workdir (see the module docstring).

  Args:
    workdir: the training run's folder.
    which: the checkpoint of the model sections, 'best' (validation) or 'last'.
    num_captions: test captions shown with their top-5 clips.
    audio_dir: the dataset's download folder, for players of the original audio files.
    max_clips: evaluate the first N test clips only (0: all).

  Raises:
    FileNotFoundError: `workdir` does not exist.
  """
  check_extras()
  workdir = pathlib.Path(workdir).expanduser().absolute()
  if not workdir.is_dir():
    raise FileNotFoundError(f"no training workdir at {workdir}: pass the --workdir a training "
                            "run wrote (python -m hade_jax.train --workdir=...)")
  series = runlog.read_series(workdir)
  test = runlog.read_test(workdir)
  sections = _log_sections(workdir, series) + [_test_section(test)]
  from hade_jax.report import model_sections  # JAX: only once the cheap parts are read

  model_part = model_sections.build(
      workdir, which=which, test_split=(test or {}).get("split"), num_captions=num_captions,
      audio_dir=pathlib.Path(audio_dir).expanduser() if audio_dir else None,
      max_clips=max_clips)
  sections += model_part.sections
  html = page.render(workdir, sections, model_part.step_dir)
  return page.Report(html, sections, model_part.step_dir)


def _log_sections(workdir: pathlib.Path, series: runlog.Series | None) -> list[page.Section]:
  from hade_jax.report import plots  # matplotlib: after check_extras named the extra

  training = page.Section("training", "Training: loss terms and learning rates")
  validation = page.Section("validation", "Validation recall over steps")
  if series is None:
    why = (f"no {runlog.METRICS_FILE} in {workdir}: the run has not logged a step yet "
           "(or this is not a training workdir)")
    training.missing = validation.missing = why
    return [training, validation]
  losses, lrs = series.losses(), series.learning_rates()
  if losses or lrs:
    training.add_image("training_curves", plots.training_curves(losses, lrs),
                       "loss terms and learning rates over steps")
  else:
    training.missing = f"{runlog.METRICS_FILE} holds no training steps yet"
  recalls = series.validation_recalls()
  if recalls:
    validation.add_image("validation_recall", plots.validation_recalls(recalls),
                         "validation R@k over steps")
  else:
    validation.missing = (f"{runlog.METRICS_FILE} holds no validation yet (the run evaluates "
                          "every config.eval_every_steps steps and at its end)")
  if series.skipped_lines:
    training.notes.append(f"{series.skipped_lines} unreadable lines of "
                          f"{runlog.METRICS_FILE} were skipped.")
  return [training, validation]


def _test_section(test: dict | None) -> page.Section:
  section = page.Section("test", "Test metrics")
  if test is None:
    section.missing = (f"no {runlog.TEST_FILE}: the run has not finished, or its config "
                       "names no final_eval_split")
    return section
  table = runlog.test_table(test)
  section.title = f"Test metrics ({table.split} split)"
  if not table.rows:
    section.missing = f"{runlog.TEST_FILE} holds no retrieval metrics"
    return section
  section.table = table.rows
  section.notes.append(table.note)
  if test.get("tie_rule"):
    section.notes.append(f"Tie rule: {test['tie_rule']}.")
  return section


# ---------------------------------------------------------------------------------------------
# Command line.


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("workdir", None, "The training run's folder.", flag_values=fv)
  flags.mark_flag_as_required("workdir", flag_values=fv)
  flags.DEFINE_string("out", "", f"The HTML file (default: <workdir>/{DEFAULT_NAME}).",
                      flag_values=fv)
  flags.DEFINE_enum("which", "best", ["best", "last"], "The checkpoint of the model sections: "
                    "the best validation step or the last step.", flag_values=fv)
  flags.DEFINE_integer("num_captions", 3, "Test captions shown with their top-5 clips.",
                       lower_bound=0, flag_values=fv)
  flags.DEFINE_string("audio_dir", "", "The dataset's download folder: players play the "
                      "original files found there (default: the crop the model heard, "
                      "embedded).", flag_values=fv)
  flags.DEFINE_integer("max_clips", 0, "Evaluate the first N test clips only (0: all).",
                       lower_bound=0, flag_values=fv)
  flags.DEFINE_string("save_images", "", "Also write each figure as a PNG in this folder.",
                      flag_values=fv)


def main(argv: Sequence[str] | None = None) -> page.Report:
  """Writes the report the command line asks for (argv without the program name)."""
  fv, rest = cli.parse(define_flags, argv, doc=__doc__, prog="python -m hade_jax.report")
  if rest:
    raise cli.UsageError(f"unexpected arguments: {rest}")
  cli.setup_logging()
  report = build(fv.workdir, which=fv.which, num_captions=fv.num_captions,
                 audio_dir=fv.audio_dir or None, max_clips=fv.max_clips)
  workdir = pathlib.Path(fv.workdir).expanduser().absolute()
  out = pathlib.Path(fv.out).expanduser() if fv.out else workdir / DEFAULT_NAME
  page.write(report, out, pathlib.Path(fv.save_images).expanduser() if fv.save_images else None)
  for line in report.missing:
    log.warning("missing: %s", line)
  print(f"report: {out.absolute()}")
  return report


def run() -> None:
  """The console script `hade-report` (setup.py); the same as `python -m hade_jax.report`."""
  cli.main_entry(main)
