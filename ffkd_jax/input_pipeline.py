"""Input pipeline: TFDS or image-folder data as NumPy batches, augmented and normalised.

The trainer calls four functions: `get_dataset_info`, `train_iterator`, `eval_iterator` and
`steps_per_epoch`. Each takes the `config.dataset` ConfigDict built by `ffkd_jax.defaults.dataset_config`:

  name          a TFDS image-classification builder (`cifar100`, `cifar10`, `caltech_birds2011`,
                `cars196`, `imagenet2012`, ...) or `image_folder`.
  path          image_folder only: a folder holding `train/<class>/*` and `test/<class>/*`
                (.jpg .jpeg .png .bmp). Class names are the sorted folder names of `train/`,
                labels index into them. Or a .tar.gz/.tgz/.tar archive of such a folder
                (e.g. ../shared/data/cifar10-jpeg.tar.gz): unpacked once into FFKD_DATA_CACHE
                (default ~/.cache/ffkd_jax) and read from there.
  data_dir      TFDS: folder of prepared datasets (None: TFDS's default, ~/tensorflow_datasets).
  manual_dir    TFDS: folder of downloaded archives for datasets prepared from them (imagenet2012).
  download      TFDS: download and prepare a dataset absent from data_dir (needs the internet).
  val_fraction  in [0, 1): fraction of train carved out as the 'val' split, the same for every
                run (image folder: per class, chosen by a fixed seed; TFDS: the tail of `train`,
                whose examples TFDS stores shuffled). 0: 'val' is the dataset's `validation` split
                where it has both `validation` and `test`; otherwise 'val' reads the test split
                (logged) and DatasetInfo.num_val is 0.
  image_size    side of the square images the model sees; 0: the images' own side for small
                square images (CIFAR: 32), 224 otherwise.
  augment       'cifar': zero-pad 4, random crop, horizontal flip (images first resized to
                image_size where they differ); 'imagenet': random-resized crop (scale 0.08-1,
                ratio 3/4-4/3) and flip for train, resize to 256/224 of image_size and centre crop
                for eval; 'none': the eval transform for train too.
  mean, std     per-channel normalisation on the 0-1 scale; None: CIFAR-10 or CIFAR-100 statistics
                for those TFDS names, ImageNet statistics otherwise (image folders included).
  on_bad_image  image_folder: 'error' raises naming an unreadable file; 'skip' decodes every file
                once up front and leaves out (and counts, with a warning) those that fail.
  cache         keep decoded uint8 images in memory (decoded once, before augmentation) where they
                fit in 4 GiB: image folders, and TFDS datasets with fixed-size images. Each
                process caches whole splits, so this is for small datasets.
  shuffle_buffer  TFDS without the cache: examples (still encoded) in the shuffle buffer.
  prefetch      batches prepared ahead (-1: tf.data.AUTOTUNE).

The train stream is a pure function of (seed, start_step): epoch e visits this process's shard in
an order drawn from (seed, e); each example's augmentation uses `tf.random.stateless_*` ops with a
seed folded from (seed, e, process index, example index); a run resumed at step s skips into
epoch s // steps_per_epoch without reading the skipped images. Every epoch yields exactly
`steps_per_epoch(info, local_batch_size * jax.process_count())` batches per process.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import itertools
import math
import os
import shutil
import socket
import tarfile
from collections.abc import Callable, Iterator

from absl import logging
import jax
import ml_collections
from ml_collections import config_dict
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

try:  # tf.data only: leave every accelerator to JAX.
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:  # TF had already started its devices.
  pass

IMAGE_FOLDER = 'image_folder'
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp')
AUGMENTATIONS = ('cifar', 'imagenet', 'none')
BAD_IMAGE_POLICIES = ('error', 'skip')
EVAL_SPLITS = ('val', 'test')
MEAN_STD = {
    'cifar10': ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    'cifar100': ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CACHE_BUDGET_BYTES = 4 * 2**30
_CARVE_SEED = 20240607  # the val carve-out never depends on the run's seed
_SMALL_IMAGE = 64  # square images up to this side train at their own size by default
_CIFAR_PADDING = 4
_EVAL_RESIZE = 256 / 224


class DatasetUnavailableError(RuntimeError):
  """A TFDS dataset is neither prepared in data_dir nor obtainable here."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str
  num_classes: int
  image_size: int
  num_train: int  # examples in the train split actually used (after carving validation)
  num_val: int  # 0 where there is no validation split: eval_iterator's 'val' then reads test
  num_test: int
  class_names: tuple[str, ...] | None
  mean: tuple
  std: tuple


