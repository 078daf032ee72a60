"""One writer per folder: `with WorkdirLock(workdir, purpose="training"):`.

Two trainings on one workdir delete each other's in-flight checkpoints and interleave their
metric lines; two index builds on one index mix their shards. The lock is `fcntl.flock` on
`<folder>/.hade_jax.lock`, which also holds who took it (purpose, pid, host, start time) so
that a refused writer is told whom to wait for or stop. The kernel drops a flock when its
holder dies, however it dies (SIGKILL, OOM), so a lock left by a dead process is taken over,
with a warning naming it. On a file system without flock (some network mounts) the recorded
pid decides: a live pid on this host holds the folder; another host's record is trusted until
the file is deleted.

In multi-process runs `exclusive(path)` takes the lock on process 0 only (the others write
nothing but checkpoint shards) and makes every process fail alike if it is held.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import pathlib
import socket
from collections.abc import Iterator

log = logging.getLogger(__name__)

LOCK_NAME = ".hade_jax.lock"


class LockedError(RuntimeError):
  """The folder is in use by another writer (named in the message)."""


class WorkdirLock:
  """An exclusive lock on a folder, held for the `with` block (or acquire()..release())."""

  def __init__(self, path: str | pathlib.Path, purpose: str = "training"):
    self.folder = pathlib.Path(path).expanduser().absolute()
    self.path = self.folder / LOCK_NAME
    self.purpose = purpose
    self._fd: int | None = None

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()

  def acquire(self) -> None:
    """Takes the lock or raises LockedError naming the holder."""
    self.folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      previous = _read_info(fd)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        raise LockedError(self._refusal(previous)) from None
      except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
          raise
        log.warning("%s: the file system does not support flock (%s); relying on the pid "
                    "recorded in it", self.path, e)
        if previous and _held_elsewhere(previous):
          raise LockedError(self._refusal(previous)) from None
      if previous:
        log.warning("%s: taking over the lock left by %s (that process is gone)", self.path,
                    describe(previous))
      _write_info(fd, self.info())
    except BaseException:
      os.close(fd)
      raise
    self._fd = fd

  def release(self) -> None:
    if self._fd is None:
      return
    # Emptied, not deleted: a deleted file could be locked anew by one writer while another
    # still holds the old inode.
    with contextlib.suppress(OSError):
      os.ftruncate(self._fd, 0)
    os.close(self._fd)  # drops the flock
    self._fd = None

  def info(self) -> dict:
    return {"purpose": self.purpose, "pid": os.getpid(), "host": socket.gethostname(),
            "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}

  def _refusal(self, holder: dict | None) -> str:
    who = describe(holder) if holder else "another process (no details recorded)"
    return (f"{self.folder} is in use by {who}: one {self.purpose} run per folder (two would "
            f"delete each other's files). Wait for it to finish or stop it, or use another "
            f"folder. If no such process runs, delete {self.path}.")


def describe(info: dict) -> str:
  return (f"{info.get('purpose', '?')} run pid {info.get('pid', '?')} on host "
          f"{info.get('host', '?')} since {info.get('since', '?')}")


def read_holder(path: str | pathlib.Path) -> dict | None:
  """Who holds (or last held) the lock of a folder, without taking it."""
  try:
    fd = os.open(pathlib.Path(path) / LOCK_NAME, os.O_RDONLY)
  except FileNotFoundError:
    return None
  try:
    return _read_info(fd)
  finally:
    os.close(fd)


def pid_alive(pid: int) -> bool:
  """Whether a process with this id exists on this host."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by another user
    return True
  return True


def _held_elsewhere(info: dict) -> bool:
  if info.get("host") != socket.gethostname():
    return True
  pid = info.get("pid")
  return isinstance(pid, int) and pid != os.getpid() and pid_alive(pid)


def _read_info(fd: int) -> dict | None:
  os.lseek(fd, 0, os.SEEK_SET)
  raw = b""
  while chunk := os.read(fd, 65536):
    raw += chunk
  try:
    info = json.loads(raw)
  except ValueError:
    return None  # empty (released) or torn
  return info if isinstance(info, dict) else None


def _write_info(fd: int, info: dict) -> None:
  os.ftruncate(fd, 0)
  os.lseek(fd, 0, os.SEEK_SET)
  os.write(fd, json.dumps(info).encode() + b"\n")
  os.fsync(fd)


@contextlib.contextmanager
def exclusive(path: str | pathlib.Path, purpose: str = "training") -> Iterator[None]:
  """`WorkdirLock` on process 0; with several processes, all raise if process 0 could not
  take it (they must not start collectives that process 0 never joins)."""
  import jax

  lock, error = None, None
  if jax.process_index() == 0:
    lock = WorkdirLock(path, purpose)
    try:
      lock.acquire()
    except LockedError as e:
      lock, error = None, e
  if jax.process_count() > 1:
    import numpy as np
    from jax.experimental import multihost_utils

    ok = bool(np.all(multihost_utils.process_allgather(np.int32(error is None))))
    if not ok and error is None:
      if lock:
        lock.release()
      raise LockedError(f"{path} is in use by another {purpose} run (see process 0's log)")
  if error is not None:
    raise error
  try:
    yield
  finally:
    if lock:
      lock.release()
