"""SIGTERM and SIGINT stop training cleanly: finish the step, save it, exit with 128 + signal.

Preemption (`gcloud ... stop`, Slurm `scancel`, spot and preemptible VMs, `docker stop`) sends
SIGTERM and waits a grace period before SIGKILL; Ctrl-C sends SIGINT. Within `Handler()` the
first such signal only sets a flag. The training loop polls `requested()` at every step
boundary (all processes agree on it: one all-gather of the flags when there are several), then
writes the checkpoint of the step it reached, flushes the metrics, stops the Grain workers and
raises `Preempted`, a `SystemExit` whose status is 128 + the signal number:

  143  SIGTERM (15): stopped cleanly, the checkpoint of the step reached is on disk
  130  SIGINT (2): the same

Rerunning the same command resumes from that checkpoint exactly. A second signal kills the
process at once (the default action is restored by the first; the shell sees the same 143 or
130; nothing more is saved). Signals that arrive while the main thread is inside one long C
call (an XLA compilation) are handled when it returns.
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)

_active: list[Handler] = []  # innermost last


class Preempted(SystemExit):
  """Raised once the step reached is saved; its `code` is the process's exit status."""

  def __init__(self, signum: int, step: int):
    super().__init__(128 + signum)
    self.signum, self.step = signum, step

  def __str__(self) -> str:
    return (f"stopped by {signal.Signals(self.signum).name} at step {self.step} (exit status "
            f"{self.code})")


class Handler:
  """Installs the SIGTERM/SIGINT handlers for its `with` block and restores the old ones.

  Outside the main thread (where Python cannot install handlers) it installs nothing and
  `requested()` stays False.
  """

  def __init__(self, signals: tuple[int, ...] = SIGNALS):
    self.signals = signals
    self.signum = 0  # the first signal received, 0 = none
    self._agreed: int | None = None  # once every process agreed on a stop
    self._old: dict[int, object] = {}

  def __enter__(self) -> Handler:
    if threading.current_thread() is threading.main_thread():
      for s in self.signals:
        self._old[s] = signal.signal(s, self._handle)
    _active.append(self)
    return self

  def __exit__(self, *exc) -> None:
    _active.remove(self)
    for s, old in self._old.items():
      signal.signal(s, old)
    self._old.clear()

  def _handle(self, signum: int, frame) -> None:
    del frame
    self.signum = self.signum or signum
    # A second signal takes the default action at once: kill the process.
    for s in self._old:
      signal.signal(s, signal.SIG_DFL)
    log.warning("received %s: finishing the current step, saving a checkpoint, then exiting "
                "with status %d (rerun the same command to resume); send it again to stop "
                "at once without saving", signal.Signals(signum).name, 128 + signum)

  def requested(self) -> int:
    """The signal any process received (0 = none); a collective when processes > 1.

    Every process must call it at the same points (the step boundaries); once it is non-zero
    it stays so without further collectives.
    """
    if self._agreed:
      return self._agreed
    signum = self.signum
    import jax

    if jax.process_count() > 1:
      import numpy as np
      from jax.experimental import multihost_utils

      signum = int(np.max(multihost_utils.process_allgather(np.int32(signum))))
    if signum:
      self._agreed = signum
    return signum


def requested() -> int:
  """`Handler.requested()` of the innermost active handler (0 without one)."""
  return _active[-1].requested() if _active else 0


def exit_if_requested(step: int) -> None:
  """Raises `Preempted` if a stop was agreed (call after `requested()` broke the loop)."""
  if _active and _active[-1]._agreed:
    error = Preempted(_active[-1]._agreed, step)
    log.warning("%s; the checkpoint of step %d is saved: rerun the same command to resume",
                error, step)
    raise error

