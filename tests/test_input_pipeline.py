"""Tests of ffkd_jax.input_pipeline: mocked TFDS, synthetic image folders, real CIFAR-10 JPEGs."""

import itertools
import logging
import os
import pathlib
import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds

from ffkd_jax import defaults, input_pipeline
from image_folder_fixture import read_images, write_corrupt_file, write_image_folder

CLASSES = ('cat', 'dog', 'emu')
CIFAR10_ARCHIVE = pathlib.Path(__file__).resolve().parents[1] / '../shared/data/cifar10-jpeg.tar.gz'
CIFAR10_UNPACKED = pathlib.Path('/tmp/ffkd-data/cifar10-jpeg')


@pytest.fixture(autouse=True)
def _fresh_sources():
  input_pipeline._make_source.cache_clear()  # each test sees its own files and mocks
  yield
  input_pipeline._make_source.cache_clear()


def folder_config(path, **overrides):
  config = defaults.dataset_config()
  config.name = input_pipeline.IMAGE_FOLDER
  config.path = str(path)
  config.augment = 'none'
  config.prefetch = 1
  config.update(overrides)
  return config


@pytest.fixture
def folder(tmp_path):
  return write_image_folder(tmp_path / 'data', CLASSES, num_train=6, num_test=3, size=8)


def take(iterator, n):
  return list(itertools.islice(iterator, n))


def to_uint8(images, info):
  """Undoes the normalisation: bytes that identify an image."""
  pixels = np.round((images * np.array(info.std) + np.array(info.mean)) * 255)
  return [p.astype(np.uint8).tobytes() for p in pixels]


# ----------------------------------------------------------------------------------------------
# TFDS, mocked.


@pytest.mark.parametrize('cache', [True, False])
def test_mock_cifar10_train_and_eval(cache):
  config = defaults.dataset_config()
  config.update(name='cifar10', cache=cache, prefetch=1)
  with tfds.testing.mock_data(num_examples=20):
    info = input_pipeline.get_dataset_info(config)
    assert (info.num_classes, info.image_size, info.num_train, info.num_test) == (10, 32, 20, 20)
    assert info.mean == input_pipeline.MEAN_STD['cifar10'][0]
    assert len(info.class_names) == 10
    batches = take(input_pipeline.train_iterator(config, local_batch_size=8, seed=0), 3)
    for batch in batches:
      assert batch['image'].shape == (8, 32, 32, 3) and batch['image'].dtype == np.float32
      assert batch['label'].shape == (8,) and batch['label'].dtype == np.int32
      assert 0 <= batch['label'].min() and batch['label'].max() < 10
    evals = list(input_pipeline.eval_iterator(config, 'test', local_batch_size=8))
  assert [b['mask'].sum() for b in evals] == [8, 8, 4]
  last = evals[-1]
  assert last['mask'].dtype == np.float32 and last['image'].shape == (8, 32, 32, 3)
  np.testing.assert_array_equal(last['mask'], [1] * 4 + [0] * 4)
  assert not last['image'][4:].any() and not last['label'][4:].any()


# ----------------------------------------------------------------------------------------------
# Image folders.


def test_folder_classes_and_normalisation(folder):
  mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.2)
  config = folder_config(folder, mean=mean, std=std)
  info = input_pipeline.get_dataset_info(config)
  assert info.class_names == CLASSES and info.num_classes == 3
  assert (info.num_train, info.num_val, info.num_test, info.image_size) == (18, 0, 9, 8)
  batches = list(input_pipeline.eval_iterator(config, 'test', local_batch_size=4))
  assert [b['mask'].sum() for b in batches] == [4, 4, 1]
  images = np.concatenate([b['image'] for b in batches])[:9]
  labels = np.concatenate([b['label'] for b in batches])[:9]
  expected_images, expected_labels = read_images(folder, 'test', CLASSES)
  np.testing.assert_array_equal(labels, expected_labels)
  expected = (expected_images / 255.0 - np.array(mean)) / np.array(std)
  np.testing.assert_allclose(images, expected, atol=1e-5)
  assert not batches[-1]['image'][1:].any()


