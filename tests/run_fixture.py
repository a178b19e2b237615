"""Whole runs for tests: a tiny image folder, tiny configs, the CLI in a subprocess, and readers.

A run here trains resnet8 on 10 classes x 8 training images of 16x16 (80 images, 10 steps an
epoch at batch 8) for a dozen steps, logging every step. Subprocess runs use the real CLI,
`python -m ffkd_jax.main --config configs/quickstart.py --workdir W --config.<field>=<value>`,
with N emulated CPU devices, so that they can be killed and started again like a real job.
Also: readers of what a run leaves (metrics.jsonl, checkpoints), a small hand-made TrainState,
and `once`, which makes a reference run once for a pytest session, across xdist workers too.
"""

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any, Mapping

import numpy as np

from tests.image_folder_fixture import write_image_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = tuple(f'class{i}' for i in range(10))
TRAIN_PER_CLASS = 8
IMAGE_SIZE = 16


def write_dataset(root) -> str:
  """train/<class>/* (8 a class) and test/<class>/* (2 a class) of random 16x16 PNGs."""
  return write_image_folder(root, CLASSES, num_train=TRAIN_PER_CLASS, num_test=2, size=IMAGE_SIZE)


def tiny_overrides(data_path: str, **changes: Any) -> dict[str, Any]:
  """Dotted config fields over configs/quickstart.py for a CE run of 12 steps (1, 2 or 4 devices).

  changes: more fields, with '__' for '.' (e.g. optimizer__learning_rate=0.1).
  """
  fields = {
      'method': 'ce',
      'model': 'resnet8',
      'teacher.model': 'resnet8',
      'teacher.pretrain_steps': -1,
      'dataset.name': 'image_folder',
      'dataset.path': str(data_path),
      'dataset.prefetch': 1,
      'batch_size': 8,
      'eval_batch_size': 8,
      'num_train_steps': 12,
      'log_every_steps': 1,
      'eval_every_steps': 4,
      'checkpoint_every_steps': 3,
      'keep_checkpoints': 2,
  }
  fields.update({k.replace('__', '.'): v for k, v in changes.items()})
  return fields


def make_config(overrides: Mapping[str, Any]):
  """configs/quickstart.py with the dotted fields set: for runs in this process."""
  from configs import quickstart  # pylint: disable=g-import-not-at-top

  config = quickstart.get_config()
  for dotted, value in overrides.items():
    *parents, name = dotted.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    node[name] = value
  return config


def _flag_value(value: Any) -> str:
  if isinstance(value, (tuple, list)):
    return '(' + ','.join(str(v) for v in value) + ',)'
  return str(value)


def cli_command(workdir: str, overrides: Mapping[str, Any]) -> list[str]:
  return [
      sys.executable,
      '-m',
      'ffkd_jax.main',
      '--config',
      'configs/quickstart.py',
      '--workdir',
      str(workdir),
  ] + [f'--config.{k}={_flag_value(v)}' for k, v in overrides.items()]


def run_cli(command: list[str], num_devices: int = 1, timeout: int = 300):
  """Runs a CLI command from the repository root; the CompletedProcess, output captured."""
  return subprocess.run(
      command,
      cwd=REPO,
      env=cli_env(num_devices),
      capture_output=True,
      text=True,
      timeout=timeout,
      check=False,
  )


def cli_env(num_devices: int) -> dict[str, str]:
  env = dict(os.environ)
  env.update(
      XLA_FLAGS=f'--xla_force_host_platform_device_count={num_devices}',
      JAX_PLATFORMS='cpu',
      TF_CPP_MIN_LOG_LEVEL='3',
      # As tests/conftest.py: compile time dominates these tiny runs.
      JAX_DISABLE_MOST_OPTIMIZATIONS='true',
      PYTHONPATH=REPO + os.pathsep + env.get('PYTHONPATH', ''),
  )
  return env


class Run:
  """One CLI process; its output goes to <workdir>.<n>.log (the workdir is left to the run)."""

  def __init__(self, workdir: str, overrides: Mapping[str, Any], num_devices: int = 1):
    self.workdir = str(workdir)
    number = 0
    while os.path.exists(f'{self.workdir}.{number}.log'):
      number += 1
    self.log_path = f'{self.workdir}.{number}.log'
    self._log = open(self.log_path, 'wb')
    self.process = subprocess.Popen(
        cli_command(workdir, overrides),
        cwd=REPO,
        env=cli_env(num_devices),
        stdout=self._log,
        stderr=subprocess.STDOUT,
    )

  def wait(self, timeout: float = 300) -> int:
    try:
      return self.process.wait(timeout)
    finally:
      self._log.close()

  @property
  def output(self) -> str:
    with open(self.log_path, encoding='utf-8', errors='replace') as f:
      return f.read()

  def wait_for_step(
      self,
      step: int,
      metrics_dir: str | None = None,
      checkpointed: bool = False,
      timeout: float = 600,
  ) -> int:
    """Waits until `metrics_dir` (default: the workdir) has logged a train step >= `step`.

    checkpointed: also wait for a finalized checkpoint there. Returns the largest step logged;
    fails if the process ends first.
    """
    directory = metrics_dir or self.workdir
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      steps = train_steps(directory)
      if steps and max(steps) >= step and (not checkpointed or checkpoint_steps(directory)):
        return max(steps)
      if self.process.poll() is not None:
        raise AssertionError(
            f'the run ended (rc {self.process.returncode}) before step {step} '
            f'in {directory}:\n{self.output[-3000:]}'
        )
      time.sleep(0.01)
    raise AssertionError(f'no step {step} in {directory} after {timeout}s')

  def signal_at_step(
      self, step: int, sig: int, metrics_dir: str | None = None, checkpointed: bool = False
  ) -> int:
    """Sends `sig` as soon as a train step >= `step` is logged; returns the step seen then."""
    seen = self.wait_for_step(step, metrics_dir, checkpointed)
    self.process.send_signal(sig)
    return seen


