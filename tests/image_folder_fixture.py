"""Tiny synthetic image folders (train/<class>/*, test/<class>/*) for input-pipeline tests."""

import itertools
import os

import numpy as np
from PIL import Image

from ffkd_jax import defaults  # a config is data: no TensorFlow imported here

CLASSES = ('cat', 'dog', 'emu')


def write_image_folder(
    root, classes=('cat', 'dog', 'emu'), num_train=6, num_test=3, size=8, fmt='png', seed=0
) -> str:
  """Writes distinct random RGB images; returns root. PNG is lossless, so pixels are known.

  size: a side, or a list of (height, width) taken in turn, for images of varied shapes.
  """
  rng = np.random.default_rng(seed)
  shapes = itertools.cycle([(size, size)] if isinstance(size, int) else size)
  for split, count in (('train', num_train), ('test', num_test)):
    for c in classes:
      folder = os.path.join(root, split, c)
      os.makedirs(folder, exist_ok=True)
      for k in range(count):
        pixels = rng.integers(0, 256, (*next(shapes), 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f'{k:04d}.{fmt}'))
  return str(root)


def read_images(root, split, classes, limit=None) -> tuple[np.ndarray, np.ndarray]:
  """uint8 (n, h, w, 3) and labels of a split, in sorted class-then-file order (PIL decoding)."""
  images, labels = [], []
  for label, c in enumerate(sorted(classes)):
    folder = os.path.join(root, split, c)
    for name in sorted(os.listdir(folder))[:limit]:
      images.append(np.asarray(Image.open(os.path.join(folder, name)).convert('RGB')))
      labels.append(label)
  return np.stack(images), np.array(labels)


def write_corrupt_file(path) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(b'this is not an image' * 8)
  return str(path)


def folder_config(path, **overrides):
  """config.dataset for the image folder at path: no augmentation, prefetch 1, then overrides."""
  config = defaults.dataset_config()
  config.name = 'image_folder'  # ffkd_jax.data.IMAGE_FOLDER
  config.path = str(path)
  config.augment = 'none'
  config.prefetch = 1
  config.update(overrides)
  return config
