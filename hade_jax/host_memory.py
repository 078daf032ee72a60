"""How a training process's host memory is reused: glibc's malloc keeps the pages it frees.

XLA:CPU allocates each step's temporaries (GiBs for the towers' activations and gradients) and
frees them when the step ends. glibc returns large freed blocks to the kernel (blocks over the
mmap threshold are unmapped; the top of the heap is trimmed), so the next step touches fresh
pages again: on the comparison's CPU step (benchmarks/compare.py, batch 8) that was ~750,000
minor page faults, 2.9 GiB of pages zeroed by the kernel, per step. Telling malloc to serve
every block from one heap and never give it back makes the step reuse its pages: 0 faults per
step, and that step ran at 0.95x PyTorch instead of 0.92x (BENCHMARKS.md, "Fresh pages");
all-pairs scoring ran faster too (consecutive `benchmarks.pair_score --quick` runs: today's
formula 6.9 -> 4.2 s; the full-size benchmark runs every process with it). But the demo's
training ran 1.29x slower with it (15:00 of wall clock against 11:38 with glibc's defaults, one
run each, one after the other), and a variant with a heap per thread (no arena_max) ran the demo
in 9:38 but the comparison's step at 0.59x. So the eval command applies it (`python -m
hade_jax.eval`) and training only when asked: `TrainConfig.keep_freed_memory` (default off; the
train command, hence `ablate` and the launchers). The library never applies it, so a notebook or
a test process keeps the default malloc. The cost is a resident size that stays at its peak.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger(__name__)

# mallopt(3) parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def keep_freed_pages() -> bool:
  """Makes glibc's malloc keep freed memory for reuse; False where it cannot (not glibc).

  mmap_max 0: no block is served by its own mapping (which free would unmap); arena_max 1:
  one heap for every thread, so XLA's worker threads reuse each other's blocks; trim threshold
  -1 (SIZE_MAX once malloc reads it as size_t): the heap's free top is never returned.
  """
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  libc = ctypes.CDLL(ctypes.util.find_library("c"))
  done = all(libc.mallopt(option, value) == 1 for option, value in (
      (_M_MMAP_MAX, 0), (_M_ARENA_MAX, 1), (_M_TRIM_THRESHOLD, -1)))
  if not done:
    log.warning("mallopt refused a setting: freed host memory is returned to the kernel as "
                "before (config.keep_freed_memory has no effect here)")
  return done
