"""CKA pictures: at every evaluation (WORKDIR/cka/) and for any two checkpoints (cka_report)."""

import glob
import json
import os

import numpy as np
import pytest
from PIL import Image

from configs import default
from ffkd_jax import checkpoint as checkpoint_lib
from ffkd_jax import cka, cka_plots, cka_report, data, evaluation, models, train
from ffkd_jax.metrics import read_metrics
from tests.image_folder_fixture import write_image_folder

CLASSES = ('cat', 'dog', 'emu')
NUM_EXAMPLES = 40  # of the 48 test images; a multiple of the 4 emulated devices


def numpy_linear_cka(x, y):
  """Linear CKA in float64 from its definition on centred Gram matrices (Kornblith et al.)."""
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  y = np.asarray(y, np.float64).reshape(len(y), -1)
  x, y = x - x.mean(0), y - y.mean(0)
  k, l = x @ x.T, y @ y.T
  return np.sum(k * l) / np.sqrt(np.sum(k * k) * np.sum(l * l))


def assert_png(path, min_width=250, min_height=200):
  assert os.path.isfile(path), path
  with Image.open(path) as image:
    assert image.format == 'PNG'
    width, height = image.size
    pixels = np.asarray(image.convert('RGB'), np.float32)
  assert min_width <= width <= 4000 and min_height <= height <= 3000, (path, image.size)
  assert pixels.std() > 10.0, f'{path} looks blank'


