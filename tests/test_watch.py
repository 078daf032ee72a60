"""A run you can watch: TensorBoard tags one to one with metrics.jsonl names and no "illegal"
warnings, the progress bar on a terminal only, the compile lines, the closing results line."""

import functools
import io
import logging
import struct

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import clotho
from hade_jax import evaluator, losses, optim, trainer
from tests import test_heads


def loss_term_names() -> set[str]:
  """The keys of `losses.hade_loss` with every term switched on."""
  cfg = test_heads.make_cfg()
  heads = test_heads.make_heads(cfg)
  pooled, frames, hidden, text_pooled, mask = test_heads.encoder_outputs(lengths=(7, 3, 5, 1, 6))
  a = heads.audio_features(jnp.asarray(pooled), tuple(map(jnp.asarray, frames)))
  t = heads.text_features(tuple(jnp.asarray(h[:test_heads.A]) for h in hidden),
                          jnp.asarray(text_pooled[:test_heads.A]),
                          jnp.asarray(mask[:test_heads.A]))
  loss_cfg = losses.LossConfig(level_nce_weight=0.5, dcr_nce_weight=0.5)
  _, m = losses.hade_loss(heads, a, t, jnp.arange(test_heads.A), loss_cfg)
  return set(m)


def train_names() -> set[str]:
  """What the trainer's Reporter writes for a step (skip counting on, every group's lr)."""
  config = clotho.get_config()
  config.skip_nonfinite_steps = True
  written = {}

  class Writer:
    def write(self, step, values):
      written.update(values)

  lr_fn = functools.partial(optim.learning_rates, config.optim, 10, 2)
  report = trainer.Reporter(Writer(), trainer.Timer(0), 10, config, lr_fn,
                            {"skipped_steps": 0, "consecutive_skips": 0}, progress_bar=False)
  step_metrics = {k: 1.0 for k in loss_term_names()} | {"grad_norm": 1.0, "finite": True}
  report((1, step_metrics), force=True)
  return set(written)


def eval_names() -> set[str]:
  """What validation and the final test write: every metric the evaluator computes (true
  recall, intervals, a two-stage shortlist) under val/ and test/, and the R-sums."""
  rng = np.random.default_rng(0)
  scores_AxT = rng.normal(size=(4, 8))
  m = evaluator.split_metrics(scores_AxT, scores_AxT, np.repeat(np.arange(4), 2),
                              true_recall=True, intervals=True, shortlists=(2,))
  return ({f"val/{k}" for k in m} | {f"test/{k}" for k in m}
          | set(trainer.rsum(m, "val")))


def all_metric_names() -> list[str]:
  return sorted(train_names() | eval_names())


def test_tensorboard_tags_are_one_to_one_and_legal():
  names = all_metric_names()
  assert "val/t2a/R@1+R@5+R@10" in names and "val/t2a/R@1" in names  # the special characters
  assert "train/loss" in names and any(n.startswith("train/lr/") for n in names)
  tags = {name: trainer.tensorboard_tag(name) for name in names}
  assert len(set(tags.values())) == len(names)
  for name, tag in tags.items():
    assert trainer._TAG_ILLEGAL.search(tag) is None, (name, tag)
    back = tag  # the documented mapping inverts: each replacement text stands for one character
    for char, text in trainer.TAG_REPLACEMENTS.items():
      back = back.replace(text, char)
    assert back == name
  assert tags["val/t2a/R@1"] == "val/t2a/R_at_1"


@pytest.mark.parametrize("name", ["val/R_at_1", "train/loss_plus_x", "val/a b", "/val/x"])
def test_tensorboard_tag_refuses_names_that_would_collide(name):
  with pytest.raises(ValueError, match="metric name"):
    trainer.tensorboard_tag(name)


def _event_tags(event_file) -> set[str]:
  from tensorboardX.proto import event_pb2

  tags, data = set(), event_file.read_bytes()
  while data:
    (length,) = struct.unpack("<Q", data[:8])
    event = event_pb2.Event.FromString(data[12:12 + length])
    data = data[12 + length + 4:]
    tags |= {v.tag for v in event.summary.value}
  return tags


