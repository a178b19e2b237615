"""Bad input stops a run early with a message that names the field, the value and what is valid.

Most cases call `train_and_evaluate` (or `config_checks.validate`) in this process: each fails
before any compilation. Unknown config fields also go through the real command line.
"""

import logging
import math
import os

import pytest
import tensorflow_datasets as tfds

from ffkd_jax import checkpoint as checkpoint_lib
from ffkd_jax import config_checks
from ffkd_jax import methods
from ffkd_jax import data
from ffkd_jax import train
from ffkd_jax.data import tfds_source
from tests.image_folder_fixture import write_corrupt_file, write_image_folder
from tests import run_fixture


@pytest.fixture(scope='module')
def data_path(tmp_path_factory):
  return run_fixture.write_dataset(tmp_path_factory.mktemp('data'))


def config_with(data_path, **changes):
  return run_fixture.make_config(run_fixture.tiny_overrides(data_path, **changes))


def fails_with(config, workdir, *texts, error=ValueError):
  """train_and_evaluate raises `error` whose message holds every one of `texts`."""
  with pytest.raises(error) as raised:
    train.train_and_evaluate(config, str(workdir))
  for text in texts:
    assert text in str(raised.value), f'{text!r} not in: {raised.value}'
  return str(raised.value)


# ----------------------------------------------------------------------------------------------
# Config fields.


@pytest.mark.slow
@pytest.mark.parametrize(
    'override, expected',
    [
        ('--config.not_a_field=1', ['--config.not_a_field:', "no field 'not_a_field'"]),
        (
            '--config.optimizer.learning_rat=0.1',
            [
                '--config.optimizer.learning_rat:',
                "no field 'learning_rat'",
                'Did you mean "learning_rate"',
            ],
        ),
        ('--config.batch_size=abc', ['--config.batch_size=abc', 'invalid literal for int()']),
    ],
)
def test_bad_field_on_the_command_line(tmp_path, override, expected):
  """The flag is refused before anything runs, in one line naming the flag and, for a misspelt
  field, ml_collections' suggestion; no traceback."""
  command = run_fixture.cli_command(str(tmp_path / 'run'), {}) + [override]
  result = run_fixture.run_cli(command)
  assert result.returncode == 1, result.stderr[-2000:]
  assert 'Traceback' not in result.stderr, result.stderr[-2000:]
  error_line = [line for line in result.stderr.splitlines() if 'FATAL' in line]
  assert len(error_line) == 1, result.stderr[-2000:]
  for text in expected:
    assert text in error_line[0], result.stderr[-2000:]
  assert not os.path.exists(tmp_path / 'run')


@pytest.mark.slow
@pytest.mark.parametrize('verbosity', [0, 1])
def test_a_config_error_is_one_line_with_exit_status_1(tmp_path, verbosity):
  """A bad value found by the checks (here a method's own block) is one FATAL line naming the
  field, the value and what is valid, exit status 1; the traceback only with --verbosity=1."""
  command = run_fixture.cli_command(str(tmp_path / 'run'), {'method': 'kd'}) + [
      '--config.kd.temperature=-2.0',
      f'--verbosity={verbosity}',
  ]
  result = run_fixture.run_cli(command)
  assert result.returncode == 1, result.stderr[-2000:]
  if verbosity:
    assert 'Traceback' in result.stderr and 'ConfigError' in result.stderr
    return
  assert 'Traceback' not in result.stderr, result.stderr[-2000:]
  error_line = [line for line in result.stderr.splitlines() if 'FATAL' in line]
  assert len(error_line) == 1, result.stderr[-2000:]
  assert 'config.kd.temperature=-2.0 is not valid' in error_line[0]
  assert 'a temperature must be a finite number > 0' in error_line[0]


def test_unknown_field_in_a_config_built_in_python(data_path):
  """A notebook's unlocked ConfigDict takes any attribute; validate() names the stray one."""
  config = config_with(data_path)
  config.optimizer.lerning_rate = 0.1
  with pytest.raises(ValueError) as error:
    config_checks.validate(config)
  message = str(error.value)
  for text in (
      'config.optimizer.lerning_rate=0.1',
      "did you mean 'learning_rate'",
      'learning_rate, momentum',
  ):
    assert text in message


