"""Input: TFDS or image-folder data as NumPy batches, augmented and normalised.

A caller opens the dataset once and passes the resolved `Source` around:

  source = data.open_source(config.dataset)      # checks the fields; source.info: DatasetInfo
  steps = data.steps_per_epoch(source.info, config.batch_size)
  train = data.train_iterator(source, local_batch_size=b, seed=config.seed, start_step=s)
  evals = data.eval_iterator(source, 'val', local_batch_size=b)
  subset = data.class_mixed_indices(source, 'val', 256, seed=0)  # for diagnostics (CKA)
  batch = next(data.eval_iterator(source, 'val', local_batch_size=256, indices=subset))

Modules: `sources` (open_source, Source, DatasetInfo, the checks of config.dataset),
`image_folder` and `tfds_source` (finding the data), `catalog` (the splits and their decoded
cache), `transforms` (decoding, augmentation, normalisation), `iterators` (the batches).

`config.dataset` (built by `ffkd_jax.defaults.dataset_config`) has these fields:

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
  cache         keep decoded uint8 images in memory (decoded once per Source, on a split's first
                use, before augmentation) where they fit in cache_budget_gib: image folders, and
                TFDS datasets with fixed-size images. Each process caches whole splits, so this is
                for small datasets.
  cache_budget_gib  > 0: the most GiB the decoded images of all splits together may take for
                `cache` to hold (an estimate from a sample of image sizes for image folders);
                over it, images are decoded each pass (image folders) or streamed (TFDS).
  shuffle_buffer  TFDS without the cache: examples (still encoded) in the shuffle buffer.
  prefetch      batches prepared ahead (-1: tf.data.AUTOTUNE).

Train batches are {'image': float32 (b, s, s, 3), 'label': int32 (b,)} (with_index=True adds
'index', int32 (b,): each example's position in the train split, whose labels
`train_labels(source)` gives in that order), the remainder of an epoch dropped; the stream is a pure function of (seed, start_step) (see `iterators`). Eval
batches add 'mask', float32 (b,): 1.0 on real rows, the last batch padded with zeros.
"""

import tensorflow as tf

try:  # tf.data only: leave every accelerator to JAX.
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:  # TF had already started its devices.
  pass

# pylint: disable=g-import-not-at-top,g-bad-import-order
from ffkd_jax.data.catalog import IMAGE_FOLDER
from ffkd_jax.data.image_folder import ARCHIVE_SUFFIXES, IMAGE_EXTENSIONS
from ffkd_jax.data.iterators import (
    check_example_index,
    class_mixed_indices,
    eval_iterator,
    steps_per_epoch,
    train_iterator,
    train_labels,
)
from ffkd_jax.data.sources import (
    BAD_IMAGE_POLICIES,
    DatasetInfo,
    EVAL_SPLITS,
    IMAGENET_MEAN_STD,
    MEAN_STD,
    Source,
    check_config,
    open_source,
)
from ffkd_jax.data.tfds_source import DatasetUnavailableError
from ffkd_jax.data.transforms import AUGMENTATIONS

__all__ = [
    'ARCHIVE_SUFFIXES',
    'AUGMENTATIONS',
    'BAD_IMAGE_POLICIES',
    'DatasetInfo',
    'DatasetUnavailableError',
    'EVAL_SPLITS',
    'IMAGE_EXTENSIONS',
    'IMAGE_FOLDER',
    'IMAGENET_MEAN_STD',
    'MEAN_STD',
    'Source',
    'check_config',
    'check_example_index',
    'class_mixed_indices',
    'eval_iterator',
    'open_source',
    'steps_per_epoch',
    'train_iterator',
    'train_labels',
]
