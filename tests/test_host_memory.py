"""ffkd_jax.host_memory: with FFKD_JAX_MALLOC=keep, memory freed by one XLA execution serves the
next without new page faults; without it, each large buffer is mapped and faulted afresh."""

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


def _run(setting):
  env = dict(os.environ, FFKD_JAX_MALLOC=setting, JAX_PLATFORMS='cpu')
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
  with pytest.raises(ValueError, match=r"FFKD_JAX_MALLOC='yes'.*'keep'.*'default'"):
    host_memory.keep_freed_memory()
  host_memory.keep_freed_memory.cache_clear()
