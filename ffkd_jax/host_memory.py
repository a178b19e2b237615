"""Host memory for the CPU train step: which allocator serves XLA's buffers (FFKD_JAX_MALLOC).

XLA's CPU runtime allocates each execution's temporaries afresh: for the resnet56 CE step at
batch 64 one buffer of 280 MB and some 37 MB ones (Eigen's packed convolution inputs) per step.
glibc serves every allocation above 32 MB (its largest mmap threshold) with a new `mmap` and
returns it with `munmap` when freed, so every step touches all of that memory for the first time
again: 68,000-118,000 minor page faults a step, each a trap and a zeroed 4 KB page, 11-20% of
the step's CPU time in the kernel (`perf`; `benchmarks/step_time.py` prints the count).
FFKD_JAX_MALLOC says what to do about it:

  'auto'     (default, also what an unset variable means) 'tcmalloc' where its library is
             installed (Debian/Ubuntu: `apt-get install libtcmalloc-minimal4`), else 'default'.
             It is the host's allocator, whatever the JAX backend: measured on the CPU only,
             and harmless elsewhere (the host side of a GPU or TPU run allocates little);
  'tcmalloc' gperftools' tcmalloc serves every allocation: it keeps freed spans for reuse (and
             hands them back to the kernel gradually), so a step reuses the last step's memory;
  'huge'     glibc with its tunable `glibc.malloc.hugetlb=1`: large buffers faulted in 2 MB pages;
  'keep'     glibc with `mallopt` set so that freed memory stays in the process (below);
  'default'  glibc as it is.

'tcmalloc' and 'huge' must be in place when the process starts: an entry point (`python -m
ffkd_jax.main`, `benchmarks/step_time.py`) calls `restart_with_allocator()` first, which
re-executes the process once with LD_PRELOAD (or GLIBC_TUNABLES) set, and a launcher of JAX
processes (`benchmarks/throughput.py`) passes `for_new_process(env)` to them. A notebook or a
test process never re-executes itself: it keeps the allocator it started with.

Measured on the 2-core CPU (`benchmarks/step_time.py`, min of 4-5 steps, alternated, one sitting
each; the host's speed moves by 10-30% between sittings):

- 2026-12-02 01:55 (an Intel Xeon host), the resnet56 -> resnet20 FFKD step, two alternations:
  glibc 790 / 865 ms (114,700-117,600 faults a step), tcmalloc 738 / 753 ms (1,200-25,200
  faults), and compilation 13.7-14.1 -> 12.3-12.8 s; a second sitting (02:00): glibc 875 / 884,
  tcmalloc 747-778, tcmalloc with TCMALLOC_RELEASE_RATE=0 735-752 (no faults, memory never
  returned: not worth it), jemalloc 5.3 989-1013 with its defaults (it returns freed pages
  within seconds: 280,000 faults) and 757 with decay off. In `benchmarks/throughput.py
  --quick` (02:08, tcmalloc for every worker, PyTorch's too) compile times fell by about half
  (the resnet56 CE step 7.0 -> 4.1 s). PyTorch itself gains 2-4% from tcmalloc (resnet56 CE
  342-349 -> 336-338 ms): its CPU allocations do not follow XLA's pattern.
- 'keep' (01:45): the resnet56 CE step 505 -> 412 ms with no faults left, but the FFKD step
  917-947 -> 831-939 ms, and 8% of its CPU time in glibc's `_int_malloc` (`perf`): one heap
  that large is slow to search. It also made compiling 10-20% slower (one arena serialises the
  compiler threads' allocations). Its settings: M_MMAP_MAX = 0 (no allocation served by its own
  mmap), M_ARENA_MAX = 1 (a thread's own arena cannot hold more than 64 MB, and freed memory
  there is unmapped again), M_TRIM_THRESHOLD = 2 GiB - 1 (free memory at the top of the heap is
  kept); `conv.prepare_backend('auto')` applies them, once per process, before JAX starts
  where it is called that early.
- 'huge' (2026-12-01): the FFKD step 661-709 -> 611-681 ms and 755-763 -> 657-683 ms in two
  sittings (faults 117,000 -> 1,800-7,500), but with 4 s of idle before each step slower (713 ->
  814 ms; the resnet56 CE step 511 -> 586 ms at 01:45 with 3 s), and no change in
  `throughput.py --quick`, whose workers run one step a round between the others' turns. It
  needs glibc >= 2.35 and transparent huge pages not 'never'
  (/sys/kernel/mm/transparent_hugepage/enabled).
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
_AUTO = 'auto'
_TCMALLOC = 'tcmalloc'
_HUGE = 'huge'
_KEEP = 'keep'
_OFF = 'default'
CHOICES = (_AUTO, _TCMALLOC, _HUGE, _KEEP, _OFF)
HUGE_PAGES_TUNABLE = 'glibc.malloc.hugetlb=1'
_THP_MODES = '/sys/kernel/mm/transparent_hugepage/enabled'
_TCMALLOC_NAMES = ('tcmalloc_minimal', 'tcmalloc')  # gperftools' libraries, the lighter first
# tcmalloc reports every allocation above 1 GB on stderr (the resnet32x4 FFKD step's temporaries
# come near it); a caller's own value is kept
_TCMALLOC_QUIET = ('TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD', str(2**40))


def setting(env: Mapping[str, str] | None = None) -> str:
  """FFKD_JAX_MALLOC of `env` (default: this process's), checked: one of `CHOICES` ('auto' where
  it is unset or empty)."""
  value = (os.environ if env is None else env).get('FFKD_JAX_MALLOC') or _AUTO
  if value not in CHOICES:
    raise ValueError(
        f"FFKD_JAX_MALLOC={value!r}: expected 'auto' (tcmalloc where installed, the default), "
        "'tcmalloc', 'huge' (glibc's huge pages from process start), 'keep' (glibc keeps freed "
        "memory for reuse) or 'default' (glibc's own settings)."
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
def tcmalloc_library() -> str | None:
  """The name of gperftools' tcmalloc library as the dynamic loader finds it (for LD_PRELOAD),
  or None where it is not installed (or this is not Linux). Never loaded into this process:
  memory from one allocator freed by another is corrupt."""
  if platform.system() != 'Linux':
    return None
  for name in _TCMALLOC_NAMES:
    found = ctypes.util.find_library(name)
    if found:
      return found
  return None


def tcmalloc_active() -> bool:
  """Whether tcmalloc is mapped into this process (preloaded when it started)."""
  try:
    with open('/proc/self/maps', encoding='ascii', errors='replace') as maps:
      return any('libtcmalloc' in line for line in maps)
  except OSError:
    return False


def _allocator(env: Mapping[str, str]) -> str:
  """What `env`'s setting comes to on this host: 'tcmalloc', 'huge', 'keep' or 'default'."""
  value = setting(env)
  if value == _AUTO:
    return _TCMALLOC if tcmalloc_library() else _OFF
  return value


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
  """For logs and benchmarks: the allocator this process runs on."""
  if tcmalloc_active():
    return 'host memory: tcmalloc'
  kept = keep_freed_memory.cache_info().currsize and keep_freed_memory()
  text = 'host memory: glibc, freed memory kept' if kept else "host memory: glibc's defaults"
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
  it; `for_new_process` sets it only where it is known)."""
  return HUGE_PAGES_TUNABLE in os.environ.get('GLIBC_TUNABLES', '').split(':')


_ALLOCATORS = ('tcmalloc', 'jemalloc', 'mimalloc')


def _preloaded_allocator(env: Mapping[str, str]) -> str | None:
  """The first allocator library `env`'s LD_PRELOAD names (a choice already made), or None."""
  for entry in env.get('LD_PRELOAD', '').replace(':', ' ').split():
    if any(name in os.path.basename(entry) for name in _ALLOCATORS):
      return entry
  return None


