"""Host memory for the CPU train step: glibc's malloc told to keep freed memory (opt-in).

XLA's CPU runtime allocates each execution's temporaries afresh: for the resnet56 CE step at
batch 64 one buffer of 280 MB and some 37 MB ones (Eigen's packed convolution inputs) per step.
glibc serves every allocation above 32 MB (its largest mmap threshold) with a new `mmap` and
returns it with `munmap` when freed, so every step touches all of that memory for the first time
again: 68,000 minor page faults a step, each a trap and a zeroed 4 KB page
(`benchmarks/step_time.py` prints the count). `keep_freed_memory` sets three `mallopt`
parameters so that this memory stays in the process and is reused:

- M_MMAP_MAX = 0: no allocation is served by its own mmap (glibc still falls back to mmap where
  the heap cannot grow);
- M_ARENA_MAX = 1: one heap for all threads (a thread's own arena cannot hold more than 64 MB,
  and freed memory there is unmapped again);
- M_TRIM_THRESHOLD = 2 GiB - 1: free memory at the top of the heap is kept, not returned.

The process's memory then stays at its peak instead of shrinking between steps. Measured on the
2-core CPU (`benchmarks/step_time.py`, 2026-12-01, three alternations each, min of 5-8 steps):

- resnet56 CE step: 449-492 -> 410-419 ms, faults a step 68,500 -> 0-17,000; with
  GLIBC_TUNABLES=glibc.malloc.hugetlb=1 also set at process start (transparent huge pages for
  the heap where the kernel gives them on request) 402-406 ms and no faults left;
- resnet56 -> resnet20 FFKD step: 822-835 -> 811-835 ms, no gain, although the faults went from
  84,000 to 0: that step leaves a core idle much of the time and the faults hide there;
- compilation 10-20% slower (14-15 -> 17-18 s for that FFKD step): one arena serialises XLA's
  compiler threads' allocations.

So it is off unless asked for: FFKD_JAX_MALLOC=keep in the environment turns it on (for long CE
runs on a CPU, teacher training for instance); `conv.prepare_backend('auto')` applies it, once
per process, on Linux with glibc, before JAX starts where it is called that early.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform

from absl import logging

# glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
SETTINGS = ((M_MMAP_MAX, 0), (M_ARENA_MAX, 1), (M_TRIM_THRESHOLD, 2**31 - 1))
_OFF = 'default'


def _libc():
  """glibc, or None where this is not Linux with glibc."""
  if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
    return None
  try:
    return ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
  except OSError:
    return None


@functools.lru_cache(maxsize=None)
def keep_freed_memory() -> bool:
  """Applies `SETTINGS` with mallopt (once per process) where FFKD_JAX_MALLOC=keep; returns
  whether they are in force."""
  setting = os.environ.get('FFKD_JAX_MALLOC', _OFF)
  if setting not in ('keep', _OFF):
    raise ValueError(
        f"FFKD_JAX_MALLOC={setting!r}: expected 'keep' (freed memory kept for reuse) or "
        "'default' (glibc's own settings, also what an unset variable means)."
    )
  if setting == _OFF:
    return False
  libc = _libc()
  if libc is None:
    return False
  results = [libc.mallopt(parameter, value) for parameter, value in SETTINGS]
  if not all(results):
    logging.warning('mallopt refused some of %s (results %s).', SETTINGS, results)
    return False
  return True


def describe() -> str:
  """For logs and benchmarks: whether freed host memory is kept, and whether huge pages were
  asked for (GLIBC_TUNABLES=glibc.malloc.hugetlb=1)."""
  kept = keep_freed_memory.cache_info().currsize and keep_freed_memory()
  text = 'host memory: freed memory kept' if kept else "host memory: glibc's defaults"
  huge = 'glibc.malloc.hugetlb=1' in os.environ.get('GLIBC_TUNABLES', '')
  return text + (', huge pages' if huge else '')
