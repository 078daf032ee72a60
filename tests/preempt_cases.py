r"""SIGTERM / SIGINT stops of a training run (issue 13 item 5), shared by the tests and the fault
harness (`python -m tools.fault_harness --stops=10`, RELIABILITY.md).

`signal_once` starts `python -m hade_jax.train`, sends SIGTERM or SIGINT at a time or after some
steps and waits for the exit; `preempt_and_resume` stops a run at random times (startup
included), reruns the same command after each stop, then runs it to the end. A clean stop exits
with 143 (SIGTERM) or 130 (SIGINT) without a traceback and loses no step (the newest checkpoint
is the last step the run started); the harness then compares the final state with an
uninterrupted run (bit-identical, the same clips at every step).
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import random
import signal
import subprocess
import time
from collections.abc import Sequence

from tests import reliability_helpers as fh

EXPECTED_STATUS = {signal.SIGTERM: 143, signal.SIGINT: 130}


@dataclasses.dataclass
class Stop:
  """One SIGTERM/SIGINT of a training run and what it left behind."""

  signal: str  # 'SIGTERM' | 'SIGINT'
  seconds: float  # from the process start to the signal
  phase: str  # 'startup' (no step of this run logged yet) | 'steps'
  status: int  # the exit status (negative: killed by that signal number)
  exit_s: float  # from the signal to the exit
  last_step: int  # the newest step any run started (batches.jsonl), after the exit
  saved: int  # the newest checkpoint after the exit (0: none)
  lost: int  # last_step - saved: steps that the rerun must train again
  traceback: bool  # a Python traceback in the output
  first_step_s: float | None  # from the process start to its first logged step

  @property
  def clean(self) -> bool:
    # Status 0: the signal came after the last step, and the run finished normally.
    return (self.status in (EXPECTED_STATUS[signal.Signals[self.signal]], 0)
            and self.lost == 0 and not self.traceback)


def signal_once(command: Sequence[str], workdir: pathlib.Path, signum: int,
                log_path: pathlib.Path, *, at_time: float | None = None,
                after_steps: int | None = None, env: dict | None = None,
                timeout: float = 1800) -> Stop | None:
  """Starts `command` and sends `signum` `at_time` seconds after the start, or once the run has
  started `after_steps` steps; waits for the exit.

  Returns:
    What the stop left, or None if the run finished first.
  """
  batches = workdir / "batches.jsonl"
  lines_before = fh._lines(batches)  # noqa: SLF001 - the harness's own helper
  t0, first_step_s = time.monotonic(), None
  with open(log_path, "w") as log:
    proc = subprocess.Popen(command, cwd=fh.ROOT, env=env or fh.train_env(), stdout=log,
                            stderr=subprocess.STDOUT)
  try:
    while proc.poll() is None:
      now = time.monotonic()
      if now - t0 > timeout:
        raise TimeoutError(f"{log_path}: no signal sent within {timeout} s")
      if first_step_s is None and fh._lines(batches) > lines_before:  # noqa: SLF001
        first_step_s = now - t0
      if at_time is not None and now - t0 >= at_time:
        break
      if after_steps is not None and fh._lines(batches) - lines_before >= after_steps:  # noqa: SLF001
        break
      time.sleep(0.002)
    if proc.poll() is not None:
      if proc.returncode:
        raise AssertionError(f"{log_path} exited {proc.returncode}:\n"
                             f"{log_path.read_text()[-4000:]}")
      return None
    new_steps = fh._lines(batches) - lines_before  # noqa: SLF001
    sent = time.monotonic()
    proc.send_signal(signum)
    status = proc.wait(timeout=timeout)
    exit_s = time.monotonic() - sent
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  steps = fh.finished_steps(workdir / "checkpoints")  # noqa: SLF001
  saved = steps[-1] if steps else 0
  last = fh._last_logged_step(workdir)  # noqa: SLF001
  output = log_path.read_text()
  return Stop(signal.Signals(signum).name, sent - t0, "steps" if new_steps else "startup",
              status, exit_s, last, saved, last - saved, "Traceback" in output, first_step_s)


def preempt_and_resume(command: Sequence[str], workdir: pathlib.Path, cases: int,
                       rng: random.Random, log_dir: pathlib.Path, env: dict | None = None,
                       startup_s: float = 20.0, total_steps: int | None = None
                       ) -> tuple[list[Stop], float]:
  """`cases` stops by SIGTERM or SIGINT (drawn from `rng`) at a uniform time between half the
  run's startup (`startup_s` at first, then the last restart's time to its first step) and 4 s
  after it, rerunning `command` after each; then runs it to the end.

  With `total_steps`, each signal comes at that time or once the run has started a random number
  of the steps it has left, whichever is first, so that a fast machine (a warm compilation
  cache) cannot finish the run before the signal.

  Returns:
    (the stops, seconds in all).
  """
  start, stops = time.monotonic(), []
  for i in range(cases):
    signum = rng.choice([signal.SIGTERM, signal.SIGINT])
    at = rng.uniform(0.5, 1.0) * startup_s + rng.uniform(0.0, 4.0)
    after = None
    if total_steps is not None:
      left = total_steps - fh._last_logged_step(workdir)  # noqa: SLF001
      if left < 2:
        break
      after = rng.randint(1, left - 1)
    stop = signal_once(command, workdir, signum, log_dir / f"stop_{i:02d}.log", at_time=at,
                       after_steps=after, env=env)
    if stop is None:
      break
    stops.append(stop)
    logging.info("stop %d: %s", i, stop)
    if stop.first_step_s is not None:  # a restart's startup, to aim the next signal
      startup_s = stop.first_step_s
  fh.run(command, log_dir / "final.log", env=env, timeout=1800)
  return stops, time.monotonic() - start


def summary(stops: Sequence[Stop], same: dict) -> str:
  """One RELIABILITY.md row."""
  by_signal = {s: sum(x.signal == s for x in stops) for s in ("SIGTERM", "SIGINT")}
  clean = sum(x.clean for x in stops)
  return (f"| {len(stops)} SIGTERM/SIGINT stops at random times ({by_signal['SIGTERM']} "
          f"SIGTERM, {by_signal['SIGINT']} SIGINT; {sum(x.phase == 'startup' for x in stops)} "
          f"during startup), rerun after each | {clean}/{len(stops)} clean (status 143/130, no "
          f"traceback), {sum(x.lost for x in stops)} steps lost in all, exit "
          f"{max((x.exit_s for x in stops), default=0):.1f} s after the signal at most; final "
          f"state bit-identical ({same['arrays']} arrays), same data order |")