# ----------------------------------------------------------------------------------------------
# Splits: where the examples of one split live, for all processes together.


@dataclasses.dataclass
class _Split:
  num_examples: int
  labels: np.ndarray | None = None  # (n,) int32; image folder, or TFDS once cached
  files: np.ndarray | None = None  # (n,) str: image folder
  tfds_split: str | None = None  # TFDS split string, e.g. 'train[:45000]'
  pixels: _Pixels | None = None  # decoded images once cached


@dataclasses.dataclass
class _Pixels:
  """Decoded uint8 images of one split: one dense tensor, or ragged (flat + offsets)."""

  dense: tf.Tensor | None = None  # (n, h, w, 3)
  flat: tf.Tensor | None = None  # (total,) every image raveled
  offsets: tf.Tensor | None = None  # (n + 1,)
  shapes: tf.Tensor | None = None  # (n, 3)

  @classmethod
  def from_list(cls, images: list[np.ndarray]) -> _Pixels:
    if not images:
      raise ValueError('no readable images to cache.')
    if len({image.shape for image in images}) == 1:
      return cls(dense=tf.constant(np.stack(images)))
    sizes = np.array([image.size for image in images], np.int64)
    return cls(
        flat=tf.constant(np.concatenate([image.reshape(-1) for image in images])),
        offsets=tf.constant(np.concatenate([[0], np.cumsum(sizes)])),
        shapes=tf.constant(np.array([image.shape for image in images], np.int32)),
    )

  def lookup(self, i):
    if self.dense is not None:
      return tf.gather(self.dense, i)
    return tf.reshape(self.flat[self.offsets[i] : self.offsets[i + 1]], self.shapes[i])


@dataclasses.dataclass
class _Source:
  name: str
  num_classes: int
  class_names: tuple[str, ...] | None
  native_size: int | None  # side of small square images, None for large or varied ones
  splits: dict[str, _Split]  # 'train', 'val', 'test'
  cache: bool
  builder: tfds.core.DatasetBuilder | None = None
  keys: tuple[str, str] = ('image', 'label')  # TFDS feature names

  def ensure_cached(self, split: str) -> _Split:
    """Decodes a split into memory on first use where `cache` holds."""
    s = self.splits[split]
    if self.cache and s.pixels is None:
      if s.files is not None:
        images = _decode_files(s.files)
        bad = [str(f) for f, image in zip(s.files, images) if image is None]
        if bad:
          raise _bad_image_error(bad)
        s.pixels = _Pixels.from_list(images)
      else:
        s.labels, s.pixels = _load_tfds_split(self, s.tfds_split)
    return s


def _config_key(config) -> tuple:
  path = os.path.abspath(config.path) if config.path else None
  return (
      config.name,
      path,
      config.data_dir,
      config.manual_dir,
      bool(config.download),
      float(config.val_fraction),
      config.on_bad_image,
      bool(config.cache),
  )


def _source(config) -> _Source:
  _check_config(config)
  return _make_source(*_config_key(config))


@functools.lru_cache(maxsize=8)
def _make_source(name, path, data_dir, manual_dir, download, val_fraction, on_bad_image, cache):
  if name == IMAGE_FOLDER:
    return _folder_source(path, val_fraction, on_bad_image, cache)
  return _tfds_source(name, data_dir, manual_dir, download, val_fraction, cache)


def _check_config(config) -> None:
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
  ]
  for field, ok, valid in checks:
    if not ok:
      raise ValueError(f'config.dataset.{field}={config[field]!r} is not valid: use {valid}.')


# ----------------------------------------------------------------------------------------------
# Image folders.