def for_new_process(env: Mapping[str, str]) -> dict[str, str]:
  """`env` for a process about to be started, with what its FFKD_JAX_MALLOC (checked, as by
  `setting`) needs at process start: tcmalloc added to LD_PRELOAD ('tcmalloc', or 'auto' where
  it is installed, unless LD_PRELOAD names an allocator already), or glibc's huge-page tunable
  to GLIBC_TUNABLES ('huge', where the host has it). Otherwise a copy of `env`."""
  env = dict(env)
  allocator = _allocator(env)
  if allocator == _TCMALLOC:
    library = tcmalloc_library()
    if library and not _preloaded_allocator(env):  # never two allocators in one process
      preload = env.get('LD_PRELOAD', '')
      env['LD_PRELOAD'] = f'{library}:{preload}' if preload else library
      env.setdefault(*_TCMALLOC_QUIET)
  elif allocator == _HUGE:
    tunables = env.get('GLIBC_TUNABLES', '')
    if HUGE_PAGES_TUNABLE not in tunables.split(':') and _huge_pages_available():
      env['GLIBC_TUNABLES'] = f'{tunables}:{HUGE_PAGES_TUNABLE}' if tunables else HUGE_PAGES_TUNABLE
  return env


def restart_with_allocator() -> None:
  """At an entry point's very start: re-executes this process, once, with what `for_new_process`
  adds to its environment (see the module docstring). Returns, doing nothing, where nothing is
  to be added: the re-executed process has it already, so no marker is needed. On success it
  does not return. An explicit 'tcmalloc' or 'huge' that this host cannot give is a warning."""
  value = setting()  # a bad value fails here, before any work
  env = for_new_process(os.environ)
  if env == dict(os.environ):
    preloaded = _preloaded_allocator(env)
    if value in (_TCMALLOC, _AUTO) and preloaded and 'tcmalloc' in preloaded:
      if not tcmalloc_active():
        logging.warning(
            'LD_PRELOAD names %s, but it is not mapped (ld.so could not load it?): running on '
            "glibc's allocator.",
            preloaded,
        )
    elif value == _TCMALLOC and not tcmalloc_active():
      logging.warning(
          'FFKD_JAX_MALLOC=tcmalloc: no tcmalloc library found (Debian/Ubuntu: apt-get install '
          "libtcmalloc-minimal4)%s; running on glibc's allocator.",
          f', and LD_PRELOAD names {preloaded}' if preloaded else '',
      )
    elif value == _HUGE and not huge_pages_active():
      logging.warning(
          'FFKD_JAX_MALLOC=huge: this host cannot give huge pages on request (needs Linux, '
          'glibc >= 2.35 and transparent huge pages not "never" in %s); running without.',
          _THP_MODES,
      )
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)
