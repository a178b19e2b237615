"""The device mesh and how host data becomes global, data-sharded arrays."""

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = 'data'


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D mesh over every device (of every process), its axis named `data`."""
  devices = jax.devices() if devices is None else devices
  return jax.sharding.Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def local_batch_size(global_batch_size: int, field: str = 'config.batch_size') -> int:
  """This process's share of a global batch; the global batch must split evenly over devices."""
  num_devices = jax.device_count()
  if global_batch_size <= 0 or global_batch_size % num_devices:
    raise ValueError(
        f'{field}={global_batch_size} must be a positive multiple of the device count '
        f'({num_devices} devices: {jax.devices()[0].platform}); e.g. '
        f'{max(1, global_batch_size // num_devices) * num_devices or num_devices}.')
  return global_batch_size // jax.process_count()


def global_batch(mesh, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """Assembles each process's rows into one array sharded over `data` (multi-host safe)."""
  sharding = data_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def replicate(mesh, tree: Any) -> Any:
  """Places a host pytree on every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))


def fetch(tree: Any) -> Any:
  """Device pytree -> host NumPy (replicated arrays are read from the local copy)."""
  return jax.tree.map(np.asarray, jax.device_get(tree))
