"""Multi-host start-up: jax.distributed.initialize when asked (flag or environment)."""

import os

import jax
from absl import logging


def maybe_initialize(requested: bool = False) -> bool:
  """Initialises JAX's multi-process runtime when `requested` or JAX_COORDINATOR_ADDRESS is set.

  On Cloud TPU pod slices and SLURM/Open MPI clusters the arguments are detected automatically;
  elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
  """
  address = os.environ.get('JAX_COORDINATOR_ADDRESS')
  if not (requested or address):
    return False
  kwargs = {}
  if address:
    kwargs = dict(coordinator_address=address,
                  num_processes=int(os.environ['JAX_NUM_PROCESSES']),
                  process_id=int(os.environ['JAX_PROCESS_ID']))
  jax.distributed.initialize(**kwargs)
  logging.info('Process %d of %d, %d local / %d global devices.', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True
