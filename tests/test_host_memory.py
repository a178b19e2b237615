"""ffkd_jax.host_memory: on glibc's defaults each large buffer of an XLA execution is mapped and
faulted afresh; with FFKD_JAX_MALLOC=tcmalloc (what 'auto' comes to where it is installed) or
keep, memory freed by one execution serves the next without new page faults; with huge, it is
faulted in 2 MB pages. The entry points re-execute themselves once for what must be set at
process start (LD_PRELOAD, GLIBC_TUNABLES)."""

import json
import os
import subprocess
import sys

import pytest

from ffkd_jax import host_memory

_PROGRAM = r"""
import json, resource, sys
from ffkd_jax.models import conv
conv.prepare_backend('auto')
import jax, jax.numpy as jnp
from ffkd_jax import host_memory
f = jax.jit(lambda x: jnp.cumsum(x * 2.0) + x)  # a 48 MB output, above glibc's mmap threshold
x = jnp.ones((12 * 2**20,), jnp.float32)
y = f(x).block_until_ready()
faults = []
for _ in range(12):
  del y
  start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  y = f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
print(json.dumps({'faults': faults, 'describe': host_memory.describe()}))
"""


def _clean_env(**settings):
  env = dict(os.environ, JAX_PLATFORMS='cpu', **settings)
  for name in ('GLIBC_TUNABLES', 'LD_PRELOAD', 'FFKD_JAX_MALLOC'):
    if name not in settings:
      env.pop(name, None)
  return env


