"""Smoke tests of benchmarks/: the scripts run in their tiny modes and write valid results.

Not timed tests: the figures they produce here mean nothing, only their structure is checked.
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow

from benchmarks import accuracy
from ffkd_jax import cka
from ffkd_jax.losses import ffkd as ffkd_losses
from tests.image_folder_fixture import write_image_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args, timeout=900):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  return subprocess.run(
      [sys.executable, os.path.join(REPO, 'benchmarks', script), *args],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=timeout,
      check=False,
  )


def _check(completed):
  assert completed.returncode == 0, completed.stderr[-4000:]
  return completed


# --------------------------------------------------------------------------- torch reference


@pytest.fixture(name='torch_reference')
def _torch_reference():
  pytest.importorskip('torch')
  from benchmarks import torch_reference  # pylint: disable=g-import-not-at-top

  return torch_reference


def test_torch_cka_and_channel_kl_match_jax(torch_reference):
  import torch  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  u = rng.normal(size=(8, 4, 4, 5)).astype(np.float32)
  v = (u + rng.normal(size=u.shape)).astype(np.float32)
  w = rng.normal(size=(8, 2, 2, 3)).astype(np.float32)  # another shape: CKA of flattened maps
  nchw = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2)
  np.testing.assert_allclose(
      float(torch_reference.linear_cka(nchw(u), nchw(w))), float(cka.layer_cka(u, w)), rtol=1e-4
  )
  np.testing.assert_allclose(
      float(torch_reference.channel_kl(nchw(u), nchw(v), 4.0)),
      float(ffkd_losses.channel_kl(u, v, 4.0)),
      rtol=1e-4,
  )


def test_torch_ffkd_step_updates_both_networks(torch_reference):
  import torch  # pylint: disable=g-import-not-at-top

  step = torch_reference.FFKDStep(
      'resnet8',
      'resnet8',
      10,
      16,
      [('stage2', 'stage2'), ('stage3', 'stage3')],
      torch_reference.Terms(),
  )
  before = [p.detach().clone() for p in step.teacher.parameters()]
  losses = step.step(
      torch.randn(8, 3, 16, 16),
      torch.randint(0, 10, (8,)),
      torch.randn(8, 3, 16, 16),
      torch.randint(0, 10, (8,)),
  )
  assert set(losses) == {'student', 'teacher'} and all(np.isfinite(list(losses.values())))
  assert any((a != b).any() for a, b in zip(before, step.teacher.parameters()))


# -------------------------------------------------------------------------------- throughput


def test_throughput_tiny_writes_json_and_markdown(tmp_path):
  data = write_image_folder(tmp_path / 'data', num_train=12, num_test=2, size=8)
  out = tmp_path / 'throughput.json'
  configs = ['teacher_ce', 'student_ce', 'teacher_fwd', 'student_fwd', 'ffkd', 'input']
  if importlib.util.find_spec('torch') is not None:
    configs.append('torch_ffkd')
  _check(
      _run(
          'throughput.py',
          '--tiny',
          '--data',
          data,
          '--out',
          str(out),
          '--configs',
          ','.join(configs),
      )
  )
  result = json.loads(out.read_text())
  figures = ['ffkd_images_per_s', 'sum_of_parts_ratio', 'cka_fraction', 'input_ratio']
  figures += ['torch_ratio'] if 'torch_ffkd' in configs else []
  for key in figures:
    assert isinstance(result[key], float) and result[key] > 0, key
    assert result['fastest'][key] > 0, key
  for key in ('command', 'date', 'device', 'load_average', 'pairs', 'meets'):
    assert key in result, key
  assert result['device']['cores'] >= 1 and result['device']['platform']
  measured = result['pairs'][0]['configs']
  assert set(measured) == set(configs)
  assert measured['ffkd']['compile_s'] > 0 and measured['ffkd']['rss_peak_mb'] > 0
  assert measured['ffkd']['gflop_per_step'] > 0 and measured['ffkd']['cka']['seconds'] > 0
  assert 0 < result['pairs'][0]['flop_sum_of_parts_ratio'] < 2
  table = (tmp_path / 'throughput.md').read_text()
  assert '| sum_of_parts_ratio |' in table and '| ffkd |' in table


# ---------------------------------------------------------------------------------- accuracy


def test_best_evaluation_takes_test_at_best_validation():
  records = [
      {'step': 1, 'loss/ce': 1.0},
      {'step': 2, 'eval/top1': 50.0, 'test/student_top1': 40.0, 'test/teacher_top1': 70.0},
      {'step': 4, 'eval/top1': 60.0, 'test/student_top1': 45.0, 'test/teacher_top1': 71.0},
      {'step': 6, 'eval/top1': 60.0, 'test/student_top1': 55.0, 'test/teacher_top1': 72.0},
      {'step': 8, 'eval/top1': 55.0, 'test/student_top1': 58.0, 'test/teacher_top1': 73.0},
  ]
  best = accuracy.best_evaluation(records, 'student')
  assert (best['step'], best['test_top1'], best['teacher_test_top1']) == (4, 45.0, 71.0)
  assert best['selected_by'] == 'val'
  no_val = [{'step': 2, 'eval/top1': 50.0, 'eval/model_top1': 50.0}]
  assert accuracy.best_evaluation(no_val, 'model')['selected_by'].startswith('test')
  assert accuracy.best_evaluation(records[:1], 'student') is None


def _fake_run(workdir, val_test_pairs, complete=True, teacher=None):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w', encoding='utf-8') as f:
    for step, (val, test) in enumerate(val_test_pairs, start=1):
      record = {'step': step, 'time': float(step), 'eval/top1': val}
      role = 'model' if teacher is None else 'student'
      record[f'test/{role}_top1'] = test
      if teacher is not None:
        record['test/teacher_top1'] = teacher
      f.write(json.dumps(record) + '\n')
    if complete:
      f.write(json.dumps({'step': len(val_test_pairs), 'time': 9.0, 'final/step': 2}) + '\n')


def test_results_mean_std_table_and_plot(tmp_path):
  runs = [
      {'pair': 'a->b', 'method': 'teacher', 'seed': 0, 'workdir': str(tmp_path / 't')},
      {'pair': 'a->b', 'method': 'kd', 'seed': 0, 'workdir': str(tmp_path / 'kd0')},
      {'pair': 'a->b', 'method': 'kd', 'seed': 1, 'workdir': str(tmp_path / 'kd1')},
      {'pair': 'a->b', 'method': 'kd', 'seed': 2, 'workdir': str(tmp_path / 'kd2')},
  ]
  _fake_run(runs[0]['workdir'], [(70.0, 69.0)])
  _fake_run(runs[1]['workdir'], [(50.0, 48.0), (60.0, 58.0)], teacher=69.0)
  _fake_run(runs[2]['workdir'], [(61.0, 62.0)], teacher=69.0)
  _fake_run(runs[3]['workdir'], [(99.0, 99.0)], complete=False, teacher=69.0)  # partial
  pairs = accuracy.collect(runs)
  kd = pairs['a->b']['methods']['kd']
  assert kd['seeds_done'] == 2
  assert kd['student_mean'] == pytest.approx(60.0) and kd['student_std'] == pytest.approx(
      np.std([58.0, 62.0], ddof=1)
  )
  assert pairs['a->b']['teacher']['test_top1'] == 69.0
  header = {'preset': 'tiny', 'date': 'today', 'command': 'cmd', 'machine': 'cpu', 'seeds': 3}
  accuracy.write_markdown(str(tmp_path / 'results.md'), header, pairs)
  # A second method: its difference from kd, Welch standard error (numpy test above).
  runs += [
      {'pair': 'a->b', 'method': 'ffkd', 'seed': k, 'workdir': str(tmp_path / f'ffkd{k}')}
      for k in range(2)
  ]
  _fake_run(runs[-2]['workdir'], [(65.0, 64.0)], teacher=70.0)
  _fake_run(runs[-1]['workdir'], [(66.0, 66.0)], teacher=71.0)
  pairs_with_ffkd = accuracy.collect(runs)
  accuracy.write_markdown(str(tmp_path / 'ffkd.md'), header, pairs_with_ffkd)
  assert '| 64.00, 66.00 | - | +5.00 ± 2.24 |' in (tmp_path / 'ffkd.md').read_text()
  accuracy.write_plot(str(tmp_path / 'results.png'), pairs)
  table = (tmp_path / 'results.md').read_text()
  assert '| kd | 60.00 ± 2.83 |' in table and '99.00*' in table
  assert '58.00, 62.00, 99.00* | - | - |' in table  # no ce run; kd is not compared to itself
  # One complete seed: its value, and no "± 0.00" posing as a spread.
  _fake_run(runs[2]['workdir'], [(61.0, 62.0)], complete=False, teacher=69.0)
  pairs = accuracy.collect(runs)
  assert pairs['a->b']['methods']['kd']['student_std'] is None
  accuracy.write_markdown(str(tmp_path / 'one.md'), header, pairs)
  accuracy.write_plot(str(tmp_path / 'one.png'), pairs)
  assert '| kd | 58.00 | 69.00 |' in (tmp_path / 'one.md').read_text()
  assert (tmp_path / 'results.png').read_bytes()[:4] == b'\x89PNG'


def test_difference_and_its_standard_error_against_numpy():
  a, b = [58.0, 62.0, 61.0], [50.0, 53.5]
  delta, error = accuracy.difference(a, b)
  assert delta == pytest.approx(np.mean(a) - np.mean(b))
  assert error == pytest.approx(np.sqrt(np.var(a, ddof=1) / 3 + np.var(b, ddof=1) / 2))
  assert accuracy.difference(a, [50.0]) == (None, None)


def test_accuracy_tiny_runs_then_resumes_by_skipping(tmp_path):
  data = write_image_folder(tmp_path / 'data', num_train=8, num_test=2, size=8)
  out = tmp_path / 'acc'
  args = ['--preset', 'tiny', '--data', data, '--seeds', '1', '--methods', 'ce', '--out', str(out)]
  _check(_run('accuracy.py', *args))
  result = json.loads((out / 'results.json').read_text())
  pair = result['pairs']['resnet8->resnet8']
  assert pair['teacher']['complete'] and pair['methods']['ce']['seeds_done'] == 1
  assert 0 <= pair['methods']['ce']['student_mean'] <= 100
  assert (out / 'results.md').exists() and (out / 'results.png').exists()
  again = _check(_run('accuracy.py', *args))
  assert again.stderr.count('[done]') == 2 and '[train]' not in again.stderr
  # The report of a later invocation keeps the first one's start (the table's real span).
  assert json.loads((out / 'results.json').read_text())['started'] == result['started']
  assert json.loads((out / 'results.json').read_text())['date'] >= result['date']
  assert '`*`' not in (out / 'results.md').read_text()  # every run complete: no footnote
  listing = _check(_run('accuracy.py', *args, '--dry-run')).stdout
  assert listing.count('complete') == 2

  # An ablation beside the table: its teacher, config.ffkd fields changed, scored the same way.
  common_args = ['--preset', 'tiny', '--data', data, '--out', str(out)]
  ablation = _check(_run('ablate.py', *common_args, 'w1', 'beta_fdbk=0', 'cka_x100=False'))
  result = json.loads(ablation.stdout.strip().splitlines()[-1])
  assert result['changes'] == {'beta_fdbk': 0.0, 'cka_x100': False} and result['complete']
  assert 0 <= result['test_top1'] <= 100 and 0 <= result['val_top1'] <= 100
  assert 0 <= result['teacher_val_top1'] <= 100  # ffkd's co-trained teacher, on validation
  config = json.loads((out / 'ablate' / 'w1' / 'config.json').read_text())
  assert config['ffkd']['beta_fdbk'] == 0.0 and config['ffkd']['cka_x100'] is False
  assert config['teacher']['checkpoint'] == str(out / 'teacher')
  bad = _run('ablate.py', *common_args, 'bad', 'beta_fdbkk=0')
  assert bad.returncode != 0 and "'beta_fdbkk=0'" in bad.stderr and "'beta_fdbk'" in bad.stderr
  bad = _run('ablate.py', *common_args, 'bad', 'feedback_start_step=1.5')
  assert bad.returncode != 0 and 'not an integer' in bad.stderr


# ---------------------------------------------------------------------------- device check


def test_device_check_tiny_runs_every_part_on_the_cpu(tmp_path):
  """benchmarks/device_check.sh --tiny: devices, both dtypes' throughput tables (CE, KD, FFKD,
  input), and the chain's short run with its accuracy, into OUT/summary.md."""
  data = write_image_folder(
      tmp_path / 'data', classes=tuple(f'c{i}' for i in range(4)), num_train=8, num_test=4, size=16
  )
  out = tmp_path / 'out'
  env = dict(
      os.environ,
      OUT=str(out),
      TINY_DATA=str(data),
      PYTHON=sys.executable,
      XLA_FLAGS='--xla_force_host_platform_device_count=1',
  )
  completed = subprocess.run(
      ['bash', os.path.join(REPO, 'benchmarks', 'device_check.sh'), '--tiny'],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
      check=False,
  )
  assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
  summary = (out / 'summary.md').read_text()
  assert 'FAILED' not in summary, summary
  assert 'x cpu (cpu)' in summary
  for dtype in ('float32', 'bfloat16'):
    result = json.loads((out / f'throughput_{dtype}.json').read_text())
    assert result['dtype'] == dtype and 'Eigen' in result['conv_description']
    assert set(result['pairs'][0]['configs']) >= {'teacher_ce', 'student_ce', 'kd', 'ffkd', 'input'}
  assert 'FFKD: steps 2' in summary and "'eval/student_top1'" in summary


def test_step_time_prints_one_line_for_a_tiny_step(capsys):
  from benchmarks import step_time  # pylint: disable=g-import-not-at-top

  result = step_time.main(
      ['--teacher', 'resnet8', '--student', 'resnet8', '--batch', '8', '--steps', '1']
  )
  assert result['min_ms'] > 0 and result['gflop'] > 0
  assert 'step min' in capsys.readouterr().out


def test_torch_reference_defaults_are_the_configs(torch_reference):
  """The PyTorch twin's FFKD weights and switches default to ffkd_jax's (config and preset)."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  from ffkd_jax.methods import ffkd as ffkd_method  # pylint: disable=g-import-not-at-top

  config = default.get_config()
  switches = dataclasses.asdict(ffkd_method.switches_for('ffkd'))
  for field in dataclasses.fields(torch_reference.Terms):
    want = switches[field.name] if field.name in switches else config.ffkd[field.name]
    assert field.default == want, field.name
