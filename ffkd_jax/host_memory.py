"""Host memory for the CPU train step: huge pages from process start, or freed memory kept
(both opt-in).

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

Huge pages alone (FFKD_JAX_MALLOC=huge) cut the faults without that compile-time price: glibc's
tunable `glibc.malloc.hugetlb=1` makes it
`madvise(MADV_HUGEPAGE)` the memory it maps, so a 280 MB buffer faults in as 140 pages of 2 MB
instead of 70,000 of 4 KB. glibc reads GLIBC_TUNABLES only when a process starts, so
`restart_with_huge_pages` re-executes the process once with it set, at the start of
`python -m ffkd_jax.main` and of `benchmarks/step_time.py`, and `with_huge_pages` adds it to
the environment of the JAX workers `benchmarks/throughput.py` starts (not to PyTorch's, which
runs as its users run it). Measured 2026-12-01 (`benchmarks/step_time.py --method ffkd
--teacher resnet56 --student resnet20 --steps 5`, three alternations, min): 661-709 -> 611-681
ms, compile time unchanged (12.2-13.0 s); with 'keep' as well, no better (624-697 ms); the next
sitting (00:15) 755-763 -> 657-683 ms; faults a step 117,000-119,000 -> 1,800-7,500. But with 4 s of
idle before each step (step_time.py with a `time.sleep(4)` added, 4 steps) it was slower, 713 ->
814 ms, cores busy 1.90 -> 1.83 (my guess, not measured: faulting huge pages in after idle time
waits in the kernel, for compaction), and in `benchmarks/throughput.py --quick`, whose
workers run one step a round between the other workers' turns, it changed nothing (torch_ratio
0.901 / 0.801 without, 0.880 / 0.802 with, 00:12-00:16). So it is opt-in too, for runs whose
steps follow each other without pauses. It needs glibc >= 2.35 and transparent huge pages in
'madvise' or 'always' mode (/sys/kernel/mm/transparent_hugepage/enabled); elsewhere nothing is
done. FFKD_JAX_MALLOC=default, or unset, leaves glibc alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
import sys
from typing import Mapping

from absl import logging

# glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
SETTINGS = ((M_MMAP_MAX, 0), (M_ARENA_MAX, 1), (M_TRIM_THRESHOLD, 2**31 - 1))
_OFF = 'default'
_HUGE = 'huge'
_KEEP = 'keep'
HUGE_PAGES_TUNABLE = 'glibc.malloc.hugetlb=1'
_THP_MODES = '/sys/kernel/mm/transparent_hugepage/enabled'


def setting(env: Mapping[str, str] | None = None) -> str:
  """FFKD_JAX_MALLOC of `env` (default: this process's), checked: 'default' (also what an unset
  variable means), 'huge' or 'keep'."""
  value = (os.environ if env is None else env).get('FFKD_JAX_MALLOC', _OFF)
  if value not in (_HUGE, _KEEP, _OFF):
    raise ValueError(
        f"FFKD_JAX_MALLOC={value!r}: expected 'huge' (huge pages from process start at the "
        "entry points), 'keep' (freed memory kept for reuse) or 'default' (glibc's own "
        'settings, also what an unset variable means).'
    )
  return value


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
  if setting() != _KEEP:
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
  return text + (', huge pages' if huge_pages_active() else '')


def _huge_pages_available() -> bool:
  """Linux, glibc >= 2.35 (the tunable's first release) and transparent huge pages not 'never'."""
  if _libc() is None:
    return False
  version = tuple(int(p) for p in platform.libc_ver()[1].split('.')[:2] if p.isdigit())
  if version < (2, 35):
    return False
  try:
    with open(_THP_MODES, encoding='ascii') as modes:
      return '[never]' not in modes.read()
  except OSError:
    return False


def huge_pages_active() -> bool:
  """Whether this process started with glibc's huge-page tunable set (glibc before 2.35 ignores
  it; `with_huge_pages` sets it only where it is known)."""
  return HUGE_PAGES_TUNABLE in os.environ.get('GLIBC_TUNABLES', '').split(':')


def with_huge_pages(env: Mapping[str, str]) -> dict[str, str]:
  """`env` with glibc's huge-page tunable added to GLIBC_TUNABLES, where `env`'s FFKD_JAX_MALLOC
  is 'huge' (checked, as by `setting`) and the host supports it (for a process about to be
  started); otherwise a copy of `env`."""
  env = dict(env)
  tunables = env.get('GLIBC_TUNABLES', '')
  if (
      setting(env) == _HUGE
      and HUGE_PAGES_TUNABLE not in tunables.split(':')
      and _huge_pages_available()
  ):
    env['GLIBC_TUNABLES'] = f'{tunables}:{HUGE_PAGES_TUNABLE}' if tunables else HUGE_PAGES_TUNABLE
  return env


def restart_with_huge_pages() -> None:
  """At an entry point's very start: re-executes this process, once, with glibc's huge-page
  tunable set (see the module docstring), where `setting()` is 'huge', the host supports it and
  it is not set already. Returns (doing nothing) otherwise; on success it does not return. The
  re-executed process has the tunable set, so it returns there: no marker is needed."""
  if setting() != _HUGE:  # a bad value fails here, before any work
    return
  if huge_pages_active():
    return
  env = with_huge_pages(os.environ)
  if env == dict(os.environ):
    logging.warning(
        'FFKD_JAX_MALLOC=huge: this host cannot give huge pages on request (needs Linux, glibc '
        '>= 2.35 and transparent huge pages not "never" in %s); running without.',
        _THP_MODES,
    )
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)