def _folder_source(path, val_fraction, on_bad_image, cache) -> _Source:
  layout = f'a folder holding train/<class>/<image> and test/<class>/<image> ({_exts()})'
  if not path:
    raise ValueError(
        f"config.dataset.path={path!r}: config.dataset.name='{IMAGE_FOLDER}' needs "
        f'config.dataset.path, {layout}.'
    )
  if os.path.isfile(path) and path.endswith(ARCHIVE_SUFFIXES):
    path = _unpacked(path)
  if not os.path.isdir(path):
    raise ValueError(
        f'config.dataset.path={path!r} is not a directory; it must be {layout}, '
        f'or a {"/".join(ARCHIVE_SUFFIXES)} archive of one.'
    )
  classes = {}
  for sub in ('train', 'test'):
    folder = os.path.join(path, sub)
    if not os.path.isdir(folder):
      raise ValueError(f'config.dataset.path={path!r} has no {sub}/ folder; it must be {layout}.')
    classes[sub] = sorted(
        e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith('.')
    )
    if not classes[sub]:
      raise ValueError(
          f'config.dataset.path={path!r}: {folder} has no class subfolders; it '
          f'must be {layout}.'
      )
  if classes['train'] != classes['test']:
    only_train = sorted(set(classes['train']) - set(classes['test']))
    only_test = sorted(set(classes['test']) - set(classes['train']))
    raise ValueError(
        f'config.dataset.path={path!r}: train/ and test/ hold different classes '
        f'(only in train/: {only_train}; only in test/: {only_test}); both must hold '
        'the same class folders.'
    )
  class_names = classes['train']
  files = {
      sub: [_list_images(path, os.path.join(path, sub, c)) for c in class_names]
      for sub in ('train', 'test')
  }

  rng = np.random.default_rng(_CARVE_SEED)
  train, val = [], []
  for label, class_files in enumerate(files['train']):
    n_val = min(round(len(class_files) * val_fraction), len(class_files) - 1)
    chosen = set(rng.permutation(len(class_files))[:n_val].tolist())
    for i, f in enumerate(class_files):
      (val if i in chosen else train).append((f, label))
  train = [train[i] for i in rng.permutation(len(train))]  # class-mixed process shards
  test = [(f, label) for label, class_files in enumerate(files['test']) for f in class_files]
  examples = {'train': train, 'val': val, 'test': test}
  if not val:
    logging.info(
        "config.dataset.val_fraction=%s carves out no examples: split 'val' is the test "
        'split of %s.',
        val_fraction,
        path,
    )
    del examples['val']

  sample = _sample_sizes([f for f, _ in train])
  native = sample[0][0] if len(set(sample)) == 1 and sample[0][0] == sample[0][1] else None
  if native is not None and native > _SMALL_IMAGE:
    native = None
  num_files = len(train) + len(val) + len(test)
  estimate = num_files * 3 * np.mean([h * w for h, w in sample]) if sample else 0
  if cache and estimate > CACHE_BUDGET_BYTES:
    logging.warning(
        'config.dataset.cache=True: the %d images of %s would take about %.1f GiB '
        'decoded, over the %.1f GiB budget; decoding them each epoch instead.',
        num_files,
        path,
        estimate / 2**30,
        CACHE_BUDGET_BYTES / 2**30,
    )
    cache = False

  splits = {}
  for split, pairs in examples.items():
    split_files = np.array([f for f, _ in pairs], dtype=str)
    labels = np.array([label for _, label in pairs], np.int32)
    pixels = None
    if on_bad_image == 'skip':
      images = _decode_files(split_files, keep=cache)
      ok = np.array([image is not None for image in images], bool)
      if not ok.all():
        bad = split_files[~ok]
        logging.warning(
            "config.dataset.on_bad_image='skip': skipped %d unreadable image files "
            'of %d in the %s split of %s, e.g. %s.',
            len(bad),
            len(ok),
            split,
            path,
            list(bad[:5]),
        )
      split_files, labels = split_files[ok], labels[ok]
      if cache:
        pixels = _Pixels.from_list([image for image in images if image is not None])
    splits[split] = _Split(len(labels), labels=labels, files=split_files, pixels=pixels)
  splits.setdefault('val', splits['test'])
  return _Source(IMAGE_FOLDER, len(class_names), tuple(class_names), native, splits, cache)


ARCHIVE_SUFFIXES = ('.tar.gz', '.tgz', '.tar')


