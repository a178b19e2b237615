"""A distillation run from a teacher workdir through the real CLI: two steps on 2 emulated devices.

Every method's train, eval and diagnostics steps run in process (tests/test_methods.py); this is
the one CLI path of a teacher given by `--config.teacher.checkpoint` (the chain, multi-host and
config errors have CLI tests of their own).
"""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

from tests.image_folder_fixture import write_image_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(workdir, folder, *overrides, timeout=600):
  env = dict(
      os.environ,
      XLA_FLAGS='--xla_force_host_platform_device_count=2',
      JAX_PLATFORMS='cpu',
      JAX_DISABLE_MOST_OPTIMIZATIONS='1',
      TF_CPP_MIN_LOG_LEVEL='3',
  )
  command = [
      sys.executable,
      '-m',
      'ffkd_jax.main',
      '--config',
      'configs/quickstart.py',
      f'--workdir={workdir}',
      '--config.dataset.name=image_folder',
      f'--config.dataset.path={folder}',
      '--config.model=resnet8',
      '--config.teacher.model=resnet8',
      '--config.batch_size=8',
      '--config.eval_batch_size=8',
      '--config.num_train_steps=2',
      '--config.log_every_steps=1',
      '--config.eval_every_steps=2',
      '--config.checkpoint_every_steps=2',
      *overrides,
  ]
  result = subprocess.run(
      command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
  )
  assert result.returncode == 0, result.stderr[-4000:]
  return result


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp('images')
  return write_image_folder(
      root, classes=tuple(f'c{i}' for i in range(10)), num_train=4, num_test=2, size=16
  )


@pytest.fixture(scope='module')
def teacher(folder, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('teacher'))
  run_cli(workdir, folder, '--config.method=ce')
  return workdir


def test_distillation_from_a_teacher_workdir_through_the_cli(folder, teacher, tmp_path):
  method = 'ffkd'
  workdir = str(tmp_path / method)
  run_cli(workdir, folder, f'--config.method={method}', f'--config.teacher.checkpoint={teacher}')
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    events = [json.loads(line) for line in f]
  train_events = [e for e in events if any(k.startswith('loss/') for k in e)]
  eval_events = [e for e in events if 'eval/top1' in e]
  assert [e['step'] for e in train_events] == [1, 2]
  assert all(e['nonfinite'] == 0 for e in train_events)
  assert eval_events and 0 <= eval_events[-1]['eval/top1'] <= 100
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '2'))
