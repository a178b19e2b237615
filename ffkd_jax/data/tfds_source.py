"""TFDS image-classification datasets: looked up (or prepared), cached whole, or streamed."""

from __future__ import annotations

import difflib
import socket

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from ffkd_jax.data.catalog import Catalog, IMAGE_FOLDER, Pixels, SMALL_IMAGE, Split


class DatasetUnavailableError(RuntimeError):
  """A TFDS dataset is neither prepared in data_dir nor obtainable here."""


def open_tfds(
    name: str,
    data_dir: str | None,
    manual_dir: str | None,
    download: bool,
    val_fraction: float,
    cache: bool,
    budget_bytes: float,
) -> Catalog:
  """Finds (or downloads and prepares) a TFDS builder and lays out its splits.

  Takes config.dataset's name, data_dir, manual_dir, download, val_fraction and cache, and the
  cache budget in bytes. Returns its Catalog: 'val' is the tail of train where val_fraction > 0,
  else the `validation` split where there are both `validation` and `test`, else the test split.
  Caching stays on only for fixed-size images that fit the budget.
  """
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError:
    close = difflib.get_close_matches(name, tfds.list_builders(), n=3)
    raise ValueError(
        f'config.dataset.name={name!r} is not a TFDS builder. Valid: {IMAGE_FOLDER!r} (with '
        'config.dataset.path) or a TFDS image-classification builder such as cifar10, cifar100, '
        'caltech_birds2011, cars196, imagenet2012 (tfds.list_builders() lists them all)'
        + (f'; close names: {close}.' if close else '.')
    ) from None
  if not builder.is_prepared():
    if not (download or manual_dir):
      raise _unavailable_error(name, builder, 'config.dataset.download=False', probe=False)
    try:
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
      )
    except Exception as e:  # pylint: disable=broad-except
      raise _unavailable_error(
          name, builder, f'preparing it failed: {type(e).__name__}: ' f'{str(e)[:300]}'
      ) from e

  info = builder.info
  image_key, label_key = (
      info.supervised_keys
      if isinstance(info.supervised_keys, tuple) and len(info.supervised_keys) == 2
      else ('image', 'label')
  )
  features = dict(info.features.items())
  if not (
      isinstance(features.get(image_key), tfds.features.Image)
      and isinstance(features.get(label_key), tfds.features.ClassLabel)
  ):
    raise ValueError(
        f'config.dataset.name={name!r} is not an image-classification dataset (no '
        f'Image feature {image_key!r} with ClassLabel {label_key!r}); use such a '
        f'TFDS builder or {IMAGE_FOLDER!r}.'
    )

  available = set(info.splits.keys())  # empty under tfds.testing.mock_data: take the usual names
  test_split = 'validation' if 'test' not in available and 'validation' in available else 'test'
  n_train = _count(builder, 'train')
  splits = {'test': Split(_count(builder, test_split), tfds_split=test_split)}
  n_val = round(n_train * val_fraction)
  if n_val:
    splits['train'] = Split(n_train - n_val, tfds_split=f'train[:{n_train - n_val}]')
    splits['val'] = Split(n_val, tfds_split=f'train[{n_train - n_val}:]')
  else:
    splits['train'] = Split(n_train, tfds_split='train')
    if {'validation', 'test'} <= available:
      splits['val'] = Split(_count(builder, 'validation'), tfds_split='validation')
      logging.info("config.dataset.val_fraction=0: split 'val' is %s's validation split.", name)
    else:
      splits['val'] = splits['test']
      logging.info(
          "config.dataset.val_fraction=0: split 'val' is the %s split of %s.", test_split, name
      )

  shape = features[image_key].shape  # (h, w, c), None where images vary
  fixed = None not in shape[:2]
  native = shape[0] if fixed and shape[0] == shape[1] and shape[0] <= SMALL_IMAGE else None
  if cache:
    # Where 'val' is the test split it is counted twice, as it always has been.
    total = sum(s.num_examples for s in splits.values()) * (shape[0] * shape[1] * 3 if fixed else 0)
    if not fixed or total > budget_bytes:
      logging.info(
          'config.dataset.cache=True: %s is not cached (%s); streaming from TFDS.',
          name,
          (
              'images vary in size'
              if not fixed
              else f'{total / 2**30:.1f} GiB decoded, over config.dataset.cache_budget_gib='
              f'{budget_bytes / 2**30:.3g}'
          ),
      )
      cache = False
  names = features[label_key].names
  return Catalog(
      name,
      features[label_key].num_classes,
      tuple(names) if names else None,
      native,
      splits,
      cache,
      builder,
      (image_key, label_key),
  )


def load_split(catalog: Catalog, split: str) -> tuple[np.ndarray, Pixels]:
  """Takes a TFDS Catalog and a TFDS split string; returns int32 labels (n,), decoded Pixels."""
  image_key, label_key = catalog.keys
  images, labels = [], []
  for batch in catalog.builder.as_dataset(split=split).batch(4096).as_numpy_iterator():
    images.append(batch[image_key])
    labels.append(batch[label_key].astype(np.int32))
  images = np.concatenate(images)
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  return np.concatenate(labels), Pixels(dense=tf.constant(images))


def stream(
    catalog: Catalog,
    split: str,
    shuffle_seed: int | None,
    shuffle_buffer: int = 0,
    this_process: bool = True,
) -> tf.data.Dataset:
  """(encoded image, int32 label) of a TFDS split string, streamed.

  this_process: only this process's shard (tfds.split_for_jax_process), else the whole split.
  shuffle_seed None: stored order; else files and a shuffle_buffer-example buffer shuffled.
  """
  image_key, label_key = catalog.keys
  ds = catalog.builder.as_dataset(
      split=tfds.split_for_jax_process(split) if this_process else split,
      shuffle_files=shuffle_seed is not None,
      read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed),
      decoders={image_key: tfds.decode.SkipDecoding()},
  )
  ds = ds.map(lambda ex: (ex[image_key], tf.cast(ex[label_key], tf.int32)))
  if shuffle_seed is not None:
    ds = ds.shuffle(shuffle_buffer, seed=shuffle_seed)
  return ds


def _count(builder, split: str) -> int:
  if builder.info.splits.keys():
    if split not in builder.info.splits:
      raise ValueError(
          f'config.dataset.name={builder.name!r} has no {split!r} split (it has '
          f'{sorted(builder.info.splits.keys())}).'
      )
    return builder.info.splits[split].num_examples
  return int(builder.as_dataset(split=split).cardinality())  # splits unknown (mocked TFDS)


def _unavailable_error(name, builder, reason, probe=True) -> DatasetUnavailableError:
  offline = 'this machine appears offline, and ' if probe and not _online() else ''
  return DatasetUnavailableError(
      f'config.dataset.name={name!r}: {offline}the data is absent: it is not prepared under '
      f'{builder.data_dir} and could not be obtained ({reason}). Supply it one of three ways: '
      f'(1) config.dataset.data_dir=<a folder holding the prepared TFDS dataset {name}/<version>>; '
      '(2) config.dataset.manual_dir=<a folder holding its downloaded archives, prepared on first '
      f"use>; (3) config.dataset.name='{IMAGE_FOLDER}' with config.dataset.path=<a folder holding "
      'train/<class>/<image> and test/<class>/<image>>.'
  )


def _online() -> bool:
  try:
    socket.create_connection(('storage.googleapis.com', 443), timeout=3).close()
    return True
  except OSError:
    return False
