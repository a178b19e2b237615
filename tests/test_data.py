"""Tests of ffkd_jax.data on mocked TFDS and synthetic image folders: batches, sources, subsets.

Error messages: test_data_errors.py; the real CIFAR-10 JPEGs and archives: test_data_real.py.
"""

import collections
import itertools
import logging
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from ffkd_jax import data, defaults
from ffkd_jax.data import iterators
from tests.image_folder_fixture import CLASSES, folder_config, read_images, write_image_folder


@pytest.fixture
def folder(tmp_path):
  return write_image_folder(tmp_path / 'data', CLASSES, num_train=6, num_test=3, size=8)


def take(iterator, n):
  return list(itertools.islice(iterator, n))


def to_uint8(images, info):
  """Undoes the normalisation: bytes that identify an image."""
  pixels = np.round((images * np.array(info.std) + np.array(info.mean)) * 255)
  return [p.astype(np.uint8).tobytes() for p in pixels]


def one_pass(source, split, batch_size, **kwargs):
  """An eval pass as (images, labels, mask) over all its batches, padding included."""
  batches = list(data.eval_iterator(source, split, local_batch_size=batch_size, **kwargs))
  return tuple(np.concatenate([b[key] for b in batches]) for key in ('image', 'label', 'mask'))


def mock_cifar10(**overrides):
  config = defaults.dataset_config()
  config.update(name='cifar10', prefetch=1, **overrides)
  return config


# ----------------------------------------------------------------------------------------------
# TFDS, mocked.


@pytest.mark.parametrize('cache', [True, False])
def test_mock_cifar10_train_and_eval(cache):
  with tfds.testing.mock_data(num_examples=20):
    source = data.open_source(mock_cifar10(cache=cache))
    info = source.info
    assert (info.num_classes, info.image_size, info.num_train, info.num_test) == (10, 32, 20, 20)
    assert info.mean == data.MEAN_STD['cifar10'][0]
    assert len(info.class_names) == 10
    batches = take(data.train_iterator(source, local_batch_size=8, seed=0), 3)
    for batch in batches:
      assert batch['image'].shape == (8, 32, 32, 3) and batch['image'].dtype == np.float32
      assert batch['label'].shape == (8,) and batch['label'].dtype == np.int32
      assert 0 <= batch['label'].min() and batch['label'].max() < 10
    evals = list(data.eval_iterator(source, 'test', local_batch_size=8))
    if cache:  # example indices (CRD) where the split is held, a clear error where streamed
      batch = next(data.train_iterator(source, local_batch_size=8, seed=0, with_index=True))
      np.testing.assert_array_equal(batch['label'], data.train_labels(source)[batch['index']])
    else:
      assert data.train_labels(source) is None
      with pytest.raises(ValueError, match=r'streamed TFDS split.*config.dataset.cache'):
        next(data.train_iterator(source, local_batch_size=8, seed=0, with_index=True))
  assert [b['mask'].sum() for b in evals] == [8, 8, 4]
  last = evals[-1]
  assert last['mask'].dtype == np.float32 and last['image'].shape == (8, 32, 32, 3)
  np.testing.assert_array_equal(last['mask'], [1] * 4 + [0] * 4)
  assert not last['image'][4:].any() and not last['label'][4:].any()


@pytest.mark.parametrize('cache', [True, False])
def test_mock_cifar10_eval_at_indices(cache):
  """Cached, indices gather; streamed, the split is read and filtered: the same examples."""
  indices = np.array([17, 3, 0, 11, 11, 19])  # unsorted, one repeated
  with tfds.testing.mock_data(num_examples=20):
    source = data.open_source(mock_cifar10(cache=cache))
    images, labels, _ = one_pass(source, 'test', 8)
    got_images, got_labels, mask = one_pass(source, 'test', 4, indices=indices)
    mixed = data.class_mixed_indices(source, 'test', 8, seed=0)
  assert source.is_cached('test') == cache
  np.testing.assert_array_equal(mask, [1] * 6 + [0] * 2)
  np.testing.assert_array_equal(got_images[:6], images[indices])
  np.testing.assert_array_equal(got_labels[:6], labels[indices])
  if cache:  # labels known: round-robin over the classes present
    present = len(np.unique(labels[:20]))
    assert len(set(labels[mixed[: min(present, 8)]])) == min(present, 8)
  else:  # labels unknown without reading the split: the first examples in stored order
    np.testing.assert_array_equal(mixed, np.arange(8))