@pytest.mark.parametrize(
    'field, value, valid',
    [
        ('method', 'ffkdd', 'ffkd'),
        ('model', 'resnet9', 'resnet8'),
        ('teacher.model', 'resnet_1', 'resnet32x4'),
        ('optimizer.name', 'lamb', "'sgd' or 'adamw'"),
        ('optimizer.schedule', 'linear', "'steps', 'cosine' or 'constant'"),
        ('nonfinite_policy', 'ignore', "'skip' or 'stop'"),
    ],
)
def test_unknown_names(data_path, field, value, valid):
  config = config_with(data_path, **{field.replace('.', '__'): value})
  with pytest.raises(ValueError) as error:
    config_checks.validate(config)
  assert f'config.{field}={value!r} is not valid' in str(error.value)
  assert valid in str(error.value)


def test_unknown_dataset(tmp_path, data_path):
  config = config_with(data_path, dataset__name='cifar1000')
  fails_with(
      config,
      tmp_path,
      "config.dataset.name='cifar1000' is not a TFDS builder",
      "'image_folder'",
      'cifar100',
  )


@pytest.mark.parametrize(
    'field, value', [('batch_size', 6), ('batch_size', 2), ('eval_batch_size', 10)]
)
def test_batch_not_divisible_by_the_device_count(tmp_path, data_path, field, value):
  config = config_with(data_path, **{field: value})
  fails_with(
      config, tmp_path, f'config.{field}={value} is not valid', 'divisible by the device count (4)'
  )


@pytest.mark.parametrize(
    'field, value',
    [
        ('optimizer.learning_rate', 0.0),
        ('optimizer.learning_rate', -0.1),
        ('optimizer.learning_rate', math.inf),
        ('optimizer.learning_rate', math.nan),
        ('batch_size', 0),
        ('checkpoint_every_steps', -1),
        ('kd.temperature', 0.0),
        ('dkd.temperature', -1.0),
        ('cd.temperature', 0.0),
        ('cd.edt_factor', -0.9),
        ('ccs.temperature', math.nan),
        ('ffkd.temperature', -4.0),
        ('dist.temperature', math.inf),
        ('ffkd.teacher_lr_scale', 0.0),
        ('sokd.temperature', 0.0),
        ('sokd.branch_lr_scale', -1.0),
    ],
)
def test_values_that_must_be_positive(tmp_path, data_path, field, value):
  config = config_with(data_path, **{field.replace('.', '__'): value})
  block = field.split('.')[0]
  if block in methods.available_methods():  # a method checks its own block when selected
    config.method = block
  fails_with(
      config, tmp_path, f'config.{field}={value!r} is not valid', 'must be a finite number > 0'
  )


@pytest.mark.parametrize(
    'field, value, valid',
    [
        ('dkd.warmup_steps', 0, 'it must be >= 1'),
        ('reviewkd.warmup_steps', 0, 'it must be >= 1'),
        ('reviewkd.max_mid_channels', 0, 'it must be >= 1'),
        ('cd.edt_boundary_steps', (200, 100), 'increasing integer global steps >= 0'),
        ('cd.edt_boundary_steps', (-1,), 'increasing integer global steps >= 0'),
        ('cd.edt_factor', 1.5, 'in (0, 1]'),
        ('dkd.beta', -8.0, 'a weight must be a finite number >= 0'),
        ('cd.cd_weight', math.nan, 'a weight must be a finite number >= 0'),
        ('ccs.kd_weight', -1.0, 'a weight must be a finite number >= 0'),
        ('reviewkd.reviewkd_weight', -5.0, 'a weight must be a finite number >= 0'),
        ('reviewkd.ce_weight', math.nan, 'a weight must be a finite number >= 0'),
        ('kdcl.gamma', math.inf, 'a weight must be a finite number >= 0'),
        ('sokd.kd_weight', -1.0, 'a weight must be a finite number >= 0'),
        ('sokd.branch_kd_teacher_weight', math.nan, 'a weight must be a finite number >= 0'),
        ('sokd.branch_init', 'copy', "valid: ('random', 'teacher')"),
        ('ffkd.beta_fdbk', -0.1, 'a weight must be a finite number >= 0'),
        ('ffkd.feedback_batch', 'other', "valid: ('independent', 'same')"),
        ('dml.peer_updates', 'sometimes', "valid: ('alternating', 'synchronous')"),
    ],
)
def test_bad_values_of_a_method_block(data_path, field, value, valid):
  """A method checks its own block when selected: the field, the value, what is valid."""
  config = config_with(data_path, **{field.replace('.', '__'): value})
  config.method = field.split('.')[0]
  with pytest.raises(ValueError) as error:
    config_checks.validate(config)
  assert f'config.{field}={value!r} is not valid' in str(error.value)
  assert valid in str(error.value)