def test_folder_val_carve_out(folder, caplog):
  config = folder_config(folder, val_fraction=1 / 3)
  info = input_pipeline.get_dataset_info(config)
  assert (info.num_train, info.num_val, info.num_test) == (12, 6, 9)
  val = np.concatenate(
      [b['image'] for b in input_pipeline.eval_iterator(config, 'val', local_batch_size=6)]
  )
  train = np.concatenate(
      [
          b['image']
          for b in take(input_pipeline.train_iterator(config, local_batch_size=4, seed=1), 3)
      ]
  )  # one epoch
  val_set, train_set = set(to_uint8(val, info)), set(to_uint8(train, info))
  assert len(val_set) == 6 and len(train_set) == 12 and not val_set & train_set
  all_train, _ = read_images(folder, 'train', CLASSES)
  assert val_set | train_set == {image.tobytes() for image in all_train}

  input_pipeline._make_source.cache_clear()
  config = folder_config(folder)
  with caplog.at_level(logging.INFO):
    info = input_pipeline.get_dataset_info(config)
  assert (info.num_val, info.num_test) == (0, 9)  # no validation split: 'val' reads test
  assert "split 'val' is the test split" in caplog.text
  val = list(input_pipeline.eval_iterator(config, 'val', local_batch_size=9))
  test = list(input_pipeline.eval_iterator(config, 'test', local_batch_size=9))
  np.testing.assert_array_equal(val[0]['image'], test[0]['image'])


@pytest.mark.parametrize('augment', ['cifar', 'imagenet'])
def test_folder_resume_is_exact(folder, augment):
  """Batches from start_step=s are the tail of a run from 0, across epoch boundaries."""
  streams = {}
  for cache in (True, False):
    config = folder_config(folder, augment=augment, cache=cache)
    run = lambda start, n, seed=0: take(
        input_pipeline.train_iterator(config, local_batch_size=4, seed=seed, start_step=start), n
    )  # 4 steps an epoch
    from_zero = run(0, 10)
    for start in (3, 4, 7):
      for a, b in zip(from_zero[start:], run(start, 10 - start)):
        np.testing.assert_array_equal(a['image'], b['image'])
        np.testing.assert_array_equal(a['label'], b['label'])
    other_seed = run(0, 1, seed=1)[0]
    assert not np.array_equal(other_seed['image'], from_zero[0]['image'])
    streams[cache] = from_zero
  for a, b in zip(streams[True], streams[False]):  # the cache changes nothing
    np.testing.assert_allclose(a['image'], b['image'], atol=1e-5)


def test_folder_augmentation_changes_images_but_none_does_not(folder):
  info = input_pipeline.get_dataset_info(folder_config(folder))
  originals = {image.tobytes() for image in read_images(folder, 'train', CLASSES)[0]}
  for augment, min_changed, max_changed in (('none', 0, 0), ('cifar', 8, 16), ('imagenet', 12, 16)):
    config = folder_config(folder, augment=augment)
    images = np.concatenate(
        [
            b['image']
            for b in take(input_pipeline.train_iterator(config, local_batch_size=8, seed=0), 2)
        ]
    )
    assert images.shape == (16, 8, 8, 3)
    changed = sum(image not in originals for image in to_uint8(images, info))
    assert min_changed <= changed <= max_changed, (augment, changed)


def test_folder_process_shards(folder, monkeypatch):
  """Two emulated processes: disjoint train shards, equal numbers of eval batches."""
  config = folder_config(folder)
  info = input_pipeline.get_dataset_info(config)
  monkeypatch.setattr(input_pipeline.jax, 'process_count', lambda: 2)
  seen, masks = [], []
  for process in (0, 1):
    monkeypatch.setattr(input_pipeline.jax, 'process_index', lambda process=process: process)
    epoch = take(input_pipeline.train_iterator(config, local_batch_size=4, seed=0), 2)
    seen.append(set(to_uint8(np.concatenate([b['image'] for b in epoch]), info)))
    evals = list(input_pipeline.eval_iterator(config, 'test', local_batch_size=4))
    masks.append([b['mask'].sum() for b in evals])
  assert len(seen[0]) == len(seen[1]) == 8 and not seen[0] & seen[1]
  assert masks == [[4, 1], [4, 0]]  # shards of 5 and 4 test images


def test_folder_varied_sizes_cached_as_read(tmp_path):
  """Images of varied shapes: the ragged cache gives exactly what decoding the files gives."""
  root = write_image_folder(
      tmp_path / 'data',
      CLASSES,
      num_train=4,
      num_test=2,
      size=[(10, 14), (16, 12), (9, 9)],
      fmt='jpg',
  )
  outputs = {}
  for cache in (True, False):
    config = folder_config(root, augment='imagenet', image_size=8, cache=cache)
    info = input_pipeline.get_dataset_info(config)
    assert info.image_size == 8 and info.mean == input_pipeline.IMAGENET_MEAN_STD[0]
    train = take(input_pipeline.train_iterator(config, local_batch_size=4, seed=3), 4)
    test = list(input_pipeline.eval_iterator(config, 'test', local_batch_size=4))
    outputs[cache] = [b['image'] for b in train + test]
    assert all(image.shape == (4, 8, 8, 3) for image in outputs[cache])
  for a, b in zip(outputs[True], outputs[False]):
    np.testing.assert_allclose(a, b, atol=1e-5)


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
    ],
)
def test_bad_config_errors(tmp_path, make, overrides, expected):
  root = tmp_path / 'data'
  if make:
    make(root)
  config = folder_config(root)
  config.update(overrides)
  with pytest.raises(ValueError) as error:
    input_pipeline.get_dataset_info(config)
  for text in expected:
    assert text in str(error.value)