# ----------------------------------------------------------------------------------------------
# Image folders.


def test_folder_classes_and_normalisation(folder):
  mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.2)
  source = data.open_source(folder_config(folder, mean=mean, std=std))
  info = source.info
  assert info.class_names == CLASSES and info.num_classes == 3
  assert (info.num_train, info.num_val, info.num_test, info.image_size) == (18, 0, 9, 8)
  batches = list(data.eval_iterator(source, 'test', local_batch_size=4))
  assert [b['mask'].sum() for b in batches] == [4, 4, 1]
  images = np.concatenate([b['image'] for b in batches])[:9]
  labels = np.concatenate([b['label'] for b in batches])[:9]
  expected_images, expected_labels = read_images(folder, 'test', CLASSES)
  np.testing.assert_array_equal(labels, expected_labels)
  expected = (expected_images / 255.0 - np.array(mean)) / np.array(std)
  np.testing.assert_allclose(images, expected, atol=1e-5)
  assert not batches[-1]['image'][1:].any()


def test_folder_val_carve_out(folder, caplog):
  source = data.open_source(folder_config(folder, val_fraction=1 / 3))
  info = source.info
  assert (info.num_train, info.num_val, info.num_test) == (12, 6, 9)
  val = np.concatenate([b['image'] for b in data.eval_iterator(source, 'val', local_batch_size=6)])
  train = np.concatenate(
      [b['image'] for b in take(data.train_iterator(source, local_batch_size=4, seed=1), 3)]
  )  # one epoch
  val_set, train_set = set(to_uint8(val, info)), set(to_uint8(train, info))
  assert len(val_set) == 6 and len(train_set) == 12 and not val_set & train_set
  all_train, _ = read_images(folder, 'train', CLASSES)
  assert val_set | train_set == {image.tobytes() for image in all_train}

  with caplog.at_level(logging.INFO):
    source = data.open_source(folder_config(folder))
  assert (source.info.num_val, source.info.num_test) == (
      0,
      9,
  )  # no validation split: 'val' reads test
  assert "split 'val' is the test split" in caplog.text
  val = list(data.eval_iterator(source, 'val', local_batch_size=9))
  test = list(data.eval_iterator(source, 'test', local_batch_size=9))
  np.testing.assert_array_equal(val[0]['image'], test[0]['image'])


@pytest.mark.parametrize('augment', ['cifar', 'imagenet'])
def test_folder_resume_is_exact(folder, augment):
  """Batches from start_step=s are the tail of a run from 0, across epoch boundaries."""
  streams = {}
  for cache in (True, False):
    source = data.open_source(folder_config(folder, augment=augment, cache=cache))
    run = lambda start, n, seed=0: take(
        data.train_iterator(source, local_batch_size=4, seed=seed, start_step=start), n
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


def test_a_second_stream_is_another_order_and_resumes_exactly(folder):
  """Stream 1 (FFKD's feedback batches): other batches than stream 0's from the same seed, the
  same on every call, and resumed at step s it is the tail of a run from 0."""
  source = data.open_source(folder_config(folder))
  run = lambda start, n, stream: take(
      data.train_iterator(source, local_batch_size=4, seed=0, start_step=start, stream=stream), n
  )
  main, second = run(0, 6, 0), run(0, 6, 1)
  assert not any(np.array_equal(a['image'], b['image']) for a, b in zip(main, second))
  for a, b in zip(second[3:], run(3, 3, 1)):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  for a, b in zip(main, run(0, 6, 0)):  # stream 0 is unchanged by the other's existence
    np.testing.assert_array_equal(a['image'], b['image'])
  with pytest.raises(ValueError, match='stream=-1'):
    next(data.train_iterator(source, local_batch_size=4, seed=0, stream=-1))


def test_example_indices_name_each_example_and_change_nothing_else(folder, monkeypatch):
  """with_index (CRD's memory rows): each batch row's position in the train split, distinct in
  an epoch, the label that train_labels gives it; images and labels as without it; resumable;
  disjoint between processes."""
  source = data.open_source(folder_config(folder))
  labels = data.train_labels(source)
  assert labels.dtype == np.int32 and len(labels) == source.info.num_train
  run = lambda start, n, **kw: take(
      data.train_iterator(source, local_batch_size=4, seed=0, start_step=start, **kw), n
  )
  steps = data.steps_per_epoch(source.info, 4)
  indexed, plain = run(0, steps, with_index=True), run(0, steps)
  for a, b in zip(indexed, plain):
    assert a['index'].dtype == np.int32 and 'index' not in b
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], labels[a['index']])
  epoch = np.concatenate([b['index'] for b in indexed])
  assert len(set(epoch)) == len(epoch) == steps * 4 and epoch.max() < len(labels)
  for a, b in zip(indexed[2:], run(2, steps - 2, with_index=True)):
    np.testing.assert_array_equal(a['index'], b['index'])
  monkeypatch.setattr(iterators.jax, 'process_count', lambda: 2)
  shards = []
  for process in (0, 1):
    monkeypatch.setattr(iterators.jax, 'process_index', lambda process=process: process)
    shard = run(0, 1, with_index=True)[0]
    np.testing.assert_array_equal(shard['label'], labels[shard['index']])
    shards.append(set(shard['index']))
  assert not shards[0] & shards[1]


