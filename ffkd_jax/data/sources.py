"""A dataset opened once from `config.dataset`: `open_source(dataset_config) -> Source`.

There is no module-level cache: a caller opens a source once and passes it to the iterators.
Image folders are read by `image_folder`, TFDS builders by `tfds_source`; both give a `Catalog`
that the `Source` wraps together with its `DatasetInfo` and a frozen copy of the config.
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections

from ffkd_jax.data import image_folder
from ffkd_jax.data import tfds_source
from ffkd_jax.data.catalog import Catalog, IMAGE_FOLDER, Split
from ffkd_jax.data.transforms import AUGMENTATIONS

BAD_IMAGE_POLICIES = ('error', 'skip')
EVAL_SPLITS = ('val', 'test')
MEAN_STD = {
    'cifar10': ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    'cifar100': ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a model and a schedule need to know of a dataset."""

  name: str
  num_classes: int
  image_size: int
  num_train: int  # examples in the train split actually used (after carving validation)
  num_val: int  # 0 where there is no validation split: eval_iterator's 'val' then reads test
  num_test: int
  class_names: tuple[str, ...] | None
  mean: tuple
  std: tuple


@dataclasses.dataclass(frozen=True, eq=False)
class Source:
  """A resolved dataset: what it is (`info`), how it was asked for (`config`), where it lives.

  info     the DatasetInfo (classes, image size, split sizes, normalisation).
  config   a frozen copy (ml_collections.FrozenConfigDict) of the config.dataset it was opened
           with; the iterators read augment, shuffle_buffer and prefetch from it.
  catalog  the splits; the source decodes a split into its own uint8 cache on first use, where
           config.dataset.cache holds and the dataset fits config.dataset.cache_budget_gib.
  """

  info: DatasetInfo
  config: ml_collections.FrozenConfigDict
  catalog: Catalog

  def split(self, name: str) -> Split:
    """Takes 'train', 'val' or 'test'; returns that Split, decoded into the cache if it caches."""
    split = self.catalog.splits[name]
    if self.catalog.cache and split.pixels is None:
      if split.files is not None:
        split.pixels = image_folder.decode_split(split)
      else:
        split.labels, split.pixels = tfds_source.load_split(self.catalog, split.tfds_split)
    return split

  def is_cached(self, name: str) -> bool:
    """Takes a split name; returns whether its decoded images are held in memory now."""
    return self.catalog.splits[name].pixels is not None


def open_source(dataset_config: ml_collections.ConfigDict) -> Source:
  """Takes config.dataset (ffkd_jax.defaults.dataset_config's fields); returns its Source.

  Checks the fields, lists the image folder or looks up the TFDS builder (preparing it where
  allowed), and decides whether the splits are cached; nothing else is decoded yet (except under
  on_bad_image='skip'). Raises ValueError naming a bad field, DatasetUnavailableError where a TFDS
  dataset is absent and cannot be obtained.
  """
  check_config(dataset_config)
  config = ml_collections.FrozenConfigDict(dataset_config)
  budget_bytes = float(config.cache_budget_gib) * 2**30
  if config.name == IMAGE_FOLDER:
    catalog = image_folder.open_folder(
        config.path,
        float(config.val_fraction),
        config.on_bad_image,
        bool(config.cache),
        budget_bytes,
    )
  else:
    catalog = tfds_source.open_tfds(
        config.name,
        config.data_dir,
        config.manual_dir,
        bool(config.download),
        float(config.val_fraction),
        bool(config.cache),
        budget_bytes,
    )
  return Source(_dataset_info(config, catalog), config, catalog)


def check_config(dataset_config) -> None:
  """Raises ValueError naming the first field of config.dataset whose value is not valid."""
  config = dataset_config
  checks = [
      ('augment', config.augment in AUGMENTATIONS, f'one of {AUGMENTATIONS}'),
      ('on_bad_image', config.on_bad_image in BAD_IMAGE_POLICIES, f'one of {BAD_IMAGE_POLICIES}'),
      ('val_fraction', 0 <= config.val_fraction < 1, 'a fraction in [0, 1)'),
      ('image_size', config.image_size >= 0, '0 (the dataset default) or a positive side'),
      ('shuffle_buffer', config.shuffle_buffer >= 1, 'a positive number of examples'),
      ('prefetch', config.prefetch >= -1, 'a number of batches, or -1 for tf.data.AUTOTUNE'),
      ('mean', config.mean is None or len(config.mean) == 3, 'None or 3 per-channel values'),
      (
          'std',
          config.std is None or (len(config.std) == 3 and min(config.std) > 0),
          'None or 3 positive per-channel values',
      ),
      ('cache_budget_gib', _positive(config.cache_budget_gib), 'a number of GiB > 0'),
  ]
  for field, ok, valid in checks:
    if not ok:
      raise ValueError(f'config.dataset.{field}={config[field]!r} is not valid: use {valid}.')


def _positive(value) -> bool:
  """A number > 0, not NaN (inf allowed: no budget)."""
  try:
    return value > 0 and not math.isnan(value)
  except TypeError:
    return False


def _dataset_info(config, catalog: Catalog) -> DatasetInfo:
  mean, std = MEAN_STD.get(catalog.name.split(':')[0], IMAGENET_MEAN_STD)
  return DatasetInfo(
      name=catalog.name,
      num_classes=catalog.num_classes,
      image_size=config.image_size or catalog.native_size or 224,
      num_train=catalog.splits['train'].num_examples,
      num_val=0 if catalog.val_is_test else catalog.splits['val'].num_examples,
      num_test=catalog.splits['test'].num_examples,
      class_names=catalog.class_names,
      mean=tuple(float(m) for m in (config.mean or mean)),
      std=tuple(float(s) for s in (config.std or std)),
  )
