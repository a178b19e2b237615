"""Multi-host: two processes (2 CPU devices each, over 127.0.0.1) == one process with 4 devices.

Both runs are the real CLI (`python -m ffkd_jax.main`): the quickstart chain, i.e. a CE teacher
trained into WORKDIR/teacher, then FFKD from it. The two-process run initialises
jax.distributed from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID and runs its
collectives over gloo. Compared: every metric process 0 wrote (CE and FFKD), and the final
parameters, batch statistics and optimizer state, restored here, in one process, from both runs'
checkpoints; a teacher trained by two processes also loads here.

Why the runs can agree: every train batch is the whole train set (16 images, batch 16) and there is
no augmentation, so each global batch holds the same images in both layouts, only in another
order over the devices (the train stream shuffles per process). What is left is float32 rounding
in the sums over the batch: the state differs by at most about 5e-7, within RTOL / ATOL below.
"""

import os
import signal
import socket
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

pytestmark = pytest.mark.slow
from etils import epath

from ffkd_jax import checkpoint as checkpoint_lib
from ffkd_jax import metrics as metrics_lib
from tests import run_fixture
from tests.image_folder_fixture import write_image_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 2  # teacher (CE) steps, then FFKD steps
TIMEOUT_S = 420  # for the runs together; they take about 1-2 minutes on 2 free cores
RTOL, ATOL = 1e-4, 1e-5  # parameters and optimizer state (float32 reductions in another order)
METRIC_RTOL, METRIC_ATOL = 1e-5, 1e-6
VARYING_METRICS = ('time', 'perf/')  # wall-clock measurements


def _cli(workdir: str, data: str) -> list[str]:
  return run_fixture.cli_command(workdir, {}) + [
      '--config.dataset.name=image_folder',
      f'--config.dataset.path={data}',
      '--config.dataset.augment=none',
      '--config.method=ffkd',
      '--config.model=resnet8',
      '--config.teacher.model=resnet8',
      f'--config.teacher.pretrain_steps={STEPS}',
      f'--config.num_train_steps={STEPS}',
      '--config.batch_size=16',
      '--config.eval_batch_size=8',
      '--config.log_every_steps=1',
      f'--config.eval_every_steps={STEPS}',
      f'--config.checkpoint_every_steps={STEPS}',
  ]


def _env(num_local_devices: int, **jax_distributed) -> dict[str, str]:
  """The parent's environment without JAX_* and proxy settings, plus the given ones."""
  env = {
      k: v for k, v in os.environ.items() if not k.startswith('JAX_') and 'proxy' not in k.lower()
  }
  env.update(
      JAX_PLATFORMS='cpu',
      TF_CPP_MIN_LOG_LEVEL='3',
      JAX_DISABLE_MOST_OPTIMIZATIONS='1',
      XLA_FLAGS=f'--xla_force_host_platform_device_count={num_local_devices}',
      NO_PROXY='127.0.0.1,localhost',
  )
  env.update({k: str(v) for k, v in jax_distributed.items()})
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _tail(path: str, chars: int = 3000) -> str:
  with open(path, encoding='utf-8', errors='replace') as f:
    return f.read()[-chars:]


def _run_together(runs: dict[str, tuple[list[str], dict]], log_dir: str, timeout_s: float):
  """Starts every run, waits for all; on a failure or the timeout kills every one still running."""
  procs = {}
  failure = None
  try:
    for name, (argv, env) in runs.items():
      log = open(os.path.join(log_dir, f'{name}.log'), 'w', encoding='utf-8')  # noqa: SIM115
      # Own session: killing its process group reaches the children it may start, nothing else.
      procs[name] = (
          subprocess.Popen(
              argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
          ),
          log,
      )
    deadline = time.monotonic() + timeout_s
    while failure is None:
      codes = {name: proc.poll() for name, (proc, _) in procs.items()}
      failed = {name: code for name, code in codes.items() if code not in (None, 0)}
      if failed:
        failure = f'exited with {failed}'
      elif all(code == 0 for code in codes.values()):
        break
      elif time.monotonic() > deadline:
        running = [name for name, code in codes.items() if code is None]
        failure = f'still running after {timeout_s:.0f} s: {running}'
      else:
        time.sleep(0.5)
  finally:
    for proc, log in procs.values():
      if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
      log.close()
  if failure:
    logs = '\n'.join(
        f'--- {name}.log (end) ---\n{_tail(os.path.join(log_dir, f"{name}.log"))}' for name in runs
    )
    pytest.fail(f'CLI runs failed: {failure}\n{logs}')


def _run_cli(root) -> dict[str, str]:
  """Workdirs of the one-process (4 devices) and the two-process (2 + 2 devices) runs."""
  data = write_image_folder(str(root / 'data'), classes=('a', 'b'), num_train=8, num_test=4, size=8)
  single, multi = str(root / 'single'), str(root / 'multi')
  address = f'127.0.0.1:{_free_port()}'
  coordinator = dict(
      JAX_COORDINATOR_ADDRESS=address, JAX_COORDINATOR_BIND_ADDRESS=address, JAX_NUM_PROCESSES=2
  )
  start = time.monotonic()
  _run_together(
      {
          'single': (_cli(single, data), _env(4)),
          'process0': (_cli(multi, data), _env(2, JAX_PROCESS_ID=0, **coordinator)),
          'process1': (_cli(multi, data), _env(2, JAX_PROCESS_ID=1, **coordinator)),
      },
      str(root),
      TIMEOUT_S,
  )
  print(f'CLI runs: {time.monotonic() - start:.0f} s')
  return {'single': single, 'multi': multi, 'logs': str(root)}


