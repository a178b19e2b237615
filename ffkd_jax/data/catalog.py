"""What a dataset holds once found: its classes and, per split, where the examples live.

`image_folder.open_folder` and `tfds_source.open_tfds` each return a `Catalog`; `sources.Source`
wraps one and fills the splits' decoded-uint8 cache (`Pixels`) on first use.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

IMAGE_FOLDER = 'image_folder'  # config.dataset.name of image folders
SMALL_IMAGE = 64  # square images up to this side train at their own size by default


@dataclasses.dataclass
class Pixels:
  """Decoded uint8 images of one split: one dense tensor, or ragged (flat + offsets)."""

  dense: tf.Tensor | None = None  # (n, h, w, 3)
  flat: tf.Tensor | None = None  # (total,) every image raveled
  offsets: tf.Tensor | None = None  # (n + 1,)
  shapes: tf.Tensor | None = None  # (n, 3)

  @classmethod
  def from_list(cls, images: list[np.ndarray]) -> Pixels:
    """Takes uint8 (h, w, 3) images; returns them dense where all shapes agree, else ragged."""
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
    """Takes an int64 index tensor; returns that image, uint8 (h, w, 3)."""
    if self.dense is not None:
      return tf.gather(self.dense, i)
    return tf.reshape(self.flat[self.offsets[i] : self.offsets[i + 1]], self.shapes[i])


@dataclasses.dataclass
class Split:
  """Where the examples of one split live, for all processes together."""

  num_examples: int
  labels: np.ndarray | None = None  # (n,) int32; image folder, or TFDS once cached
  files: np.ndarray | None = None  # (n,) str: image folder
  tfds_split: str | None = None  # TFDS split string, e.g. 'train[:45000]'
  pixels: Pixels | None = None  # decoded images once cached

  @property
  def streamed(self) -> bool:
    """True for a TFDS split read from TFDS each pass (no files, nothing cached)."""
    return self.files is None and self.pixels is None


@dataclasses.dataclass
class Catalog:
  """A dataset found on disk or in TFDS, before anything is decoded (but 'skip' checks)."""

  name: str
  num_classes: int
  class_names: tuple[str, ...] | None
  native_size: int | None  # side of small square images, None for large or varied ones
  splits: dict[str, Split]  # 'train', 'val', 'test'; 'val' is the 'test' object where absent
  cache: bool  # config.dataset.cache, and the decoded splits fit in the budget
  builder: tfds.core.DatasetBuilder | None = None
  keys: tuple[str, str] = ('image', 'label')  # TFDS feature names

  @property
  def val_is_test(self) -> bool:
    return self.splits['val'] is self.splits['test']