def _unpacked(archive: str) -> str:
  """Unpacks an image-folder archive once, into FFKD_DATA_CACHE (default ~/.cache/ffkd_jax).

  The archive holds train/ and test/, at its top level or inside a single top-level folder.
  Returns that folder. A finished unpack is marked, so an interrupted one is redone.
  """
  stat = os.stat(archive)
  key = f'{os.path.basename(archive)}-{stat.st_size}-{int(stat.st_mtime)}'
  cache_root = os.environ.get(
      'FFKD_DATA_CACHE', os.path.join(os.path.expanduser('~'), '.cache', 'ffkd_jax')
  )
  target = os.path.join(cache_root, key)
  done = os.path.join(target, '.unpacked')
  if not os.path.exists(done):
    logging.info('Unpacking %s into %s (once).', archive, target)
    partial = f'{target}.partial-{os.getpid()}'
    os.makedirs(partial, exist_ok=True)
    with tarfile.open(archive) as tar:
      tar.extractall(partial, filter='data')
    if os.path.exists(target):
      shutil.rmtree(target)
    os.replace(partial, target)
    open(done, 'w', encoding='utf-8').close()
  if os.path.isdir(os.path.join(target, 'train')):
    return target
  subdirs = [e.path for e in os.scandir(target) if e.is_dir()]
  return subdirs[0] if len(subdirs) == 1 else target


def _exts() -> str:
  return ' '.join(IMAGE_EXTENSIONS)


def _list_images(path, folder) -> list[str]:
  images = sorted(
      os.path.join(folder, e.name)
      for e in os.scandir(folder)
      if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)
  )
  if not images:
    raise ValueError(
        f'config.dataset.path={path!r}: class folder {folder} holds no images '
        f'(valid extensions: {_exts()}).'
    )
  return images


def _sample_sizes(files: list[str], count: int = 32) -> list[tuple[int, int]]:
  """(height, width) of a few images, read from their headers."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  sizes = []
  for f in files[:: max(1, len(files) // count)][:count]:
    try:
      with Image.open(f) as image:
        sizes.append((image.height, image.width))
    except Exception:  # pylint: disable=broad-except; a bad file is reported when decoded
      pass
  return sizes


def _decode_files(files: np.ndarray, keep: bool = True) -> list[np.ndarray | None]:
  """Decodes every file in parallel; None marks one that fails (an empty array if not keep)."""
  index = np.arange(len(files))
  ds = tf.data.Dataset.from_tensor_slices((files, index))
  ds = ds.map(
      lambda f, i: (_decode(tf.io.read_file(f)), i), num_parallel_calls=tf.data.AUTOTUNE
  ).ignore_errors()
  images = [None] * len(files)
  for image, i in ds.as_numpy_iterator():
    images[i] = image if keep else np.zeros((0,), np.uint8)
  return images


def _bad_image_error(bad: list[str]) -> ValueError:
  return ValueError(
      f"config.dataset.on_bad_image='error': cannot decode image file {bad[0]}"
      f'{f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""}; remove or '
      "replace it, or set config.dataset.on_bad_image='skip' to leave such files "
      'out.'
  )


# ----------------------------------------------------------------------------------------------
# TFDS.


def _tfds_source(name, data_dir, manual_dir, download, val_fraction, cache) -> _Source:
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
  splits = {'test': _Split(_count(builder, test_split), tfds_split=test_split)}
  n_val = round(n_train * val_fraction)
  if n_val:
    splits['train'] = _Split(n_train - n_val, tfds_split=f'train[:{n_train - n_val}]')
    splits['val'] = _Split(n_val, tfds_split=f'train[{n_train - n_val}:]')
  else:
    splits['train'] = _Split(n_train, tfds_split='train')
    if {'validation', 'test'} <= available:
      splits['val'] = _Split(_count(builder, 'validation'), tfds_split='validation')
      logging.info("config.dataset.val_fraction=0: split 'val' is %s's validation split.", name)
    else:
      splits['val'] = splits['test']
      logging.info(
          "config.dataset.val_fraction=0: split 'val' is the %s split of %s.", test_split, name
      )

  shape = features[image_key].shape  # (h, w, c), None where images vary
  fixed = None not in shape[:2]
  native = shape[0] if fixed and shape[0] == shape[1] and shape[0] <= _SMALL_IMAGE else None
  if cache:
    total = sum(s.num_examples for s in splits.values()) * (shape[0] * shape[1] * 3 if fixed else 0)
    if not fixed or total > CACHE_BUDGET_BYTES:
      logging.info(
          'config.dataset.cache=True: %s is not cached (%s); streaming from TFDS.',
          name,
          'images vary in size' if not fixed else f'{total / 2**30:.1f} GiB decoded',
      )
      cache = False
  names = features[label_key].names
  return _Source(
      name,
      features[label_key].num_classes,
      tuple(names) if names else None,
      native,
      splits,
      cache,
      builder,
      (image_key, label_key),
  )


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


def _load_tfds_split(source: _Source, split: str) -> tuple[np.ndarray, _Pixels]:
  image_key, label_key = source.keys
  images, labels = [], []
  for batch in source.builder.as_dataset(split=split).batch(4096).as_numpy_iterator():
    images.append(batch[image_key])
    labels.append(batch[label_key].astype(np.int32))
  images = np.concatenate(images)
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  return np.concatenate(labels), _Pixels(dense=tf.constant(images))


def _tfds_examples(
    source: _Source, split: str, shuffle_seed: int | None, shuffle_buffer: int = 0
) -> tf.data.Dataset:
  """(encoded image, label) of this process's shard of a TFDS split, streamed."""
  image_key, label_key = source.keys
  ds = source.builder.as_dataset(
      split=tfds.split_for_jax_process(split),
      shuffle_files=shuffle_seed is not None,
      read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed),
      decoders={image_key: tfds.decode.SkipDecoding()},
  )
  ds = ds.map(lambda ex: (ex[image_key], tf.cast(ex[label_key], tf.int32)))
  if shuffle_seed is not None:
    ds = ds.shuffle(shuffle_buffer, seed=shuffle_seed)
  return ds


