"""The device mesh and how host data becomes global, data-sharded arrays."""

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
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
  """This process's rows of a global batch: its devices' share (the batch splits over devices).

  `global_batch_size` counts all devices of all processes (config.batch_size is global); each
  process loads `global_batch_size / device_count * local_device_count` rows of its own shard.
  """
  num_devices = jax.device_count()
  if global_batch_size <= 0 or global_batch_size % num_devices:
    raise ValueError(
        f'{field}={global_batch_size} must be a positive multiple of the device count '
        f'({num_devices} devices: {jax.devices()[0].platform}); e.g. '
        f'{max(1, global_batch_size // num_devices) * num_devices or num_devices}.'
    )
  local = global_batch_size // num_devices * jax.local_device_count()
  if local * jax.process_count() != global_batch_size:
    raise ValueError(
        f'{field}={global_batch_size}: processes hold different numbers of devices '
        f'({jax.local_device_count()} here, {num_devices} in all over {jax.process_count()} '
        'processes); run the same number of devices in every process.'
    )
  return local


def global_batch(mesh, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """Assembles each process's rows into one array sharded over `data` (multi-host safe).

  Every process passes its own `local_batch_size` rows, which land on its own devices (in their
  order along `data`); each device holds global_batch_size / device_count rows.
  """
  sharding = data_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def replicate(mesh, tree: Any) -> Any:
  """Places a pytree, the same in every process, on every device of the mesh.

  Over several processes the leaves go through host memory: an array committed to one local
  device (a restored checkpoint, a loaded teacher) cannot be device_put onto other processes'
  devices. One collective checks that every process passed the same values.
  """
  sharding = replicated(mesh)
  if sharding.is_fully_addressable:
    return jax.device_put(tree, sharding)

  def place(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return jax.device_put(x, sharding)  # already global
    return jax.make_array_from_process_local_data(sharding, np.asarray(x), np.shape(x))

  paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  placed = [place(x) for _, x in paths_and_leaves]
  _assert_same_on_every_process([path for path, _ in paths_and_leaves], placed)
  return jax.tree.unflatten(treedef, placed)


def _assert_same_on_every_process(paths, leaves: list[jax.Array]) -> None:
  """Raises when processes hold different values (e.g. different seeds or checkpoints)."""
  sums = [np.sum(np.asarray(x.addressable_data(0), np.float64)) for x in leaves]
  gathered = np.asarray(multihost_utils.process_allgather(np.array(sums + [0.0])))
  same = (gathered == gathered[0]) | (np.isnan(gathered) & np.isnan(gathered[0]))
  differ = np.flatnonzero(~np.all(same, axis=0))  # (processes, leaves + 1) -> indices
  if differ.size:
    raise ValueError(
        f'replicate: the processes passed different values for {differ.size} of {len(leaves)} '
        f'leaves, e.g. {jax.tree_util.keystr(paths[differ[0]])}; every process must build the '
        'same state (same config, seed and checkpoint).'
    )


def fetch(tree: Any) -> Any:
  """Device pytree -> host NumPy (replicated arrays are read from the local copy)."""
  return jax.tree.map(np.asarray, jax.device_get(tree))