def test_folder_augmentation_changes_images_but_none_does_not(folder):
  info = data.open_source(folder_config(folder)).info
  originals = {image.tobytes() for image in read_images(folder, 'train', CLASSES)[0]}
  for augment, min_changed, max_changed in (('none', 0, 0), ('cifar', 8, 16), ('imagenet', 12, 16)):
    source = data.open_source(folder_config(folder, augment=augment))
    images = np.concatenate(
        [b['image'] for b in take(data.train_iterator(source, local_batch_size=8, seed=0), 2)]
    )
    assert images.shape == (16, 8, 8, 3)
    changed = sum(image not in originals for image in to_uint8(images, info))
    assert min_changed <= changed <= max_changed, (augment, changed)


def test_folder_process_shards(folder, monkeypatch):
  """Two emulated processes: disjoint train shards, equal numbers of eval batches."""
  source = data.open_source(folder_config(folder))
  info = source.info
  monkeypatch.setattr(iterators.jax, 'process_count', lambda: 2)
  seen, masks = [], []
  for process in (0, 1):
    monkeypatch.setattr(iterators.jax, 'process_index', lambda process=process: process)
    epoch = take(data.train_iterator(source, local_batch_size=4, seed=0), 2)
    seen.append(set(to_uint8(np.concatenate([b['image'] for b in epoch]), info)))
    evals = list(data.eval_iterator(source, 'test', local_batch_size=4))
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
    source = data.open_source(folder_config(root, augment='imagenet', image_size=8, cache=cache))
    info = source.info
    assert info.image_size == 8 and info.mean == data.IMAGENET_MEAN_STD[0]
    train = take(data.train_iterator(source, local_batch_size=4, seed=3), 4)
    test = list(data.eval_iterator(source, 'test', local_batch_size=4))
    outputs[cache] = [b['image'] for b in train + test]
    assert all(image.shape == (4, 8, 8, 3) for image in outputs[cache])
  for a, b in zip(outputs[True], outputs[False]):
    np.testing.assert_allclose(a, b, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Sources are objects: no hidden cache, a budget for the decoded images.


def test_open_source_twice_gives_independent_sources(folder):
  """Two opens of one config share nothing: files added between them, caches, the config."""
  config = folder_config(folder)
  first = data.open_source(config)
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(
      os.path.join(folder, 'train', 'cat', 'new.png')
  )
  second = data.open_source(config)
  assert first is not second and first.catalog is not second.catalog
  assert (first.info.num_train, second.info.num_train) == (18, 19)  # no stale listing
  one_pass(first, 'test', 4)
  assert first.is_cached('test') and not second.is_cached('test')
  config.augment = 'cifar'  # the source keeps the config it was opened with
  assert first.config.augment == 'none' and first.config.cache_budget_gib == 4.0
  with pytest.raises(AttributeError):
    first.config.augment = 'cifar'


def test_cache_budget_smaller_than_the_data(folder, caplog):
  """Over cache_budget_gib a split is decoded each pass: the same batches, new file contents."""
  cached = data.open_source(folder_config(folder))
  with caplog.at_level(logging.WARNING):
    tight = data.open_source(folder_config(folder, cache_budget_gib=1e-6))  # 1 KiB < 27 x 192 B
  assert 'over the 1e-06 GiB budget (config.dataset.cache_budget_gib)' in caplog.text
  before = one_pass(cached, 'test', 4)
  for got, want in zip(one_pass(tight, 'test', 4), before):
    np.testing.assert_array_equal(got, want)
  assert cached.is_cached('test') and not tight.is_cached('test')

  path = os.path.join(folder, 'test', 'cat', '0000.png')  # the first test image
  Image.fromarray(np.full((8, 8, 3), 255, np.uint8)).save(path)
  white = (1.0 - np.array(tight.info.mean)) / np.array(tight.info.std)
  np.testing.assert_allclose(one_pass(tight, 'test', 4)[0][0], np.broadcast_to(white, (8, 8, 3)))
  np.testing.assert_array_equal(one_pass(cached, 'test', 4)[0], before[0])  # cached: the old image
  assert not tight.is_cached('test')


# ----------------------------------------------------------------------------------------------
# A fixed, class-mixed subset and eval at indices.


@pytest.fixture
def four_classes(tmp_path):
  """Test split of 4 classes x 6 images, read in class order."""
  classes = ('ant', 'bee', 'cow', 'doe')
  return write_image_folder(tmp_path / 'four', classes, num_train=4, num_test=6, size=8)


def test_class_mixed_indices_cover_the_classes(four_classes):
  source = data.open_source(folder_config(four_classes))
  _, labels, _ = one_pass(source, 'test', 8)
  assert len(set(labels[:6])) == 1  # the first eval batch holds one class only
  for num_examples, counts in ((3, [1] * 3), (4, [1] * 4), (6, [2, 2, 1, 1]), (8, [2] * 4)):
    indices = data.class_mixed_indices(source, 'test', num_examples, seed=5)
    assert indices.dtype == np.int64 and len(indices) == len(set(indices)) == num_examples
    per_class = sorted(collections.Counter(labels[indices]).values(), reverse=True)
    assert per_class == counts, (num_examples, per_class)
    np.testing.assert_array_equal(
        indices, data.class_mixed_indices(source, 'test', num_examples, 5)
    )
  assert not np.array_equal(
      data.class_mixed_indices(source, 'test', 8, seed=5),
      data.class_mixed_indices(source, 'test', 8, seed=6),
  )
  everything = data.class_mixed_indices(source, 'test', 100, seed=0)  # min with the split's 24
  assert sorted(everything) == list(range(24))
  with pytest.raises(ValueError, match="split='train' is not an evaluation split"):
    data.class_mixed_indices(source, 'train', 8, seed=0)


@pytest.mark.parametrize('cache', [True, False])
def test_eval_at_indices_yields_those_examples(four_classes, cache, monkeypatch):
  source = data.open_source(folder_config(four_classes, cache=cache))
  images, labels, _ = one_pass(source, 'test', 8)
  indices = data.class_mixed_indices(source, 'test', 7, seed=1)
  assert not np.all(np.diff(indices) > 0)  # not sorted: the order given is kept
  got_images, got_labels, mask = one_pass(source, 'test', 3, indices=indices)
  np.testing.assert_array_equal(mask, [1] * 7 + [0] * 2)
  np.testing.assert_array_equal(got_images[:7], images[indices])
  np.testing.assert_array_equal(got_labels[:7], labels[indices])
  assert not got_images[7:].any() and not got_labels[7:].any()

  monkeypatch.setattr(iterators.jax, 'process_count', lambda: 2)
  shares = []
  for process in (0, 1):
    monkeypatch.setattr(iterators.jax, 'process_index', lambda process=process: process)
    shares.append(one_pass(source, 'test', 3, indices=indices))
  assert [len(share[2]) for share in shares] == [6, 6]  # both run the largest share's batches
  assert [share[2].sum() for share in shares] == [4, 3]
  np.testing.assert_array_equal(
      np.concatenate([shares[0][1][:4], shares[1][1][:3]]), labels[indices]
  )
  for bad in ([24], [-1], [], [[0, 1]], [0.5]):
    with pytest.raises(ValueError, match='indices'):
      next(data.eval_iterator(source, 'test', local_batch_size=3, indices=np.array(bad)))


def test_steps_per_epoch(folder):
  info = data.open_source(folder_config(folder)).info
  assert data.steps_per_epoch(info, 4) == 4
  with pytest.raises(ValueError, match='global batch size 32'):
    data.steps_per_epoch(info, 32)
