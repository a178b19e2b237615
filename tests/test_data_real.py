"""ffkd_jax.data on data as shipped: the real CIFAR-10 JPEGs (../shared/data), archives."""

import collections
import os
import pathlib
import tarfile

import numpy as np
import pytest

from ffkd_jax import data, defaults
from tests.image_folder_fixture import folder_config, read_images, write_image_folder

CIFAR10_ARCHIVE = pathlib.Path(__file__).resolve().parents[1] / '../shared/data/cifar10-jpeg.tar.gz'
CIFAR10_UNPACKED = pathlib.Path('/tmp/ffkd-data/cifar10-jpeg')


@pytest.fixture(scope='session')
def cifar10_jpeg(tmp_path_factory):
  if (CIFAR10_UNPACKED / 'train').is_dir() and (CIFAR10_UNPACKED / 'test').is_dir():
    return CIFAR10_UNPACKED
  if not CIFAR10_ARCHIVE.is_file():
    if os.environ.get('CI'):  # CI lays ../shared beside the clone: its absence is a failure
      pytest.fail(f'CI=true but the real CIFAR-10 archive {CIFAR10_ARCHIVE.resolve()} is absent')
    pytest.skip(
        f'real CIFAR-10 JPEGs absent: no {CIFAR10_ARCHIVE.resolve()} (see '
        '../shared/data/README.md)'
    )
  root = tmp_path_factory.mktemp('cifar10')
  with tarfile.open(CIFAR10_ARCHIVE) as archive:
    archive.extractall(root, filter='data')
  return root / 'cifar10-jpeg'


def test_real_cifar10_jpegs(cifar10_jpeg):
  mean, std = data.MEAN_STD['cifar10']
  source = data.open_source(
      folder_config(cifar10_jpeg, augment='cifar', cache=False, mean=mean, std=std)
  )
  info = source.info
  assert (info.num_classes, info.num_train, info.num_test, info.image_size) == (
      10,
      50000,
      10000,
      32,
  )
  assert info.class_names == (
      'airplane',
      'automobile',
      'bird',
      'cat',
      'deer',
      'dog',
      'frog',
      'horse',
      'ship',
      'truck',
  )
  batch = next(data.train_iterator(source, local_batch_size=256, seed=0))
  assert batch['image'].shape == (256, 32, 32, 3)
  assert len(np.unique(batch['label'])) == 10
  # About 13% of the pixels of a crop are zero padding, (0 - mean) / std: the mean drops to about
  # -0.25 and the std rises a little above 1.
  channel_mean, channel_std = batch['image'].mean((0, 1, 2)), batch['image'].std((0, 1, 2))
  assert np.all((-0.45 < channel_mean) & (channel_mean < -0.05)), channel_mean
  assert np.all((0.95 < channel_std) & (channel_std < 1.4)), channel_std
  test = next(data.eval_iterator(source, 'test', local_batch_size=500))
  assert test['mask'].all() and set(test['label']) == {0}  # class-major order: airplanes first
  first = read_images(cifar10_jpeg, 'test', ['airplane'], limit=1)[0][0]  # decoded by PIL
  np.testing.assert_allclose(
      test['image'][0], (first / 255 - np.array(mean)) / np.array(std), atol=1e-5
  )
  mixed = data.class_mixed_indices(source, 'test', 500, seed=0)
  subset = next(data.eval_iterator(source, 'test', local_batch_size=500, indices=mixed))
  assert sorted(collections.Counter(subset['label']).values()) == [50] * 10  # 10 classes x 1000


def test_image_folder_archive_is_unpacked_once(tmp_path, monkeypatch):
  """config.dataset.path may name a .tar.gz of an image folder; it is unpacked once, cached."""
  root = tmp_path / 'folder'
  write_image_folder(root)
  archive = tmp_path / 'folder.tar.gz'
  with tarfile.open(archive, 'w:gz') as tar:
    tar.add(root, arcname='myimages')
  monkeypatch.setenv('FFKD_DATA_CACHE', str(tmp_path / 'cache'))
  config = defaults.dataset_config()
  config.name = 'image_folder'
  config.path = str(archive)
  from_archive = data.open_source(config).info
  config.path = str(root)
  from_folder = data.open_source(config).info
  assert from_archive.class_names == from_folder.class_names
  assert (from_archive.num_train, from_archive.num_test) == (
      from_folder.num_train,
      from_folder.num_test,
  )
  unpacked = list((tmp_path / 'cache').iterdir())
  assert len(unpacked) == 1 and (unpacked[0] / 'myimages' / 'train').is_dir()
