"""What the benchmark scripts share: the repository on sys.path, the machine's description."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
import tarfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHARED_ARCHIVE = os.path.join(REPO, '..', 'shared', 'data', 'cifar10-jpeg.tar.gz')
DEFAULT_DATA = '/tmp/ffkd-data/cifar10-jpeg'


def core_count() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def cpu_model() -> str:
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def memory_gib() -> float | None:
  try:
    with open('/proc/meminfo', encoding='utf-8') as f:
      for line in f:
        if line.startswith('MemTotal:'):
          return round(int(line.split()[1]) / 2**20, 1)
  except OSError:
    pass
  return None


def load_average() -> list[float]:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return []


def host_description() -> dict:
  """CPU model, cores this process may use, memory, OS: the host half of `device`."""
  return {
      'cpu_model': cpu_model(),
      'cores': core_count(),
      'memory_gib': memory_gib(),
      'hostname': platform.node(),
      'python': platform.python_version(),
  }


def describe_machine(device: dict) -> dict:
  """host_description() plus the accelerator facts in `device` (platform, device_kind,
  device_count), with the one-line 'description' the reports print."""
  machine = {**host_description(), **device}
  machine['description'] = (
      f'{machine["platform"]} ({machine["device_kind"]}) x'
      f'{machine["device_count"]}, {machine["cpu_model"]}, '
      f'{machine["cores"]} cores, {machine["memory_gib"]} GiB'
  )
  return machine


def command_line() -> str:
  return ' '.join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])


def now() -> str:
  return datetime.datetime.now().astimezone().isoformat(timespec='seconds')


def ensure_cifar10(path: str) -> str:
  """The CIFAR-10 image folder at `path`, unpacked from ../shared/data when it is missing."""
  if os.path.isdir(os.path.join(path, 'train')) and os.path.isdir(os.path.join(path, 'test')):
    return path
  archive = os.path.abspath(SHARED_ARCHIVE)
  if os.path.basename(os.path.normpath(path)) != 'cifar10-jpeg' or not os.path.exists(archive):
    raise FileNotFoundError(
        f'--data={path!r} is not an image folder (train/<class>/*, test/<class>/*), and it cannot '
        f'be unpacked here: that needs a path ending in cifar10-jpeg and the archive {archive} '
        '(see ../shared/data/README.md).'
    )
  parent = os.path.dirname(os.path.normpath(path))
  os.makedirs(parent, exist_ok=True)
  print(f'Unpacking {archive} into {parent} ...', file=sys.stderr)
  with tarfile.open(archive) as tar:
    tar.extractall(parent, filter='data')
  return path


# The train split a benchmark pretends to have (CIFAR's 50,000), for methods with a memory of it.
SYNTHETIC_TRAIN_EXAMPLES = 50_000


def synthetic_train_labels(num_classes: int):
  """Balanced labels of SYNTHETIC_TRAIN_EXAMPLES examples, for `Method.init_state` (CRD)."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  return (np.arange(SYNTHETIC_TRAIN_EXAMPLES) % num_classes).astype(np.int32)


def random_step_batch(method, batch_size: int, image_size: int, num_classes: int, seed: int = 0):
  """A host batch of random images and labels for every train stream `method` reads
  ('image', 'label', and 'image:1', 'label:1' for FFKD's feedback stream), and distinct
  example indices 'index' (with their labels from `synthetic_train_labels`) where the method
  asks for them (CRD)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ffkd_jax import step as step_lib  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  batch = {}
  for k in range(method.num_streams()):
    batch[step_lib.batch_key('image', k)] = rng.normal(
        size=(batch_size, image_size, image_size, 3)
    ).astype(np.float32)
    batch[step_lib.batch_key('label', k)] = rng.integers(0, num_classes, size=(batch_size,)).astype(
        np.int32
    )
  if method.example_index:
    index = rng.permutation(SYNTHETIC_TRAIN_EXAMPLES)[:batch_size].astype(np.int32)
    batch['index'], batch['label'] = index, synthetic_train_labels(num_classes)[index]
  return batch
