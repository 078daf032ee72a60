"""Running one command in several local JAX processes (CPU devices, one coordinator)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from collections.abc import Sequence

import portpicker

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_in_processes(module: str, args: Sequence[str], log_prefix: pathlib.Path, *,
                     processes: int, devices_per_process: int, timeout: float = 400
                     ) -> list[str]:
  """`python -m module args --coordinator_address=... --num_processes=N --process_id=I` for
  I in [0, N), all at once; fails with every process's log tail unless all exit 0.

  Returns:
    Each process's output (stdout and stderr), in process order.
  """
  port = portpicker.pick_unused_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
  command = [sys.executable, "-m", module, *args, f"--coordinator_address=localhost:{port}",
             f"--num_processes={processes}"]
  logs = [log_prefix.parent / f"{log_prefix.name}.process_{i}.log" for i in range(processes)]
  running = []
  try:
    for i, log in enumerate(logs):
      with open(log, "w") as f:
        running.append(subprocess.Popen(command + [f"--process_id={i}"], cwd=ROOT, env=env,
                                        stdout=f, stderr=subprocess.STDOUT))
    codes = [p.wait(timeout=timeout) for p in running]
  finally:
    for p in running:
      if p.poll() is None:
        p.kill()
  outputs = [log.read_text() for log in logs]
  tails = "\n".join(f"--- {log.name} ---\n{out[-3000:]}"
                    for log, out in zip(logs, outputs, strict=True))
  assert codes == [0] * processes, tails
  return outputs
