"""One writer per workdir (hade_jax/locking.py): a second one is refused with the holder named;
a lock left by a dead process is taken over with a warning."""

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from hade_jax import locking, trainer
from tests import reliability_helpers as fh
from tests.tiny_train_config import tiny_config


@pytest.fixture
def holder(tmp_path):
  """Another process holding the training lock of tmp_path / 'workdir'."""
  workdir = tmp_path / "workdir"
  script = textwrap.dedent(f"""
      import sys
      from hade_jax import locking
      with locking.WorkdirLock({str(workdir)!r}, purpose="training"):
        print("locked", flush=True)
        sys.stdin.read()
      """)
  proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True, cwd=fh.ROOT)
  assert proc.stdout.readline().strip() == "locked"
  yield workdir, proc.pid
  proc.stdin.close()
  proc.wait(timeout=30)


def test_lock_refuses_a_second_trainer_naming_the_holder(holder, tiny_data, minilm_dir):
  workdir, pid = holder
  config = tiny_config(tiny_data, minilm_dir)
  with pytest.raises(locking.LockedError) as e:
    trainer.train_and_evaluate(config, workdir)
  message = str(e.value)
  assert f"training run pid {pid} on host {socket.gethostname()} since " in message
  assert "one training run per folder" in message
  assert not (workdir / "checkpoints").exists()  # refused before anything was written


def test_lock_is_free_again_after_the_holder_exits(holder):
  workdir, pid = holder
  with pytest.raises(locking.LockedError, match=f"pid {pid}"):
    locking.WorkdirLock(workdir, purpose="search index").acquire()
  assert locking.read_holder(workdir)["pid"] == pid


def test_lock_in_one_process_twice_is_refused_and_released_on_exit(tmp_path):
  with locking.WorkdirLock(tmp_path, purpose="search index"):
    with pytest.raises(locking.LockedError, match=f"search index run pid {os.getpid()}"):
      locking.WorkdirLock(tmp_path, purpose="search index").acquire()
  assert locking.read_holder(tmp_path) is None  # released: emptied
  with locking.WorkdirLock(tmp_path):
    assert locking.read_holder(tmp_path)["purpose"] == "training"


def test_stale_lock_of_a_dead_pid_is_taken_over_with_a_warning(tmp_path, caplog):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  assert not locking.pid_alive(dead.pid)
  stale = {"purpose": "training", "pid": dead.pid, "host": socket.gethostname(),
           "since": "2026-01-01T00:00:00+00:00"}
  (tmp_path / locking.LOCK_NAME).write_text(json.dumps(stale))
  caplog.set_level(logging.WARNING, logger="hade_jax.locking")
  with locking.WorkdirLock(tmp_path):
    assert locking.read_holder(tmp_path)["pid"] == os.getpid()
  assert f"taking over the lock left by training run pid {dead.pid}" in caplog.text
