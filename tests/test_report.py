"""The training report (hade_jax/report): one tiny run (2 steps, validation at each) gives a page
with every section; a workdir holding only part of a run gives a page naming what is missing."""

import base64
import html.parser
import io
import json
import re
import shutil

import numpy as np
import pytest
import soundfile

from hade_jax import cli, report, trainer
from hade_jax.report import runlog
from tests.tiny_train_config import tiny_config

SECTIONS = ("training", "validation", "test", "levels", "confidence", "examples")
VOID = {"meta", "img", "br", "hr", "input", "link"}


@pytest.fixture(scope="module")
def tiny_run(tiny_data, minilm_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("report_run")
  config = tiny_config(tiny_data, minilm_dir, total_steps=2, eval_every_steps=1,
                       final_eval_split="test")
  trainer.train_and_evaluate(config, workdir)
  return workdir


class _Checker(html.parser.HTMLParser):
  """Every non-void element closed in order; collects section ids and element attributes."""

  def __init__(self):
    super().__init__()
    self.stack, self.errors, self.elements = [], [], []

  def handle_starttag(self, tag, attrs):
    self.elements.append((tag, dict(attrs)))
    if tag not in VOID:
      self.stack.append(tag)

  def handle_endtag(self, tag):
    if not self.stack or self.stack[-1] != tag:
      self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
    else:
      self.stack.pop()


def parse(page: str) -> _Checker:
  checker = _Checker()
  checker.feed(page)
  checker.close()
  assert page.lstrip().startswith("<!DOCTYPE html>")
  assert not checker.errors, checker.errors[:5]
  assert not checker.stack, f"unclosed: {checker.stack}"
  return checker


def attrs_of(checker: _Checker, tag: str) -> list[dict]:
  return [a for t, a in checker.elements if t == tag]


def test_report_of_a_tiny_run_has_every_section(tiny_run, tmp_path):
  out = tmp_path / "r.html"
  result = report.main([f"--workdir={tiny_run}", f"--out={out}", "--num_captions=2",
                        f"--save_images={tmp_path / 'img'}"])
  page = out.read_text(encoding="utf-8")
  checker = parse(page)
  ids = [a.get("id") for a in attrs_of(checker, "section")]
  assert ids == list(SECTIONS)
  assert result.missing == []
  assert "Missing from this report" not in page
  # Every figure is an embedded PNG (loss/lr, validation, level weights, confidence).
  images = [a["src"] for a in attrs_of(checker, "img")]
  assert len(images) == 4
  for src in images:
    assert base64.b64decode(src.removeprefix("data:image/png;base64,"))[:8] == b"\x89PNG\r\n\x1a\n"
  assert sorted(p.name for p in (tmp_path / "img").iterdir()) == [
      "dcr_confidence.png", "level_weights.png", "training_curves.png", "validation_recall.png"]
  # Two captions x top-5: a player each, playing the crop the model heard (no --audio_dir).
  players = attrs_of(checker, "audio")
  assert len(players) == 10
  for a in players:
    wav = base64.b64decode(a["src"].removeprefix("data:audio/wav;base64,"))
    samples, rate = soundfile.read(io.BytesIO(wav))
    assert rate == 16_000 and len(samples) == round(1.27 * 16_000)
    assert np.abs(samples).max() > 0
  # The test table holds the run's own test metrics, with intervals when the file allows them
  # (per-query ranks or saved half-widths), else the page says there are none.
  test = json.loads((tiny_run / "test_metrics.json").read_text())
  table = next(s for s in result.sections if s.id == "test").table
  r1 = next(r for r in table if r["direction"] == "T2A" and r["metric"] == "R@1")
  assert r1["value"] == pytest.approx(test["metrics"]["t2a/R@1"])
  if runlog.test_table(test).interval_kind == "none":
    assert r1["low"] is None and "holds neither intervals nor per-query ranks" in page
  else:
    assert r1["low"] <= r1["value"] <= r1["high"]
  assert result.step_dir.startswith(str(tiny_run / "best"))


def test_report_with_only_metrics_jsonl_names_what_is_missing(tiny_run, tmp_path):
  shutil.copy(tiny_run / "metrics.jsonl", tmp_path / "metrics.jsonl")
  result = report.build(tmp_path)
  checker = parse(result.html)
  missing = {s.id: s.missing for s in result.sections}
  assert missing["training"] == missing["validation"] == ""
  assert "no test_metrics.json" in missing["test"]
  for section in ("levels", "confidence", "examples"):
    assert "no checkpoint to load" in missing[section]
  assert len(attrs_of(checker, "img")) == 2 and not attrs_of(checker, "audio")
  assert "Missing from this report" in result.html
  assert "no test_metrics.json" in result.html


def test_report_of_an_empty_workdir_says_every_section_is_missing(tmp_path):
  result = report.build(tmp_path)
  assert len(result.missing) == len(SECTIONS)
  assert "no metrics.jsonl" in result.html


def test_report_of_a_missing_workdir_is_a_clear_error(tmp_path, capsys):
  status = cli.run(report.main, [f"--workdir={tmp_path / 'nowhere'}"])
  err = capsys.readouterr().err
  assert status == 1
  assert f"error: no training workdir at {tmp_path / 'nowhere'}" in err
  assert "Traceback" not in err


def test_report_intervals_bootstrap_from_per_query_ranks():
  # 4 captions ranked 1, 1, 3, 20: R@1 = 50 %, R@5 = 75 %; ranks only, no saved intervals.
  test = {"split": "test", "metrics": {"t2a/R@1": 50.0, "t2a/R@5": 75.0, "a2t/R@1": 100.0},
          "per_query": {"t2a": {"rank": [1, 1, 3, 20]}, "a2t": {"ranks": [[1, 2], [1, 4]]}}}
  table = runlog.test_table(test)
  assert table.interval_kind == "bootstrap"
  rows = {(r["direction"], r["metric"]): r for r in table.rows}
  r1 = rows[("T2A", "R@1")]
  assert 0.0 <= r1["low"] < 50.0 < r1["high"] <= 100.0
  # Every A2T query finds a caption at rank 1: every resample gives 100 %.
  assert (rows[("A2T", "R@1")]["low"], rows[("A2T", "R@1")]["high"]) == (100.0, 100.0)
  assert runlog.test_table(test).rows == table.rows  # a fixed seed


def test_report_intervals_saved_or_absent():
  saved = runlog.test_table({"metrics": {"t2a/R@1": 40.0, "t2a/R@1/ci95": 5.0}})
  assert saved.interval_kind == "saved"
  assert (saved.rows[0]["low"], saved.rows[0]["high"]) == (35.0, 45.0)
  bare = runlog.test_table({"metrics": {"t2a/R@1": 40.0}})
  assert bare.interval_kind == "none" and bare.rows[0]["low"] is None
  assert re.search("neither intervals nor per-query ranks", bare.note)


def test_report_reads_torn_metrics_lines(tmp_path):
  (tmp_path / "metrics.jsonl").write_text(
      '{"step": 1, "train/loss": 2.0, "train/lr/all": 0.1}\n'
      '{"step": 2, "train/loss": 1.5}\n{"step": 3, "train/lo')
  series = runlog.read_series(tmp_path)
  assert series.skipped_lines == 1
  steps, values = series.losses()["train/loss"]
  assert steps.tolist() == [1, 2] and values.tolist() == [2.0, 1.5]


def test_validation_at_a_step_is_that_steps_logged_values(tmp_path):
  (tmp_path / "metrics.jsonl").write_text(
      '{"step": 5, "val/t2a/R@1": 10.0, "train/loss": 2.0}\n'
      '{"step": 10, "val/t2a/R@1": 30.0, "val/zero_shot/top1": 7.5}\n'
      '{"step": 10, "val/t2a/R@1": 20.0}\n')  # a resumed run's repeat: the later line wins
  assert runlog.validation_at(tmp_path, 10) == {"val/t2a/R@1": 20.0, "val/zero_shot/top1": 7.5}
  assert runlog.validation_at(tmp_path, 5) == {"val/t2a/R@1": 10.0}
  assert runlog.validation_at(tmp_path, 7) == {}
  assert runlog.validation_at(tmp_path / "missing", 10) == {}


def test_report_audio_plays_original_files_under_audio_dir(tiny_data, minilm_dir, tmp_path):
  from hade_jax import hade
  from hade_jax.report import model_sections

  config = tiny_config(tiny_data, minilm_dir)
  audio = model_sections.ClipAudio(config, hade.model_config(config), "test", tmp_path)
  original = tmp_path / audio.source[0]["file_name"]  # where the download folder held it
  original.parent.mkdir(parents=True, exist_ok=True)
  original.write_bytes(b"RIFF")  # only its presence matters: the page links to it
  assert audio.src(0) == original.absolute().as_uri()
  assert audio.src(1).startswith("data:audio/wav;base64,")  # not in the folder: embedded
  note = audio.note()
  assert f"the original files under {tmp_path} (1 of the players)" in note
  assert "the clip as the model heard it" in note and "s 'head' crop (1 of the players)" in note


def test_report_of_a_checkpoint_without_its_test_split_shows_what_it_can(tiny_run, tmp_path):
  shutil.copytree(tiny_run / "best", tmp_path / "best")
  # A split the prepared data lacks (as on a machine without the run's test data).
  (tmp_path / "test_metrics.json").write_text(json.dumps(
      {"split": "nosuch", "metrics": {"t2a/R@1": 10.0}}))
  result = report.build(tmp_path)
  missing = {s.id: s.missing for s in result.sections}
  assert missing["levels"] == missing["test"] == ""  # the checkpoint and the file suffice
  for section in ("confidence", "examples"):
    assert "the test split 'nosuch' could not be evaluated" in missing[section]
    assert "has no split 'nosuch'" in missing[section]
  parse(result.html)


def test_report_without_its_extra_names_the_install(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(report, "EXTRA_MODULES", ("jinja2", "hade_no_such_module"))
  status = cli.run(report.main, [f"--workdir={tmp_path}"])
  err = capsys.readouterr().err
  assert status == 1
  assert "the report needs hade_no_such_module: pip install 'hade_jax[report]'" in err
