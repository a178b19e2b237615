"""Per-example tf ops: decoding, augmentation (cifar / imagenet / none), normalisation.

Every random op is stateless (`tf.random.stateless_*`) on a seed the caller passes, so the same
(image, seed) always gives the same output.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import tensorflow as tf

if TYPE_CHECKING:
  from ffkd_jax.data.sources import DatasetInfo

AUGMENTATIONS = ('cifar', 'imagenet', 'none')
_CIFAR_PADDING = 4
_EVAL_RESIZE = 256 / 224


def decode(encoded: tf.Tensor) -> tf.Tensor:
  """Takes encoded bytes; returns uint8 (h, w, 3), JPEGs decoded as PIL does (accurate DCT)."""
  image = tf.cond(
      tf.io.is_jpeg(encoded),
      lambda: tf.io.decode_jpeg(encoded, channels=3, dct_method='INTEGER_ACCURATE'),
      lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False),
  )
  image.set_shape([None, None, 3])
  return image


def resize_square(image: tf.Tensor, size: int) -> tf.Tensor:
  """Takes an image (h, w, 3); returns float32 (size, size, 3), untouched where already so."""
  image = tf.cast(image, tf.float32)
  if image.shape[0] == size and image.shape[1] == size:
    return image
  return tf.cond(
      tf.reduce_all(tf.shape(image)[:2] == size),
      lambda: image,
      lambda: tf.image.resize(image, [size, size], antialias=True),
  )


def cifar_train(image: tf.Tensor, seed: tf.Tensor, size: int) -> tf.Tensor:
  """Resize to size, zero-pad 4, random crop back to size, random horizontal flip; float32."""
  image = resize_square(image, size)
  pad = _CIFAR_PADDING
  image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])  # zeros: black, as torchvision pads
  u = tf.random.stateless_uniform([3], seed=seed)
  offset = tf.cast(tf.floor(u[:2] * (2 * pad + 1)), tf.int32)
  image = tf.slice(image, tf.concat([offset, [0]], 0), [size, size, 3])
  return tf.cond(u[2] < 0.5, lambda: tf.reverse(image, [1]), lambda: image)


def imagenet_train(image: tf.Tensor, seed: tf.Tensor, size: int) -> tf.Tensor:
  """Random-resized crop (scale 0.08-1, ratio 3/4-4/3) to (size, size), random flip; float32."""
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


def imagenet_eval(image: tf.Tensor, size: int) -> tf.Tensor:
  """Resize the short side to 256/224 of size, centre crop (size, size); float32."""
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = round(size * _EVAL_RESIZE) / tf.reduce_min(shape)
  new = tf.cast(tf.round(shape * scale), tf.int32)
  image = tf.image.resize(tf.cast(image, tf.float32), new, antialias=True)
  top, left = (new[0] - size) // 2, (new[1] - size) // 2
  return tf.slice(image, [top, left, 0], [size, size, 3])


def make_transform(augment: str, info: DatasetInfo, train: bool) -> Callable:
  """Takes config.dataset.augment (one of AUGMENTATIONS), a DatasetInfo and train/eval.

  Returns the per-example op (uint8 image (h, w, 3), int64 seed (2,)) -> float32 (s, s, 3),
  normalised by info.mean and info.std on the 0-1 scale, s = info.image_size. Eval ops ignore
  the seed.
  """
  size = info.image_size
  mean = tf.constant(info.mean, tf.float32)
  std = tf.constant(info.std, tf.float32)
  if train and augment == 'cifar':
    augmentation = lambda image, seed: cifar_train(image, seed, size)
  elif train and augment == 'imagenet':
    augmentation = lambda image, seed: imagenet_train(image, seed, size)
  elif augment == 'imagenet':
    augmentation = lambda image, seed: imagenet_eval(image, size)
  else:
    augmentation = lambda image, seed: resize_square(image, size)

  def transform(image, seed):
    image = augmentation(image, seed)
    image.set_shape([size, size, 3])
    return (image * (1 / 255) - mean) / std

  return transform