def test_two_processes_equal_one_process(tmp_path):
  """One test, so that `pytest -n 2` runs the CLI runs once (a fixture would run per worker)."""
  runs = _run_cli(tmp_path)
  _check_logs(runs)
  for run in ('teacher', 'ffkd'):  # the CE run of the chain, then FFKD
    _check_metrics(runs, run)
    _check_final_state(runs, run)
  _check_teacher_loads(runs)


def _comparable(record: dict) -> dict:
  return {k: v for k, v in record.items() if not k.startswith(VARYING_METRICS)}


def _check_metrics(runs, run):
  """CE (the teacher run) and FFKD: the same events, keys and values; process 0 alone writes."""
  sub = 'teacher' if run == 'teacher' else ''
  single = metrics_lib.read_metrics(os.path.join(runs['single'], sub))
  multi = metrics_lib.read_metrics(os.path.join(runs['multi'], sub))
  assert [r['step'] for r in multi] == [r['step'] for r in single]  # no event written twice
  assert any('eval/top1' in r for r in multi)
  role = 'model' if run == 'teacher' else 'student'
  losses = [r[f'loss/{role}'] for r in multi if 'nonfinite' in r]  # the train events
  assert len(losses) == STEPS and losses[-1] != losses[0]  # it trained
  for one, two in zip(single, multi):
    one, two = _comparable(one), _comparable(two)
    assert sorted(two) == sorted(one)
    for key, value in one.items():
      np.testing.assert_allclose(
          np.asarray(two[key], np.float64),
          np.asarray(value, np.float64),
          rtol=METRIC_RTOL,
          atol=METRIC_ATOL,
          err_msg=f'{run} step {one["step"]} {key}',
      )


def _check_logs(runs):
  """Process 0 logs progress and evaluations; process 1 only says which process it is."""
  with open(os.path.join(runs['logs'], 'process0.log'), encoding='utf-8') as f:
    process0 = f.read()
  with open(os.path.join(runs['logs'], 'process1.log'), encoding='utf-8') as f:
    process1 = f.read()
  assert 'Process 0 of 2: 2 local / 4 global devices' in process0
  assert 'Process 1 of 2: 2 local / 4 global devices' in process1
  progress = f'step {STEPS}/{STEPS} (100%)'
  assert progress in process0 and progress not in process1
  assert 'eval at step' in process0 and 'eval at step' not in process1


def _host_template(state_dir: str):
  """Zeros shaped like a checkpoint's state, on this process's first device, as train.py's are."""
  metadata = ocp.StandardCheckpointHandler().metadata(epath.Path(state_dir)).tree
  return jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), metadata)


def _check_final_state(runs, run):
  """Checkpoints of both runs restore in this single process and hold the same state."""
  sub = 'teacher' if run == 'teacher' else ''
  restored = {}
  for name in ('single', 'multi'):
    workdir = os.path.join(runs[name], sub)
    template = _host_template(os.path.join(workdir, 'checkpoints', str(STEPS), 'state'))
    checkpoints = checkpoint_lib.Checkpoints(workdir, keep=3)
    result = checkpoints.restore_latest(template)
    checkpoints.close()
    assert result is not None, f'{workdir}: no checkpoint restored'
    state, meta = result
    assert meta['step'] == STEPS and int(state['step']) == STEPS
    restored[name] = state
  single = jax.tree_util.tree_leaves_with_path(restored['single'])
  multi = dict(jax.tree_util.tree_leaves_with_path(restored['multi']))
  assert len(multi) == len(single)
  worst = 0.0
  for path, leaf in single:
    leaf, other = np.asarray(leaf), np.asarray(multi[path])
    np.testing.assert_allclose(
        other, leaf, rtol=RTOL, atol=ATOL, err_msg=f'{run} {jax.tree_util.keystr(path)}'
    )
    if leaf.size:
      worst = max(worst, float(np.max(np.abs(other.astype(np.float64) - leaf))))
  print(f'{run}: largest |two processes - one process| over the state: {worst:.3g}')


def _check_teacher_loads(runs):
  """A teacher two processes trained loads in this one process, equal to one process's."""
  template = _host_template(
      os.path.join(runs['single'], 'teacher', 'checkpoints', str(STEPS), 'state')
  )['roles']['model']
  params, stats, meta = checkpoint_lib.load_pretrained_role(
      os.path.join(runs['multi'], 'teacher'),
      'resnet8',
      2,
      template['params']['backbone'],
      template['batch_stats']['backbone'],
  )
  assert meta['step'] == STEPS
  single = checkpoint_lib.load_pretrained_role(
      os.path.join(runs['single'], 'teacher'),
      'resnet8',
      2,
      template['params']['backbone'],
      template['batch_stats']['backbone'],
  )
  for one, two in zip(jax.tree.leaves(single[:2]), jax.tree.leaves((params, stats))):
    np.testing.assert_allclose(np.asarray(two), np.asarray(one), rtol=RTOL, atol=ATOL)