def tiny_config(data_path):
  config = default.get_config()
  config.method = 'ffkd'
  config.model = 'resnet8'
  config.teacher.model = 'resnet8'
  config.teacher.pretrain_steps = 2
  config.dataset.name = data.IMAGE_FOLDER
  config.dataset.path = data_path
  config.dataset.mean = (0.5, 0.5, 0.5)
  config.dataset.std = (0.25, 0.25, 0.25)
  config.batch_size = 16
  config.eval_batch_size = 16
  config.num_train_steps = 2
  config.optimizer.schedule = 'constant'
  config.optimizer.learning_rate = 0.05
  config.log_every_steps = 1
  config.eval_every_steps = 2
  config.checkpoint_every_steps = 2
  return config


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A teacher CE run (WORKDIR/teacher) and an FFKD run distilling it, a few steps each."""
  root = tmp_path_factory.mktemp('cka_plots')
  data = write_image_folder(root / 'data', classes=CLASSES, num_train=16, num_test=16, size=16)
  config = tiny_config(data)
  workdir = str(root / 'ffkd')
  train.train_and_evaluate(config, workdir)
  return config, workdir


def test_layer_cka_matrix_matches_numpy():
  rng = np.random.default_rng(0)
  rows = [rng.normal(size=(12, 4, 4, 3)), rng.normal(size=(12, 2, 2, 5))]
  columns = [rows[0] @ rng.normal(size=(3, 3)), rng.normal(size=(12, 7)), rows[1] * 3.0]
  got = np.asarray(cka.layer_cka_matrix(rows, columns))
  want = np.array([[numpy_linear_cka(r, c) for c in columns] for r in rows])
  assert got.shape == (2, 3)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got[1, 2], 1.0, atol=1e-6)  # isotropic scaling


def test_draw_figures_from_a_record(tmp_path):
  record = {
      'cka_matrix': np.array([[0.9, 0.3], [0.2, 0.7], [0.1, 0.5]]),
      'cka/stage3-stage2': np.float32(0.5),
      'omega_channels/stage3-stage2': np.linspace(0.0, 1.0, 64),
  }
  paths = cka_plots.draw_figures(
      str(tmp_path),
      record,
      ['stage1', 'stage2', 'stage3'],
      ['stage1', 'stage2'],
      title_note='step 7',
      suffix='_x',
  )
  assert_png(paths['matrix'])
  assert_png(paths['omega_histogram'])
  with open(paths['numbers'], encoding='utf-8') as f:
    numbers = json.load(f)
  assert numbers['cka_matrix'] == record['cka_matrix'].tolist()
  assert len(numbers['omega_channels/stage3-stage2']) == 64
  without_omega = cka_plots.draw_figures(
      str(tmp_path / 'b'), {'cka_matrix': np.eye(2)}, ['a', 'b'], ['c', 'd'], title_note='t'
  )
  assert 'omega_histogram' not in without_omega
  with pytest.raises(ValueError, match='does not match'):
    cka_plots.draw_figures(
        str(tmp_path / 'c'), {'cka_matrix': np.eye(2)}, ['a'], ['c', 'd'], title_note='t'
    )


def test_evaluation_writes_the_figures(run):
  _, workdir = run
  figures = os.path.join(workdir, 'cka')
  assert_png(os.path.join(figures, 'cka_matrix_step0000002.png'))
  assert_png(os.path.join(figures, 'omega_hist_step0000002.png'))
  with open(os.path.join(figures, 'cka_step0000002.json'), encoding='utf-8') as f:
    numbers = json.load(f)
  assert numbers['teacher_layers'] == ['stage1', 'stage2', 'stage3']
  omegas = {k: v for k, v in numbers.items() if k.startswith('omega_channels/')}
  assert omegas, numbers.keys()
  assert len(omegas['omega_channels/stage3-stage3']) == 64  # resnet8's last stage
  for values in omegas.values():
    assert all(-1e-5 <= v <= 1 + 1e-5 for v in values)
  # A CE run (the teacher's) has no teacher x student matrix, hence no pictures.
  assert not os.path.exists(os.path.join(workdir, 'teacher', 'cka'))
  # metrics.jsonl keeps the matrix but no other array.
  evals = [r for r in read_metrics(workdir) if 'eval/top1' in r]
  assert evals and all(np.shape(r['cka_matrix']) == (3, 3) for r in evals)
  assert not any(k.startswith('omega_channels/') for r in evals for k in r)
  # Both pictures reach TensorBoard.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  tags = set()
  for path in glob.glob(os.path.join(workdir, 'tensorboard', 'events.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      tags.update(value.tag for value in event.summary.value)
  assert {'cka/matrix', 'cka/omega_histogram'} <= tags


def _role_features(path, role, images):
  """Stage outputs of a checkpoint's role, computed here without the report's code."""
  directory, meta = checkpoint_lib.find_checkpoint(path)
  saved = checkpoint_lib.restore_role(directory, role)
  model = models.create_model(meta['roles'][role], meta['num_classes'])
  _, features = model.apply(
      {'params': saved['params']['backbone'], 'batch_stats': saved['batch_stats']['backbone']},
      images,
      train=False,
  )
  return [features[f'stage{i}'] for i in (1, 2, 3)]


def test_report_of_identical_checkpoints_has_a_unit_diagonal(run, tmp_path):
  config, workdir = run
  teacher = os.path.join(workdir, 'teacher')
  report = cka_report.run(config, teacher, teacher, str(tmp_path), num_examples=NUM_EXAMPLES)
  matrix = np.asarray(report['record']['cka_matrix'])
  assert report['num_examples'] == NUM_EXAMPLES
  np.testing.assert_allclose(np.diag(matrix), 1.0, atol=1e-4)
  np.testing.assert_allclose(matrix, matrix.T, atol=1e-5)
  assert_png(report['files']['matrix'])
  with open(os.path.join(tmp_path, 'cka_report.json'), encoding='utf-8') as f:
    summary = json.load(f)
  assert summary['teacher']['role'] == summary['student']['role'] == 'model'


def test_report_of_teacher_and_student_matches_an_independent_computation(run, tmp_path):
  config, workdir = run
  teacher = os.path.join(workdir, 'teacher')
  report = cka_report.run(config, teacher, workdir, str(tmp_path), num_examples=NUM_EXAMPLES)
  assert_png(os.path.join(tmp_path, 'cka_matrix.png'))
  assert_png(os.path.join(tmp_path, 'omega_hist.png'))
  source = data.open_source(config.dataset)
  # The report's images: the class-mixed diagnostics subset training uses (ffkd_jax/evaluation.py).
  indices = data.class_mixed_indices(source, 'val', NUM_EXAMPLES, evaluation.DIAGNOSTICS_SEED)
  batch = next(data.eval_iterator(source, 'val', local_batch_size=NUM_EXAMPLES, indices=indices))
  teacher_features = _role_features(teacher, 'model', batch['image'])
  student_features = _role_features(workdir, 'student', batch['image'])
  want = np.array([[numpy_linear_cka(t, s) for s in student_features] for t in teacher_features])
  np.testing.assert_allclose(report['record']['cka_matrix'], want, rtol=1e-4, atol=1e-5)
  # The FFKD run's forward regressors were loaded: omega has the teacher's channel count.
  omegas = {k: v for k, v in report['record'].items() if k.startswith('omega_channels/')}
  assert omegas and all(np.ndim(v) == 1 for v in omegas.values())
  assert np.asarray(omegas['omega_channels/stage3-stage3']).shape == (64,)
