"""Errors of ffkd_jax.data: each names the config.dataset field, the value and what is valid."""

import logging
import os

import pytest

from ffkd_jax import data, defaults
from tests.image_folder_fixture import CLASSES, folder_config, write_corrupt_file, write_image_folder


@pytest.fixture
def folder(tmp_path):
  return write_image_folder(tmp_path / 'data', CLASSES, num_train=6, num_test=3, size=8)


def _no_classes(root):
  os.makedirs(root / 'train')
  os.makedirs(root / 'test')


def _empty_class(root):
  write_image_folder(root, CLASSES, num_train=1, num_test=1)
  os.makedirs(root / 'train' / 'eel')
  os.makedirs(root / 'test' / 'eel')


def _mismatch(root):
  write_image_folder(root, CLASSES, num_train=1, num_test=1)
  write_image_folder(root / 'extra', ('fox',), num_train=1, num_test=1)
  os.rename(root / 'extra' / 'train' / 'fox', root / 'train' / 'fox')
  os.rename(root / 'test' / 'emu', root / 'test' / 'gnu')


@pytest.mark.parametrize(
    'make, overrides, expected',
    [
        (None, {'path': None}, ['config.dataset.path=None']),
        (None, {}, ['config.dataset.path=', 'not a directory']),
        (_no_classes, {}, ['config.dataset.path=', 'no class subfolders']),
        (_empty_class, {}, ['config.dataset.path=', 'eel', 'no images', '.jpg']),
        (
            _mismatch,
            {},
            ['config.dataset.path=', "only in train/: ['emu', 'fox']", "only in test/: ['gnu']"],
        ),
        (
            None,
            {'name': 'cifar1000'},
            ["config.dataset.name='cifar1000'", 'not a TFDS builder', 'cifar100'],
        ),
        (None, {'augment': 'autoaugment'}, ["config.dataset.augment='autoaugment'", "'cifar'"]),
        (None, {'val_fraction': 1.0}, ['config.dataset.val_fraction=1.0', '[0, 1)']),
        (None, {'cache_budget_gib': 0.0}, ['config.dataset.cache_budget_gib=0.0', 'GiB > 0']),
        (None, {'cache_budget_gib': float('nan')}, ['config.dataset.cache_budget_gib=nan']),
    ],
)
def test_bad_config_errors(tmp_path, make, overrides, expected):
  root = tmp_path / 'data'
  if make:
    make(root)
  config = folder_config(root)
  config.update(overrides)
  with pytest.raises(ValueError) as error:
    data.open_source(config)
  for text in expected:
    assert text in str(error.value)


def test_tfds_absent_error(tmp_path):
  config = defaults.dataset_config()
  config.update(name='cifar10', data_dir=str(tmp_path), download=False)
  with pytest.raises(data.DatasetUnavailableError) as error:
    data.open_source(config)
  message = str(error.value)
  for text in (
      "config.dataset.name='cifar10'",
      'absent',
      'config.dataset.data_dir',
      'config.dataset.manual_dir',
      "config.dataset.name='image_folder'",
      'config.dataset.path',
  ):
    assert text in message


@pytest.mark.parametrize('cache', [True, False])
def test_folder_bad_image(folder, cache, caplog):
  bad = write_corrupt_file(os.path.join(folder, 'train', 'dog', 'zz_bad.jpg'))
  with caplog.at_level(logging.WARNING):
    source = data.open_source(folder_config(folder, on_bad_image='skip', cache=cache))
  assert source.info.num_train == 18
  assert 'skipped 1 unreadable image files' in caplog.text and 'zz_bad.jpg' in caplog.text
  batch = next(data.train_iterator(source, local_batch_size=18, seed=0))
  assert sorted(batch['label']) == [0] * 6 + [1] * 6 + [2] * 6

  source = data.open_source(folder_config(folder, on_bad_image='error', cache=cache))
  assert source.info.num_train == 19
  with pytest.raises(ValueError, match="on_bad_image='error'.*zz_bad.jpg") as error:
    next(data.train_iterator(source, local_batch_size=19, seed=0))
  assert bad in str(error.value)