# ----------------------------------------------------------------------------------------------
# Decoding, augmentation, normalisation (per example, tf).


def _decode(encoded: tf.Tensor) -> tf.Tensor:
  """uint8 (h, w, 3); JPEGs decoded as PIL does (accurate DCT)."""
  image = tf.cond(
      tf.io.is_jpeg(encoded),
      lambda: tf.io.decode_jpeg(encoded, channels=3, dct_method='INTEGER_ACCURATE'),
      lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False),
  )
  image.set_shape([None, None, 3])
  return image


def _resize_square(image: tf.Tensor, size: int) -> tf.Tensor:
  """float32 (size, size, 3), untouched where the image already has that shape."""
  image = tf.cast(image, tf.float32)
  if image.shape[0] == size and image.shape[1] == size:
    return image
  return tf.cond(
      tf.reduce_all(tf.shape(image)[:2] == size),
      lambda: image,
      lambda: tf.image.resize(image, [size, size], antialias=True),
  )


def _cifar_train(image, seed, size):
  image = _resize_square(image, size)
  pad = _CIFAR_PADDING
  image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])  # zeros: black, as torchvision pads
  u = tf.random.stateless_uniform([3], seed=seed)
  offset = tf.cast(tf.floor(u[:2] * (2 * pad + 1)), tf.int32)
  image = tf.slice(image, tf.concat([offset, [0]], 0), [size, size, 3])
  return tf.cond(u[2] < 0.5, lambda: tf.reverse(image, [1]), lambda: image)


def _imagenet_train(image, seed, size):
  seeds = tf.random.experimental.stateless_split(seed, 2)
  begin, crop, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image),
      bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
      seed=seeds[0],
      min_object_covered=0.0,
      aspect_ratio_range=(3 / 4, 4 / 3),
      area_range=(0.08, 1.0),
      max_attempts=10,
      use_image_if_no_bounding_boxes=True,
  )
  image = tf.slice(image, begin, crop)
  image = tf.image.resize(tf.cast(image, tf.float32), [size, size], antialias=True)
  flip = tf.random.stateless_uniform([], seed=seeds[1]) < 0.5
  return tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)


def _imagenet_eval(image, size):
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = round(size * _EVAL_RESIZE) / tf.reduce_min(shape)
  new = tf.cast(tf.round(shape * scale), tf.int32)
  image = tf.image.resize(tf.cast(image, tf.float32), new, antialias=True)
  top, left = (new[0] - size) // 2, (new[1] - size) // 2
  return tf.slice(image, [top, left, 0], [size, size, 3])


def _transform(config, info: DatasetInfo, train: bool) -> Callable:
  """(uint8 image, seed) -> float32 (s, s, 3) normalised."""
  size = info.image_size
  mean = tf.constant(info.mean, tf.float32)
  std = tf.constant(info.std, tf.float32)
  if train and config.augment == 'cifar':
    augment = lambda image, seed: _cifar_train(image, seed, size)
  elif train and config.augment == 'imagenet':
    augment = lambda image, seed: _imagenet_train(image, seed, size)
  elif config.augment == 'imagenet':
    augment = lambda image, seed: _imagenet_eval(image, size)
  else:
    augment = lambda image, seed: _resize_square(image, size)

  def transform(image, seed):
    image = augment(image, seed)
    image.set_shape([size, size, 3])
    return (image * (1 / 255) - mean) / std

  return transform