def _run(setting, new_process=False):
  """The program's faults per call under `setting`, started as an entry point would start it
  (`for_new_process`) or, by default, as a plain child process (nothing preloaded)."""
  env = _clean_env(FFKD_JAX_MALLOC=setting)
  if new_process:
    env = host_memory.for_new_process(env)
  out = subprocess.run(
      [sys.executable, '-c', _PROGRAM], env=env, capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 0, out.stderr[-2000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(host_memory._libc() is None, reason='mallopt is glibc-only (Linux)')
def test_kept_memory_is_reused_without_page_faults():
  default, kept = _run('default'), _run('keep')
  pages = 12 * 2**20 * 4 // 4096  # the output's 4 KB pages
  assert min(default['faults']) > pages // 2, default  # mapped and touched afresh each call
  # kept: reused once the heap has grown to the calls' pattern (a few calls, timing-dependent),
  # so over twelve calls at most about half what the defaults fault
  assert sum(kept['faults']) < 0.6 * sum(default['faults']), (kept, default)
  assert min(kept['faults']) < pages // 10, kept
  assert default['describe'].startswith("host memory: glibc's defaults")
  assert kept['describe'].startswith('host memory: glibc, freed memory kept')


_TCMALLOC = host_memory.tcmalloc_library()
_NO_TCMALLOC = 'no tcmalloc here (Debian/Ubuntu: apt-get install libtcmalloc-minimal4)'


@pytest.mark.skipif(_TCMALLOC is None, reason=_NO_TCMALLOC)
def test_tcmalloc_reuses_freed_buffers_without_page_faults():
  default = _run('default')
  for setting in ('tcmalloc', 'auto'):
    tc = _run(setting, new_process=True)
    pages = 12 * 2**20 * 4 // 4096
    assert min(default['faults']) > pages // 2, default
    # once tcmalloc holds the calls' pattern, a call faults almost nothing in (it returns
    # freed spans to the kernel only gradually)
    assert sum(tc['faults'][2:]) < 0.2 * sum(default['faults'][2:]), (tc, default)
    assert tc['describe'] == 'host memory: tcmalloc', tc
  assert default['describe'] == "host memory: glibc's defaults"


def test_a_bad_setting_names_the_variable_and_the_valid_values(monkeypatch):
  monkeypatch.setenv('FFKD_JAX_MALLOC', 'yes')
  host_memory.keep_freed_memory.cache_clear()
  with pytest.raises(
      ValueError, match=r"FFKD_JAX_MALLOC='yes'.*'auto'.*'tcmalloc'.*'huge'.*'keep'.*'default'"
  ):
    host_memory.keep_freed_memory()
  host_memory.keep_freed_memory.cache_clear()
  with pytest.raises(ValueError, match=r"FFKD_JAX_MALLOC='yes'"):
    host_memory.restart_with_allocator()
  with pytest.raises(ValueError, match=r"FFKD_JAX_MALLOC='no'"):
    host_memory.for_new_process({'FFKD_JAX_MALLOC': 'no'})


def test_huge_pages_fault_large_buffers_in_2mb_pages():
  env = host_memory.for_new_process({'FFKD_JAX_MALLOC': 'huge'})
  if not host_memory._huge_pages_available():  # nothing to ask of glibc here: nothing asked
    assert 'GLIBC_TUNABLES' not in env
    return
  assert env['GLIBC_TUNABLES'] == host_memory.HUGE_PAGES_TUNABLE
  default, huge = _run('default'), _run('huge', new_process=True)
  pages = 12 * 2**20 * 4 // 4096
  assert min(default['faults']) > pages // 2, default
  # mostly 2 MB pages (the unaligned ends and small allocations still fault in 4 KB ones):
  # 870-1,400 a call on the development machine against 12,288 and more without
  assert max(huge['faults']) < pages // 4, huge
  assert huge['describe'] == "host memory: glibc's defaults, huge pages"
  # added to a caller's own tunables, never twice, and never under 'default'
  both = host_memory.for_new_process(
      {'FFKD_JAX_MALLOC': 'huge', 'GLIBC_TUNABLES': 'glibc.malloc.check=0'}
  )
  assert both['GLIBC_TUNABLES'] == 'glibc.malloc.check=0:' + host_memory.HUGE_PAGES_TUNABLE
  assert host_memory.for_new_process(both) == both
  for off in ({'FFKD_JAX_MALLOC': 'default'}, {}, {'FFKD_JAX_MALLOC': 'keep'}):
    assert 'GLIBC_TUNABLES' not in host_memory.for_new_process(off), off


def test_the_environment_for_a_new_process_names_tcmalloc_where_asked_and_installed(
    monkeypatch,
):
  for off in ({'FFKD_JAX_MALLOC': 'default'}, {'FFKD_JAX_MALLOC': 'keep'}):
    assert host_memory.for_new_process(off) == off
  monkeypatch.setattr(host_memory, 'tcmalloc_library', lambda: None)  # not installed
  for setting in ({}, {'FFKD_JAX_MALLOC': 'auto'}, {'FFKD_JAX_MALLOC': 'tcmalloc'}):
    assert host_memory.for_new_process(setting) == setting
  monkeypatch.setattr(host_memory, 'tcmalloc_library', lambda: 'libtcmalloc_minimal.so.4')
  env = host_memory.for_new_process({})  # unset means 'auto'
  assert env['LD_PRELOAD'] == 'libtcmalloc_minimal.so.4'
  assert env['TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD'] == str(2**40)
  assert host_memory.for_new_process(env) == env  # never twice
  mine = {'FFKD_JAX_MALLOC': 'tcmalloc', 'LD_PRELOAD': 'libmine.so',
          'TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD': '5'}  # fmt: skip
  env = host_memory.for_new_process(mine)
  assert env['LD_PRELOAD'] == 'libtcmalloc_minimal.so.4:libmine.so'  # a caller's own kept
  assert env['TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD'] == '5'
  assert 'LD_PRELOAD' not in host_memory.for_new_process({'FFKD_JAX_MALLOC': 'default'})
  # an allocator the caller preloads already is their choice: never a second one
  for preload in ('/usr/lib/x86_64-linux-gnu/libjemalloc.so.2', '/opt/lib/libtcmalloc.so.4'):
    env = {'LD_PRELOAD': preload}
    assert host_memory.for_new_process(env) == env, preload


_RESTART = r"""
import json, os, sys
print('started', flush=True)
from ffkd_jax import host_memory
host_memory.restart_with_allocator()
print(json.dumps({'tunables': os.environ.get('GLIBC_TUNABLES'), 'argv': sys.argv[1:],
                  'marker': [k for k in os.environ if k.startswith('_FFKD_JAX')],
                  'tcmalloc': host_memory.tcmalloc_active()}))
"""


@pytest.mark.parametrize('setting', ['huge', 'default', 'keep', 'tcmalloc', 'auto', None])
def test_an_entry_point_restarts_once_for_its_allocator(setting):
  env = _clean_env() if setting is None else _clean_env(FFKD_JAX_MALLOC=setting)
  out = subprocess.run(
      [sys.executable, '-c', _RESTART, '--flag', 'x'],
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.strip().splitlines()
  result = json.loads(lines[-1])
  assert result['argv'] == ['--flag', 'x'] and result['marker'] == []
  if setting == 'huge' and host_memory._huge_pages_available():
    assert lines.count('started') == 2  # ran again, once, with the same arguments
    assert result['tunables'] == host_memory.HUGE_PAGES_TUNABLE
  elif setting in ('tcmalloc', 'auto', None) and _TCMALLOC is not None:
    assert lines.count('started') == 2
    assert result['tcmalloc'] and result['tunables'] is None
  else:
    assert lines.count('started') == 1 and result['tunables'] is None
    assert not result['tcmalloc']