def test_tensorboard_writer_emits_no_illegal_warning(tmp_path, caplog):
  names = all_metric_names()
  caplog.set_level(logging.DEBUG)  # tensorboardX logs the renames at INFO
  writer = trainer.MetricWriter(tmp_path)
  writer.write(1, {name: 1.0 for name in names})
  writer.close()
  assert "illegal" not in caplog.text
  (event_file,) = (tmp_path / "tensorboard").glob("events.*")
  assert _event_tags(event_file) == {trainer.tensorboard_tag(n) for n in names}
  # The same writer given the raw names does warn (the capture above sees tensorboardX's logs).
  from tensorboardX import SummaryWriter

  raw = SummaryWriter(str(tmp_path / "raw"))
  raw.add_scalar("val/t2a/R@1", 1.0, 1)
  raw.close()
  assert "Summary name val/t2a/R@1 is illegal" in caplog.text


class Stream(io.StringIO):
  def __init__(self, tty):
    super().__init__()
    self.tty = tty

  def isatty(self):
    return self.tty


def test_watch_progress_mode_follows_isatty(monkeypatch):
  assert trainer.use_progress_bar(Stream(True)) is True
  assert trainer.use_progress_bar(Stream(False)) is False
  closed = io.StringIO()
  closed.close()
  assert trainer.use_progress_bar(closed) is False  # isatty of a closed stream raises
  monkeypatch.setattr("sys.stderr", Stream(True))
  assert trainer.use_progress_bar() is True  # default: stderr, where the logs go
  writer_less = trainer.Reporter(None, trainer.Timer(0), 10, clotho.get_config(), None, {})
  assert writer_less.progress_bar is False  # processes other than 0 show nothing


def _reporter(progress_bar, written):
  config = ml_collections.ConfigDict(dict(log_every_steps=2, batch_size=4,
                                          skip_nonfinite_steps=False))

  class Writer:
    def write(self, step, values):
      written.append(step)

  return trainer.Reporter(Writer(), trainer.Timer(0), 6, config, lambda step: {},
                          {"skipped_steps": 0, "consecutive_skips": 0},
                          progress_bar=progress_bar)


@pytest.mark.parametrize("progress_bar", [True, False])
def test_watch_bar_replaces_step_lines(progress_bar, caplog, capsys):
  caplog.set_level(logging.INFO)
  written = []
  report = _reporter(progress_bar, written)
  for step in range(1, 7):
    report((step, {"loss": 0.5, "grad_norm": 1.0, "finite": True}))
  assert written == [2, 4, 6]  # metrics.jsonl / TensorBoard the same in both modes
  step_lines = [r for r in caplog.records if r.getMessage().startswith("step ")]
  if progress_bar:
    assert report.bar.n == 6 and report.bar.total == 6
    assert not step_lines
    report.close()
    assert report.bar is None
    assert "6/6" in capsys.readouterr().err
  else:
    assert report.bar is None
    assert [r.getMessage().split()[1] for r in step_lines] == ["2/6", "4/6", "6/6"]


def test_watch_compile_lines_around_the_first_call_only(caplog):
  caplog.set_level(logging.INFO)
  calls = []
  step = trainer._log_first_call(lambda *args: calls.append(args) or len(calls))
  assert [step(1, 2), step(3, 4), step(5, 6)] == [1, 2, 3]
  assert calls == [(1, 2), (3, 4), (5, 6)]
  messages = [r.getMessage() for r in caplog.records]
  assert messages[0] == "compiling the training step..."
  assert messages[1].startswith("compiled in ") and messages[1].endswith(" s")
  assert len(messages) == 2


def test_watch_last_line_names_the_best_checkpoint(tmp_path, caplog):
  caplog.set_level(logging.INFO)
  (tmp_path / "metrics.jsonl").write_text("")
  for folder in ("checkpoints/8", "checkpoints/10", "best/4", "best/6"):
    (tmp_path / folder).mkdir(parents=True)
  trainer._log_results(tmp_path)
  line = caplog.records[-1].getMessage()
  assert line.startswith(f"results in {tmp_path}: metrics.jsonl")
  assert line.endswith(f"best checkpoint {tmp_path / 'best' / '6'}")
  caplog.clear()
  trainer._log_results(tmp_path / "empty")
  assert "no best checkpoint" in caplog.records[-1].getMessage()