# ----------------------------------------------------------------------------------------------
# The public API.


def get_dataset_info(dataset_config) -> DatasetInfo:
  source = _source(dataset_config)
  mean, std = MEAN_STD.get(source.name.split(':')[0], IMAGENET_MEAN_STD)
  val_is_test = source.splits['val'] is source.splits['test']
  return DatasetInfo(
      name=source.name,
      num_classes=source.num_classes,
      image_size=dataset_config.image_size or source.native_size or 224,
      num_train=source.splits['train'].num_examples,
      num_val=0 if val_is_test else source.splits['val'].num_examples,
      num_test=source.splits['test'].num_examples,
      class_names=source.class_names,
      mean=tuple(float(m) for m in (dataset_config.mean or mean)),
      std=tuple(float(s) for s in (dataset_config.std or std)),
  )


def steps_per_epoch(info: DatasetInfo, global_batch_size: int) -> int:
  steps = info.num_train // global_batch_size if global_batch_size > 0 else 0
  if steps == 0:
    raise ValueError(
        f'global batch size {global_batch_size} is not in 1..{info.num_train}, the '
        f'number of training examples of {info.name}; lower the batch size.'
    )
  return steps


def train_iterator(
    dataset_config, *, local_batch_size: int, seed: int, start_step: int = 0
) -> Iterator[dict[str, np.ndarray]]:
  """Endless {'image': float32 (b, s, s, 3), 'label': int32 (b,)} for this process."""
  info = get_dataset_info(dataset_config)
  source = _source(dataset_config)
  split = source.ensure_cached('train')
  process, num_processes = jax.process_index(), jax.process_count()
  steps = steps_per_epoch(info, local_batch_size * num_processes)
  if start_step < 0:
    raise ValueError(f'start_step={start_step} must be >= 0.')
  first_epoch, skip_steps = divmod(start_step, steps)
  transform = _transform(dataset_config, info, train=True)
  start, stop = _shard(split.num_examples, process, num_processes)
  per_epoch = steps * local_batch_size
  seed = int(seed) % 2**63

  def epoch_examples(epoch: int, skip: int) -> tuple[tf.data.Dataset, np.ndarray | None]:
    """This epoch's (float32 image, label) after `skip` examples, and their local indices."""
    aug_seed = tf.constant(_seed_words(seed, epoch, process, 1), tf.int64)
    if split.files is None and split.pixels is None:  # streamed TFDS
      ds = _tfds_examples(
          source,
          split.tfds_split,
          int(_seed_words(seed, epoch, process, 0)[0]),
          dataset_config.shuffle_buffer,
      )
      ds = ds.take(per_epoch).enumerate().skip(skip)
      fn = lambda pos, ex: (transform(_decode(ex[0]), _fold(aug_seed, pos)), ex[1])
      return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE), None
    rng = np.random.default_rng(_seed_words(seed, epoch, process, 0))
    order = rng.permutation(stop - start)[:per_epoch][skip:]
    image_of = _image_lookup(split, start)
    labels = tf.constant(split.labels[start:stop])
    fn = lambda i: (transform(image_of(i), _fold(aug_seed, i)), labels[i])
    ds = tf.data.Dataset.from_tensor_slices(order.astype(np.int64))
    return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE), order

  def batches():
    skip = skip_steps * local_batch_size
    for epoch in itertools.count(first_epoch):
      ds, order = epoch_examples(epoch, skip)
      ds = ds.batch(local_batch_size, drop_remainder=True)
      bad_file = None
      if split.pixels is None and split.files is not None:
        bad_file = lambda k, order=order: _find_bad_file(
            split.files[start + order[k * local_batch_size : (k + 1) * local_batch_size]]
        )
      for image, label in _numpy(ds, dataset_config.prefetch, bad_file):
        yield {'image': image, 'label': label}
      skip = 0

  return batches()