def test_tfds_absent_error(tmp_path):
  config = defaults.dataset_config()
  config.update(name='cifar10', data_dir=str(tmp_path), download=False)
  with pytest.raises(input_pipeline.DatasetUnavailableError) as error:
    input_pipeline.get_dataset_info(config)
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
    config = folder_config(folder, on_bad_image='skip', cache=cache)
    info = input_pipeline.get_dataset_info(config)
  assert info.num_train == 18
  assert 'skipped 1 unreadable image files' in caplog.text and 'zz_bad.jpg' in caplog.text
  batch = next(input_pipeline.train_iterator(config, local_batch_size=18, seed=0))
  assert sorted(batch['label']) == [0] * 6 + [1] * 6 + [2] * 6

  config = folder_config(folder, on_bad_image='error', cache=cache)
  assert input_pipeline.get_dataset_info(config).num_train == 19
  with pytest.raises(ValueError, match="on_bad_image='error'.*zz_bad.jpg") as error:
    next(input_pipeline.train_iterator(config, local_batch_size=19, seed=0))
  assert bad in str(error.value)


def test_steps_per_epoch(folder):
  info = input_pipeline.get_dataset_info(folder_config(folder))
  assert input_pipeline.steps_per_epoch(info, 4) == 4
  with pytest.raises(ValueError, match='global batch size 32'):
    input_pipeline.steps_per_epoch(info, 32)


# ----------------------------------------------------------------------------------------------
# The real CIFAR-10 JPEGs (../shared/data), where present.


@pytest.fixture(scope='session')
def cifar10_jpeg(tmp_path_factory):
  if (CIFAR10_UNPACKED / 'train').is_dir() and (CIFAR10_UNPACKED / 'test').is_dir():
    return CIFAR10_UNPACKED
  if not CIFAR10_ARCHIVE.is_file():
    pytest.skip(
        f'real CIFAR-10 JPEGs absent: no {CIFAR10_ARCHIVE.resolve()} (see '
        '../shared/data/README.md)'
    )
  root = tmp_path_factory.mktemp('cifar10')
  with tarfile.open(CIFAR10_ARCHIVE) as archive:
    archive.extractall(root, filter='data')
  return root / 'cifar10-jpeg'


def test_real_cifar10_jpegs(cifar10_jpeg):
  mean, std = input_pipeline.MEAN_STD['cifar10']
  config = folder_config(cifar10_jpeg, augment='cifar', cache=False, mean=mean, std=std)
  info = input_pipeline.get_dataset_info(config)
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
  batch = next(input_pipeline.train_iterator(config, local_batch_size=256, seed=0))
  assert batch['image'].shape == (256, 32, 32, 3)
  assert len(np.unique(batch['label'])) == 10
  # About 13% of the pixels of a crop are zero padding, (0 - mean) / std: the mean drops to about
  # -0.25 and the std rises a little above 1.
  channel_mean, channel_std = batch['image'].mean((0, 1, 2)), batch['image'].std((0, 1, 2))
  assert np.all((-0.45 < channel_mean) & (channel_mean < -0.05)), channel_mean
  assert np.all((0.95 < channel_std) & (channel_std < 1.4)), channel_std
  test = next(input_pipeline.eval_iterator(config, 'test', local_batch_size=500))
  assert test['mask'].all() and set(test['label']) == {0}  # class-major order: airplanes first
  first = read_images(cifar10_jpeg, 'test', ['airplane'], limit=1)[0][0]  # decoded by PIL
  np.testing.assert_allclose(
      test['image'][0], (first / 255 - np.array(mean)) / np.array(std), atol=1e-5
  )


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
  from_archive = input_pipeline.get_dataset_info(config)
  config.path = str(root)
  from_folder = input_pipeline.get_dataset_info(config)
  assert from_archive.class_names == from_folder.class_names
  assert (from_archive.num_train, from_archive.num_test) == (
      from_folder.num_train,
      from_folder.num_test,
  )
  unpacked = list((tmp_path / 'cache').iterdir())
  assert len(unpacked) == 1 and (unpacked[0] / 'myimages' / 'train').is_dir()
