"""Image folders (train/<class>/*, test/<class>/*), or .tar.gz/.tgz/.tar archives of one."""

from __future__ import annotations

import os
import shutil
import tarfile

from absl import logging
import numpy as np
import tensorflow as tf

from ffkd_jax.data import transforms
from ffkd_jax.data.catalog import Catalog, IMAGE_FOLDER, Pixels, SMALL_IMAGE, Split

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp')
ARCHIVE_SUFFIXES = ('.tar.gz', '.tgz', '.tar')
_CARVE_SEED = 20240607  # the val carve-out never depends on the run's seed


def open_folder(
    path: str | None, val_fraction: float, on_bad_image: str, cache: bool, budget_bytes: float
) -> Catalog:
  """Lists an image folder (unpacking an archive once) and carves 'val' out of train.

  Takes config.dataset's path, val_fraction, on_bad_image and cache, and the cache budget in
  bytes. Returns its Catalog: class names sorted, train shuffled by a fixed seed (so process
  shards mix classes), val and test in class-then-file order. With on_bad_image='skip' every
  file is decoded here (kept, where cached) and the unreadable ones are left out.
  """
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
  if native is not None and native > SMALL_IMAGE:
    native = None
  num_files = len(train) + len(val) + len(test)
  estimate = num_files * 3 * np.mean([h * w for h, w in sample]) if sample else 0
  if cache and estimate > budget_bytes:
    logging.warning(
        'config.dataset.cache=True: the %d images of %s would take about %.1f GiB '
        'decoded, over the %s GiB budget (config.dataset.cache_budget_gib); decoding them each '
        'epoch instead.',
        num_files,
        path,
        estimate / 2**30,
        f'{budget_bytes / 2**30:.3g}',
    )
    cache = False

  splits = {}
  for split, pairs in examples.items():
    split_files = np.array([f for f, _ in pairs], dtype=str)
    labels = np.array([label for _, label in pairs], np.int32)
    pixels = None
    if on_bad_image == 'skip':
      images = decode_files(split_files, keep=cache)
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
        pixels = Pixels.from_list([image for image in images if image is not None])
    splits[split] = Split(len(labels), labels=labels, files=split_files, pixels=pixels)
  splits.setdefault('val', splits['test'])
  return Catalog(IMAGE_FOLDER, len(class_names), tuple(class_names), native, splits, cache)


def decode_split(split: Split) -> Pixels:
  """Takes a split of files; returns their decoded images, or raises naming an unreadable one."""
  images = decode_files(split.files)
  bad = [str(f) for f, image in zip(split.files, images) if image is None]
  if bad:
    raise bad_image_error(bad)
  return Pixels.from_list(images)


def decode_files(files: np.ndarray, keep: bool = True) -> list[np.ndarray | None]:
  """Decodes every file in parallel; None marks one that fails (an empty array if not keep)."""
  index = np.arange(len(files))
  ds = tf.data.Dataset.from_tensor_slices((files, index))
  ds = ds.map(
      lambda f, i: (transforms.decode(tf.io.read_file(f)), i), num_parallel_calls=tf.data.AUTOTUNE
  ).ignore_errors()
  images = [None] * len(files)
  for image, i in ds.as_numpy_iterator():
    images[i] = image if keep else np.zeros((0,), np.uint8)
  return images


def find_bad_file(files: np.ndarray) -> str | None:
  """Takes file names; returns the first that does not decode, or None."""
  bad = [str(f) for f, image in zip(files, decode_files(files, keep=False)) if image is None]
  return bad[0] if bad else None


def bad_image_error(bad: list[str]) -> ValueError:
  """The error for unreadable files under on_bad_image='error', naming the first of `bad`."""
  return ValueError(
      f"config.dataset.on_bad_image='error': cannot decode image file {bad[0]}"
      f'{f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""}; remove or '
      "replace it, or set config.dataset.on_bad_image='skip' to leave such files "
      'out.'
  )


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