def run_to_end(workdir: str, overrides: Mapping[str, Any], num_devices: int = 1) -> str:
  """Runs the CLI to completion; returns its output, failing with it when the run fails."""
  run = Run(workdir, overrides, num_devices)
  rc = run.wait()
  assert rc == 0, f'run in {workdir} failed (rc {rc}):\n{run.output[-5000:]}'
  return run.output


def small_state(step: int, offset: float = 0.0):
  """A TrainState shaped like a real one (params, batch stats, SGD momentum of one role), small."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from ffkd_jax.states import RoleState, TrainState  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  params = {
      'backbone': {
          'conv1': {'kernel': rng.normal(size=(3, 3, 3, 16)) + offset},
          'fc': {'kernel': rng.normal(size=(64, 10)) + offset, 'bias': np.full((10,), offset)},
      }
  }
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  stats = {
      'backbone': {
          'bn1': {'mean': jnp.full((16,), offset, jnp.float32), 'var': jnp.ones((16,), jnp.float32)}
      }
  }
  opt_state = optax.sgd(0.1, momentum=0.9).init(params)
  return TrainState(
      step=jnp.asarray(step, jnp.int32),
      roles={'model': RoleState(params, stats, opt_state)},
      skipped_steps=jnp.asarray(0, jnp.int32),
  )


# ----------------------------------------------------------------------------------------------
# Reading what a run left.


def read_records(workdir: str) -> list[dict]:
  """The complete lines of metrics.jsonl (a line being written is left out)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path, encoding='utf-8') as f:
    text = f.read()
  return [json.loads(line) for line in text.split('\n')[:-1] if line.strip()]


def is_train_record(record: Mapping[str, Any]) -> bool:
  return any(k.startswith('loss/') for k in record)


def train_steps(workdir: str) -> list[int]:
  return [r['step'] for r in read_records(workdir) if is_train_record(r)]


_UNSTABLE = ('time', 'perf/')


def stable_values(record: Mapping[str, Any]) -> dict[str, Any]:
  """A record without wall-clock fields (time, perf/*): what must repeat exactly."""
  return {k: v for k, v in record.items() if not k.startswith(_UNSTABLE)}


def checkpoint_steps(workdir: str, manager: str = 'checkpoints') -> list[int]:
  """The finalized checkpoint steps (orbax's temporary directories are not digits)."""
  root = os.path.join(workdir, manager)
  if not os.path.isdir(root):
    return []
  return sorted(int(d) for d in os.listdir(root) if d.isdigit())


def restore_state(workdir: str, step: int | None = None, manager: str = 'checkpoints') -> dict:
  """The saved TrainState tree (plain dicts of NumPy arrays) of a step (default: the latest)."""
  import jax  # pylint: disable=g-import-not-at-top
  from ffkd_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top

  if step is None:
    step = checkpoint_steps(workdir, manager)[-1]
  return jax.tree.map(
      np.asarray,
      checkpoint_lib.restore_state_tree(
          os.path.join(os.path.abspath(workdir), manager, str(step), 'state')
      ),
  )


def assert_trees_equal(actual, expected, what: str = '') -> None:
  """Bit-identical leaves, the same structure; names the first leaf that differs."""
  import jax  # pylint: disable=g-import-not-at-top

  flat_actual = dict(jax.tree_util.tree_leaves_with_path(actual))
  flat_expected = dict(jax.tree_util.tree_leaves_with_path(expected))
  assert flat_actual.keys() == flat_expected.keys(), what
  for path, leaf in flat_expected.items():
    np.testing.assert_array_equal(
        flat_actual[path], leaf, err_msg=f'{what} {jax.tree_util.keystr(path)}'
    )


# ----------------------------------------------------------------------------------------------
# Runs shared by the tests of a session (also across pytest-xdist workers).


def shared_dir(tmp_path_factory) -> str:
  """A folder every worker of this pytest session sees (the session's base temp under xdist)."""
  base = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    base = base.parent  # .../pytest-N/popen-gwK -> .../pytest-N, shared by the workers
  path = os.path.join(str(base), 'shared_runs')
  os.makedirs(path, exist_ok=True)
  return path


def once(directory: str, name: str, make) -> str:
  """`make(path)` run once for the session (the first caller runs it, the others wait)."""
  path = os.path.join(directory, name)
  with open(path + '.lock', 'w', encoding='utf-8') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      if not os.path.exists(path + '.done'):
        shutil.rmtree(path, ignore_errors=True)
        make(path)
        with open(path + '.done', 'w', encoding='utf-8'):
          pass
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return path