def eval_iterator(
    dataset_config, split: str, *, local_batch_size: int
) -> Iterator[dict[str, np.ndarray]]:
  """One pass of {'image', 'label', 'mask'}; the last batch padded, mask 1.0 on real rows."""
  if split not in EVAL_SPLITS:
    raise ValueError(f'split={split!r} is not an evaluation split; use one of {EVAL_SPLITS}.')
  info = get_dataset_info(dataset_config)
  source = _source(dataset_config)
  data = source.ensure_cached(split)
  process, num_processes = jax.process_index(), jax.process_count()
  transform = _transform(dataset_config, info, train=False)
  no_seed = tf.zeros([2], tf.int64)
  bad_file = None
  if data.files is None and data.pixels is None:  # streamed TFDS
    ds = _tfds_examples(source, data.tfds_split, shuffle_seed=None)
    ds = ds.map(
        lambda image, label: (transform(_decode(image), no_seed), label),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
  else:
    start, stop = _shard(data.num_examples, process, num_processes)
    image_of = _image_lookup(data, start)
    labels = tf.constant(data.labels[start:stop])
    ds = tf.data.Dataset.range(stop - start).map(
        lambda i: (transform(image_of(i), no_seed), labels[i]), num_parallel_calls=tf.data.AUTOTUNE
    )
    if data.pixels is None:
      bad_file = lambda k: _find_bad_file(
          data.files[start + k * local_batch_size : start + (k + 1) * local_batch_size]
      )
  ds = ds.batch(local_batch_size)
  # Every process runs as many batches as the largest shard needs.
  num_batches = math.ceil(math.ceil(data.num_examples / num_processes) / local_batch_size)
  size = info.image_size

  def batches():
    count = 0
    for image, label in _numpy(ds, dataset_config.prefetch, bad_file):
      yield _pad(image, label, local_batch_size)
      count += 1
    empty = (np.zeros((0, size, size, 3), np.float32), np.zeros((0,), np.int32))
    for _ in range(count, num_batches if num_processes > 1 else count):
      yield _pad(*empty, local_batch_size)

  return batches()


# ----------------------------------------------------------------------------------------------
# Helpers of the iterators.


def _shard(n: int, process: int, num_processes: int) -> tuple[int, int]:
  """[start, stop) of this process's contiguous, near-even share of n examples."""
  sizes = [n // num_processes + (p < n % num_processes) for p in range(num_processes)]
  start = sum(sizes[:process])
  return start, start + sizes[process]


def _seed_words(seed: int, epoch: int, process: int, purpose: int) -> np.ndarray:
  return np.random.SeedSequence([seed, epoch, process, purpose]).generate_state(2, np.uint32)


def _fold(seed: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
  return tf.random.experimental.stateless_fold_in(seed, tf.cast(index, tf.int64))


def _image_lookup(split: _Split, start: int) -> Callable:
  """local index -> uint8 (h, w, 3), from the cache or from the file."""
  if split.pixels is not None:
    return lambda i: split.pixels.lookup(start + i)
  files = tf.constant(split.files[start:])
  return lambda i: _decode(tf.io.read_file(files[i]))


def _find_bad_file(files: np.ndarray) -> str | None:
  bad = [str(f) for f, image in zip(files, _decode_files(files, keep=False)) if image is None]
  return bad[0] if bad else None


def _numpy(ds: tf.data.Dataset, prefetch: int, bad_file: Callable | None) -> Iterator:
  """The batches as NumPy; a decoding failure names its file where files are read."""
  options = tf.data.Options()
  options.deterministic = True
  ds = ds.with_options(options)
  if prefetch:
    ds = ds.prefetch(prefetch)
  iterator = ds.as_numpy_iterator()
  for k in itertools.count():
    try:
      batch = next(iterator)
    except StopIteration:
      return
    except tf.errors.OpError as e:  # e.g. InvalidArgumentError from a decoder
      culprit = bad_file(k) if bad_file else None
      if culprit is None:
        raise
      raise _bad_image_error([culprit]) from e
    yield batch


def _pad(image: np.ndarray, label: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
  n = len(label)
  mask = np.zeros((batch_size,), np.float32)
  mask[:n] = 1.0
  if n < batch_size:
    image = np.concatenate([image, np.zeros((batch_size - n, *image.shape[1:]), image.dtype)])
    label = np.concatenate([label, np.zeros((batch_size - n,), label.dtype)])
  return {'image': image, 'label': label.astype(np.int32), 'mask': mask}
