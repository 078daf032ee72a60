"""SIGTERM / SIGINT stop training cleanly (hade_jax/preemption.py): the step reached is saved,
the exit status is 143 / 130 without a traceback, and the rerun ends bit-identical to an
uninterrupted run; a second signal exits at once. Restarted runs leave each metric's steps
strictly increasing in metrics.jsonl and tell TensorBoard to drop the superseded events.
"""

import json
import random
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time

import pytest

from hade_jax import checkpoints, trainer
from tests import preempt_cases
from tests import reliability_helpers as fh
from tests.tiny_train_config import tiny_config

STEPS = 8
# The text tower is frozen, so every stop and resume also goes through the frozen store
# (hade_jax/checkpoints/frozen.py).
OVERRIDES = dict(variant="frozen=text", total_steps=STEPS, checkpoint_every_steps=100,
                 keep_checkpoints=3)


@pytest.fixture(scope="module")
def reference(tiny_data, minilm_dir, tmp_path_factory):
  """An uninterrupted run, and the environment whose compilation cache it filled."""
  tmp = tmp_path_factory.mktemp("preempt_reference")
  env = fh.train_env()
  workdir = tmp / "reference"
  fh.run(fh.train_command(workdir, tiny_data, minilm_dir, **OVERRIDES), tmp / "reference.log",
         env=env, timeout=1800)
  return workdir, env


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_sigterm_and_sigint_save_the_step_exit_cleanly_and_resume_bit_identical(
    signum, reference, tiny_data, minilm_dir, tmp_path):
  reference_dir, env = reference
  workdir = tmp_path / "stopped"
  command = fh.train_command(workdir, tiny_data, minilm_dir, **OVERRIDES)
  stop = preempt_cases.signal_once(command, workdir, signum, tmp_path / "stop.log",
                                   after_steps=2, env=env)
  output = (tmp_path / "stop.log").read_text()
  assert stop is not None and stop.phase == "steps", output[-3000:]
  assert stop.status == preempt_cases.EXPECTED_STATUS[signum], output[-3000:]
  # The step in flight finished and was saved: nothing is lost (the only periodic checkpoint
  # would have been the last step).
  assert 2 <= stop.saved < STEPS and stop.lost == 0, (stop, output[-3000:])
  assert f"at step {stop.saved} (exit status {stop.status})" in output
  assert "Traceback" not in output and "KeyboardInterrupt" not in output
  assert "(rerun the same command to resume)" in output
  fh.run(command, tmp_path / "rerun.log", env=env, timeout=1800)
  same = fh.assert_same_run(reference_dir, workdir, STEPS)
  assert same["leftover_partial"] == []
  _assert_steps_increase(workdir)
  # The frozen text tower was stored once, not in the steps, and filled back on resume.
  meta = checkpoints.read_meta(workdir / "checkpoints" / str(STEPS))
  assert meta["frozen"]["names"] and all(n.startswith("params/text_encoder/")
                                         for n in meta["frozen"]["names"])


def test_second_signal_exits_at_once_without_saving(tmp_path):
  # The handler alone, in a small process: the first SIGTERM only sets the flag (the "step"
  # goes on and says so); the second kills it at once, before the "step" ends.
  script = textwrap.dedent("""
      import sys, time
      from hade_jax import preemption
      with preemption.Handler() as h:
        print("ready", flush=True)
        while not h.signum:
          time.sleep(0.01)
        print("first signal handled", h.signum, flush=True)
        time.sleep(30)  # a long step
        print("step finished", flush=True)
      """)
  proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                          cwd=fh.ROOT)
  assert proc.stdout.readline().strip() == "ready"
  proc.send_signal(signal.SIGTERM)
  assert proc.stdout.readline().strip() == f"first signal handled {int(signal.SIGTERM)}"
  t0 = time.monotonic()
  proc.send_signal(signal.SIGTERM)
  status = proc.wait(timeout=20)
  assert time.monotonic() - t0 < 5
  assert status == -signal.SIGTERM  # the default action: the shell reports 143
  assert "step finished" not in proc.stdout.read()


def test_preempt_handler_restores_the_old_handlers():
  from hade_jax import preemption

  before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
  with preemption.Handler() as h:
    assert signal.getsignal(signal.SIGTERM) == h._handle  # noqa: SLF001
    assert preemption.requested() == 0
  assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
  assert preemption.requested() == 0  # no handler: never requested


def test_preempt_cases_at_random_times_lose_nothing(reference, tiny_data, minilm_dir,
                                                    tmp_path):
  # The short version of the fault harness's `--stops` (RELIABILITY.md): two stops at
  # random times, rerun after each, then to the end.
  reference_dir, env = reference
  workdir = tmp_path / "stopped"
  command = fh.train_command(workdir, tiny_data, minilm_dir, **OVERRIDES)
  stops, _ = preempt_cases.preempt_and_resume(command, workdir, 2, random.Random(1), tmp_path,
                                              env=env, total_steps=STEPS)
  assert len(stops) == 2, stops
  for stop in stops:
    if stop.phase == "steps":
      assert stop.clean, stop
    assert stop.lost == 0, stop
  fh.assert_same_run(reference_dir, workdir, STEPS)


# -- metrics.jsonl and TensorBoard after a restart ----------------------------------------------


def _assert_steps_increase(workdir):
  steps = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    entry = json.loads(line)
    for key in entry.keys() - {"step"}:
      steps.setdefault(key, []).append(entry["step"])
  for key, seen in steps.items():
    assert seen == sorted(set(seen)), (key, seen)
  return steps


def _session_starts(event_file):
  """The steps of the SessionLog START events in a TensorBoard event file (TFRecord)."""
  from tensorboardX.proto import event_pb2

  starts, data = [], event_file.read_bytes()
  while data:
    (length,) = struct.unpack("<Q", data[:8])
    event = event_pb2.Event.FromString(data[12:12 + length])
    data = data[12 + length + 4:]
    if event.HasField("session_log") and event.session_log.status == event.session_log.START:
      starts.append(event.step)
  return starts


def test_killed_run_resumed_keeps_metric_steps_strictly_increasing(tiny_data, minilm_dir,
                                                                   tmp_path):
  config = tiny_config(tiny_data, minilm_dir, total_steps=6, checkpoint_every_steps=2,
                       eval_every_steps=2, final_eval_split="", max_steps_per_run=3)
  trainer.train_and_evaluate(config, tmp_path)
  # What a kill after step 3's metrics, before its checkpoint, leaves: lines to step 3, the
  # newest checkpoint step 2 (whose evaluation line was written after it was saved).
  shutil.rmtree(tmp_path / "checkpoints" / "3")
  before = _assert_steps_increase(tmp_path)
  assert before["train/loss"] == [1, 2, 3] and before["val/t2a/R@1"] == [2]
  config.max_steps_per_run = 0
  trainer.train_and_evaluate(config, tmp_path)
  after = _assert_steps_increase(tmp_path)
  assert after["train/loss"] == [1, 2, 3, 4, 5, 6]
  assert after["val/t2a/R@1"] == [2, 4, 6]  # step 2's evaluation, repeated, written once
  events = sorted((tmp_path / "tensorboard").glob("events.*"))
  assert len(events) == 2
  # TensorBoard drops the first file's events from step 3 on when it reads the second.
  assert 3 in [s for f in events for s in _session_starts(f)]