@pytest.mark.parametrize('epochs', [0.0, -3.0])
def test_epochs_must_be_positive(tmp_path, data_path, epochs):
  config = config_with(data_path, num_train_steps=-1, num_epochs=epochs)
  fails_with(
      config,
      tmp_path,
      f'config.num_epochs={epochs!r} is not valid',
      'must be a finite number > 0 (or set config.num_train_steps > 0)',
  )


def test_workdir_not_writable(tmp_path, data_path):
  """Under a regular file (chmod would not stop root, which CI may run as)."""
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a directory')
  workdir = blocker / 'sub'
  fails_with(
      config_with(data_path),
      workdir,
      f"--workdir='{workdir}' is not a writable " 'directory',
      'pass a directory you can write to',
  )


# ----------------------------------------------------------------------------------------------
# The teacher and the features a method reads.


def write_teacher(workdir, model='resnet8', num_classes=10):
  """A checkpoint whose meta says `model` (the arrays are a stand-in: only meta is read first)."""
  checkpoints = checkpoint_lib.Checkpoints(str(workdir), 1)
  checkpoints.save(
      run_fixture.small_state(5),
      {'method': 'ce', 'roles': {'model': model}, 'num_classes': num_classes},
  )
  checkpoints.wait()
  checkpoints.close()
  return str(workdir)


def test_teacher_checkpoint_missing(tmp_path, data_path):
  missing = str(tmp_path / 'no_such_teacher')
  config = config_with(data_path, method='kd', teacher__checkpoint=missing)
  fails_with(
      config,
      tmp_path / 'run',
      f"config.teacher.checkpoint='{missing}' is not valid",
      'no such file or directory',
      'import_torch',
  )


