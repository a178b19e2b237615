"""Multi-host start-up: jax.distributed.initialize when asked (flag or environment).

Call `maybe_initialize` before anything touches a JAX device. Afterwards `jax.devices()` lists the
devices of every process, the mesh of `ffkd_jax.parallel` spans them all, and every process runs
the same program on its own share of each batch (docs/MULTIHOST.md).
"""

import logging as std_logging
import os

import jax
from absl import logging

_ENV_FIELDS = ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID')


def _int_env(name: str) -> int | None:
  value = os.environ.get(name)
  if value is None or value == '':
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f'{name}={value!r} must be an integer.') from None


def maybe_initialize(requested: bool = False) -> bool:
  """Initialises JAX's multi-process runtime when `requested` or JAX_COORDINATOR_ADDRESS is set.

  On Cloud TPU pod slices and SLURM / Open MPI clusters JAX detects the coordinator, the process
  count and this process's id by itself (`--multihost` is enough). Elsewhere set
  JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID in every
  process. Returns whether the runtime was initialised. After it, processes other than 0 log
  warnings and errors only.
  """
  address = os.environ.get('JAX_COORDINATOR_ADDRESS') or None
  if not (requested or address):
    return False
  num_processes = _int_env('JAX_NUM_PROCESSES')
  process_id = _int_env('JAX_PROCESS_ID')
  # Cross-process collectives of the CPU backend (CPU-only runs and tests). gloo is JAX's default
  # since 0.4.3x; older releases (and an explicit None) leave multi-process CPU programs unable to
  # run ("Multiprocess computations aren't implemented on the CPU backend").
  if jax.config.jax_cpu_collectives_implementation is None:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  try:
    jax.distributed.initialize(
        coordinator_address=address, num_processes=num_processes, process_id=process_id
    )
  except (ValueError, RuntimeError) as error:
    given = ', '.join(f'{k}={os.environ[k]!r}' for k in _ENV_FIELDS if k in os.environ)
    raise RuntimeError(
        f'jax.distributed.initialize failed ({type(error).__name__}: {error}). Outside Cloud '
        'TPU, SLURM and Open MPI (which JAX detects by itself) set JAX_COORDINATOR_ADDRESS '
        '(host:port of process 0, reachable from every process), JAX_NUM_PROCESSES and '
        f'JAX_PROCESS_ID (0 .. n-1) in every process; given: {given or "none of them"}.'
    ) from error
  if jax.process_index() != 0:
    # Metrics, progress and checkpoint logs come from process 0; the others keep their warnings.
    logging.get_absl_handler().python_handler.addFilter(
        lambda record: record.levelno >= std_logging.WARNING
    )
  logging.warning(
      'Process %d of %d: %d local / %d global devices (%s).',
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
      jax.device_count(),
      jax.devices()[0].platform,
  )
  return True
