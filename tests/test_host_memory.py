"""hade_jax/host_memory.py: with keep_freed_pages, a large block freed and allocated again
reuses its pages (no minor page faults); without, every allocation faults its pages in anew.
Each case runs in a process of its own (the setting is process-wide)."""

import platform
import subprocess
import sys

PROGRAM = """
import resource, sys
import numpy as np
from hade_jax import host_memory
applied = host_memory.keep_freed_pages() if sys.argv[1] == "keep" else False
x = np.ones(64 << 20)  # 512 MiB: above any mmap threshold of the default malloc
del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
  x = np.ones(64 << 20)
  del x
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> tuple[str, int]:
  out = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True,
                       check=True).stdout.split()
  return out[0], int(out[1])


def test_kept_pages_are_reused_without_faults():
  applied, kept = _faults("keep")
  if platform.libc_ver()[0] != "glibc":  # another malloc: nothing is set, nothing changes
    assert applied == "False"
    return
  _, default = _faults("default")
  assert applied == "True"
  # numpy asks for huge pages on large arrays: at least one fault per 2 MiB of each new block
  huge_pages = 3 * (512 << 20) // (2 << 20)
  assert default >= huge_pages  # each new block faulted in again
  assert kept < 10  # the freed block's pages served the next allocations
