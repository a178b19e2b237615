"""ffkd_jax.host_memory: with FFKD_JAX_MALLOC=keep, memory freed by one XLA execution serves the
next without new page faults; without it, each large buffer is mapped and faulted afresh. With
FFKD_JAX_MALLOC=huge, it is faulted in 2 MB pages, and the entry points re-execute themselves
once to get them."""

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


def _run(setting, huge_pages=False):
  env = dict(os.environ, FFKD_JAX_MALLOC=setting, JAX_PLATFORMS='cpu')
  env.pop('GLIBC_TUNABLES', None)
  if huge_pages:
    env = host_memory.with_huge_pages(env)
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
  assert kept['describe'].startswith('host memory: freed memory kept')


def test_a_bad_setting_names_the_variable_and_the_valid_values(monkeypatch):
  monkeypatch.setenv('FFKD_JAX_MALLOC', 'yes')
  host_memory.keep_freed_memory.cache_clear()
  with pytest.raises(ValueError, match=r"FFKD_JAX_MALLOC='yes'.*'huge'.*'keep'.*'default'"):
    host_memory.keep_freed_memory()
  host_memory.keep_freed_memory.cache_clear()
  with pytest.raises(ValueError, match=r"FFKD_JAX_MALLOC='yes'"):
    host_memory.restart_with_huge_pages()
  with pytest.raises(ValueError, match=r"FFKD_JAX_MALLOC='no'"):
    host_memory.with_huge_pages({'FFKD_JAX_MALLOC': 'no'})


def test_huge_pages_fault_large_buffers_in_2mb_pages():
  env = host_memory.with_huge_pages({'FFKD_JAX_MALLOC': 'huge'})
  if not host_memory._huge_pages_available():  # nothing to ask of glibc here: nothing asked
    assert 'GLIBC_TUNABLES' not in env
    return
  assert env['GLIBC_TUNABLES'] == host_memory.HUGE_PAGES_TUNABLE
  default, huge = _run('default'), _run('huge', huge_pages=True)
  pages = 12 * 2**20 * 4 // 4096
  assert min(default['faults']) > pages // 2, default
  # mostly 2 MB pages (the unaligned ends and small allocations still fault in 4 KB ones):
  # 870-1,400 a call on the development machine against 12,288 and more without
  assert max(huge['faults']) < pages // 4, huge
  assert huge['describe'] == "host memory: glibc's defaults, huge pages"
  # added to a caller's own tunables, never twice, and never under 'default'
  both = host_memory.with_huge_pages(
      {'FFKD_JAX_MALLOC': 'huge', 'GLIBC_TUNABLES': 'glibc.malloc.check=0'}
  )
  assert both['GLIBC_TUNABLES'] == 'glibc.malloc.check=0:' + host_memory.HUGE_PAGES_TUNABLE
  assert host_memory.with_huge_pages(both) == both
  for off in ({'FFKD_JAX_MALLOC': 'default'}, {}, {'FFKD_JAX_MALLOC': 'keep'}):
    assert 'GLIBC_TUNABLES' not in host_memory.with_huge_pages(off), off


_RESTART = r"""
import json, os, sys
print('started', flush=True)
from ffkd_jax import host_memory
host_memory.restart_with_huge_pages()
print(json.dumps({'tunables': os.environ.get('GLIBC_TUNABLES'), 'argv': sys.argv[1:],
                  'marker': [k for k in os.environ if k.startswith('_FFKD_JAX')]}))
"""


@pytest.mark.parametrize('setting', ['huge', 'default', 'keep', None])
def test_an_entry_point_restarts_once_with_huge_pages(setting):
  env = dict(os.environ)
  env.pop('GLIBC_TUNABLES', None)
  env.pop('FFKD_JAX_MALLOC', None)
  if setting is not None:
    env['FFKD_JAX_MALLOC'] = setting
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
  else:
    assert lines.count('started') == 1 and result['tunables'] is None