def test_teacher_checkpoint_holds_no_checkpoint(tmp_path, data_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  config = config_with(data_path, method='kd', teacher__checkpoint=str(empty))
  fails_with(
      config,
      tmp_path / 'run',
      f"config.teacher.checkpoint='{empty}' holds no checkpoint",
      'checkpoints/',
  )


def test_teacher_of_another_architecture(tmp_path, data_path):
  teacher = write_teacher(tmp_path / 'teacher', model='resnet8')
  config = config_with(
      data_path, method='kd', teacher__model='resnet14', teacher__checkpoint=teacher
  )
  fails_with(
      config,
      tmp_path / 'run',
      "config.teacher.model='resnet14' with 10 classes does " 'not match',
      "its role 'model' is 'resnet8' with 10 classes",
  )


def test_damaged_teacher_checkpoint(tmp_path):
  teacher = write_teacher(tmp_path / 'teacher')
  meta_path = os.path.join(teacher, 'checkpoints', '5', 'meta', 'metadata')
  with open(meta_path, encoding='utf-8') as f:
    meta = f.read()
  with open(meta_path, 'w', encoding='utf-8') as f:
    f.write(meta.replace('"state_digest": "', '"state_digest": "0'))
  with pytest.raises(checkpoint_lib.CorruptCheckpointError) as error:
    checkpoint_lib.load_pretrained_role(teacher, 'resnet8', 10, None, None)
  assert f"config.teacher.checkpoint='{teacher}'" in str(error.value)
  assert 'does not restore intact' in str(error.value)


def test_teacher_needed_but_none_given(tmp_path, data_path):
  config = config_with(data_path, method='kd')
  fails_with(
      config,
      tmp_path,
      "config.teacher.checkpoint='' is not valid for config.method='kd'",
      'distils from a pre-trained teacher',
      'config.teacher.pretrain_steps',
  )


@pytest.mark.parametrize(
    'method, field, pairs',
    [
        ('ffkd', 'layer_pairs', 'stage9:stage3'),
        ('at', 'layer_pairs', 'stage3:stage7'),
    ],
)
def test_features_the_model_does_not_produce(tmp_path, data_path, method, field, pairs):
  teacher = write_teacher(tmp_path / 'teacher')
  config = config_with(
      data_path, method=method, teacher__checkpoint=teacher, **{f'{method}__{field}': pairs}
  )
  bad = 'stage9' if pairs.startswith('stage9') else 'stage7'
  fails_with(
      config,
      tmp_path / 'run',
      f"feature '{bad}'",
      'is not produced by its model',
      'stage1, stage1_preact, stage2',
  )


# ----------------------------------------------------------------------------------------------
# Data.


def test_tfds_dataset_absent_on_an_offline_machine(tmp_path, data_path, monkeypatch):
  """cifar100 with an empty data_dir and no network: say how to supply the data."""

  def no_network(self, *args, **kwargs):
    raise ConnectionError('Failed to establish a new connection: Network is unreachable')

  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', no_network)
  monkeypatch.setattr(tfds_source, '_online', lambda: False)
  config = config_with(
      data_path,
      dataset__name='cifar100',
      dataset__path=None,
      dataset__data_dir=str(tmp_path / 'tfds'),
  )
  fails_with(
      config,
      tmp_path / 'run',
      "config.dataset.name='cifar100'",
      'this machine appears offline',
      'Network is unreachable',
      'config.dataset.data_dir=',
      'config.dataset.manual_dir=',
      "config.dataset.name='image_folder' with config.dataset.path=",
      error=data.DatasetUnavailableError,
  )


def test_image_folder_without_classes(tmp_path, data_path):
  empty = tmp_path / 'empty'
  for split in ('train', 'test'):
    (empty / split).mkdir(parents=True)
  config = config_with(str(empty))
  fails_with(
      config,
      tmp_path / 'run',
      f'config.dataset.path={str(empty)!r}',
      'has no class subfolders',
      'train/<class>/<image>',
  )


def test_image_folder_with_a_class_without_images(tmp_path):
  root = tmp_path / 'data'
  write_image_folder(root, ('cat', 'dog'), num_train=8, num_test=2, size=16)
  (root / 'train' / 'eel').mkdir()
  (root / 'test' / 'eel').mkdir()
  fails_with(
      config_with(str(root)), tmp_path / 'run', 'eel', 'holds no images', 'valid extensions: .jpg'
  )


def test_image_folder_with_other_classes_in_test(tmp_path):
  root = tmp_path / 'data'
  write_image_folder(root, ('cat', 'dog'), num_train=8, num_test=2, size=16)
  os.rename(root / 'test' / 'dog', root / 'test' / 'dingo')
  fails_with(
      config_with(str(root)),
      tmp_path / 'run',
      'train/ and test/ hold different classes',
      "only in train/: ['dog']",
      "only in test/: ['dingo']",
  )


def test_unreadable_image_is_an_error_by_default(tmp_path):
  root = tmp_path / 'data'
  write_image_folder(root, ('cat', 'dog'), num_train=8, num_test=2, size=16)
  bad = write_corrupt_file(os.path.join(root, 'train', 'dog', 'broken.png'))
  fails_with(
      config_with(str(root)),
      tmp_path / 'run',
      bad,
      "config.dataset.on_bad_image='error'",
      "config.dataset.on_bad_image='skip'",
  )


def test_unreadable_images_are_skipped_and_counted_when_asked(tmp_path, caplog):
  root = tmp_path / 'data'
  write_image_folder(root, ('cat', 'dog'), num_train=8, num_test=2, size=16)
  for name in ('broken1.png', 'broken2.jpg'):
    write_corrupt_file(os.path.join(root, 'train', 'cat', name))
  config = config_with(str(root), dataset__on_bad_image='skip')
  with caplog.at_level(logging.WARNING):
    info = data.open_source(config.dataset).info
  assert info.num_train == 16
  assert 'skipped 2 unreadable image files of 18 in the train split' in caplog.text
  assert 'broken1.png' in caplog.text
