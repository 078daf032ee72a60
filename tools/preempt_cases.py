"""SIGTERM / SIGINT stops of a training run at random times, measured (RELIABILITY.md, item 5).

  python -m tools.preempt_cases --cases=10 --steps=60

The cases themselves (`signal_once`, `preempt_and_resume`, `summary`) live in
tests/preempt_cases.py, which the tests share; this is the command line that runs many of them.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import random
import signal
import tempfile
from collections.abc import Sequence

from tests import preempt_cases
from tests import reliability_helpers as fh

signal_once, preempt_and_resume, summary = (preempt_cases.signal_once,
                                            preempt_cases.preempt_and_resume,
                                            preempt_cases.summary)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", type=int, default=10)
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--tmp", default="")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  tmp = pathlib.Path(args.tmp or tempfile.mkdtemp(prefix="preempt_cases_"))
  data_dir = fh.prepare_tiny(tmp / "data")
  overrides = dict(total_steps=args.steps, checkpoint_every_steps=25, keep_checkpoints=3)
  env = fh.train_env(tmp / "compile_cache")
  reference, stopped = tmp / "reference", tmp / "stopped"
  fh.run(fh.train_command(reference, data_dir, fh.minilm_dir(), **overrides),
         tmp / "reference.log", env=env, timeout=1800)
  # A restart's startup (the compiled step comes from the cache the reference filled).
  probe = signal_once(fh.train_command(tmp / "probe", data_dir, fh.minilm_dir(), **overrides),
                      tmp / "probe", signal.SIGTERM, tmp / "probe.log", after_steps=1, env=env)
  command = fh.train_command(stopped, data_dir, fh.minilm_dir(), **overrides)
  stops, seconds = preempt_and_resume(command, stopped, args.cases, random.Random(args.seed),
                                      tmp, env=env, startup_s=probe.first_step_s)
  same = fh.assert_same_run(reference, stopped, args.steps)
  for i, s in enumerate(stops):
    print(f"{i:2d} {s.signal:7s} at {s.seconds:5.1f}s {s.phase:7s} status {s.status:4d} "
          f"exit {s.exit_s:4.1f}s last step {s.last_step:3d} saved {s.saved:3d} lost {s.lost} "
          f"traceback {s.traceback}")
  print(f"{seconds:.0f} s in all; logs in {tmp}")
  print(summary(stops, same))


if __name__ == "__main__":
  main()
