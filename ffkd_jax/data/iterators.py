"""NumPy batches of a Source for this process: the train stream, eval passes, a mixed subset.

The train stream is a pure function of (seed, start_step): epoch e visits this process's shard in
an order drawn from (seed, e); each example's augmentation uses `tf.random.stateless_*` ops with a
seed folded from (seed, e, process index, example index); a run resumed at step s skips into
epoch s // steps_per_epoch without reading the skipped images. Every epoch yields exactly
`steps_per_epoch(info, local_batch_size * jax.process_count())` batches per process.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
import itertools
import math

import jax
import numpy as np
import tensorflow as tf

from ffkd_jax.data import image_folder
from ffkd_jax.data import tfds_source
from ffkd_jax.data import transforms
from ffkd_jax.data.catalog import Catalog, Split
from ffkd_jax.data.sources import DatasetInfo, EVAL_SPLITS, Source


def steps_per_epoch(info: DatasetInfo, global_batch_size: int) -> int:
  """Takes a DatasetInfo and the global batch; returns full batches an epoch (remainder dropped)."""
  steps = info.num_train // global_batch_size if global_batch_size > 0 else 0
  if steps == 0:
    raise ValueError(
        f'global batch size {global_batch_size} is not in 1..{info.num_train}, the '
        f'number of training examples of {info.name}; lower the batch size.'
    )
  return steps


def train_iterator(
    source: Source,
    *,
    local_batch_size: int,
    seed: int,
    start_step: int = 0,
    stream: int = 0,
    with_index: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
  """Endless {'image': float32 (b, s, s, 3), 'label': int32 (b,)} for this process.

  Takes the Source, this process's batch size b, the run's seed, the step to start at and the
  stream: stream 0 is the run's train stream; stream k > 0 is another one, as deterministic and
  as resumable, with its own epoch orders and augmentations (drawn from (seed, k)) over the same
  examples (FFKD's feedback batches). with_index adds 'index', int32 (b,): each example's
  position in the train split (0..num_train - 1, the order of `train_labels`), for methods with
  a memory of the train set (CRD); a streamed TFDS split has no such positions (ValueError).
  The train split is decoded into the source's cache now, where it caches.
  """
  info, config = source.info, source.config
  split = source.split('train')
  process, num_processes = jax.process_index(), jax.process_count()
  steps = steps_per_epoch(info, local_batch_size * num_processes)
  if start_step < 0:
    raise ValueError(f'start_step={start_step} must be >= 0.')
  first_epoch, skip_steps = divmod(start_step, steps)
  transform = transforms.make_transform(config.augment, info, train=True)
  start, stop = _shard(split.num_examples, process, num_processes)
  per_epoch = steps * local_batch_size
  seed = int(seed) % 2**63
  if stream < 0:
    raise ValueError(f'stream={stream} must be >= 0.')
  words = lambda epoch, purpose: _seed_words(seed, epoch, process, purpose, stream)
  if with_index:
    check_example_index(source)

  def epoch_examples(epoch: int, skip: int) -> tuple[tf.data.Dataset, np.ndarray | None]:
    """This epoch's (float32 image, label) after `skip` examples, and their local indices."""
    aug_seed = tf.constant(words(epoch, 1), tf.int64)
    if split.streamed:
      ds = tfds_source.stream(
          source.catalog,
          split.tfds_split,
          int(words(epoch, 0)[0]),
          config.shuffle_buffer,
      )
      ds = ds.take(per_epoch).enumerate().skip(skip)
      fn = lambda pos, ex: (transform(transforms.decode(ex[0]), _fold(aug_seed, pos)), ex[1])
      return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE), None
    rng = np.random.default_rng(words(epoch, 0))
    order = rng.permutation(stop - start)[:per_epoch][skip:]
    image_of = _image_lookup(split, start)
    labels = tf.constant(split.labels[start:stop])
    if with_index:
      fn = lambda i: (
          transform(image_of(i), _fold(aug_seed, i)),
          labels[i],
          tf.cast(i + start, tf.int32),
      )
    else:
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
        bad_file = lambda k, order=order: image_folder.find_bad_file(
            split.files[start + order[k * local_batch_size : (k + 1) * local_batch_size]]
        )
      for example in _numpy(ds, config.prefetch, bad_file):
        yield dict(zip(('image', 'label', 'index'), example))
      skip = 0

  return batches()


def eval_iterator(
    source: Source, split: str, *, local_batch_size: int, indices: np.ndarray | None = None
) -> Iterator[dict[str, np.ndarray]]:
  """One pass of {'image', 'label', 'mask'}; the last batch padded, mask 1.0 on real rows.

  Takes the Source, 'val' or 'test', this process's batch size, and optionally `indices`: global
  indices into the split (the same array on every process, any order, e.g. from
  class_mixed_indices). Without them the whole split is read in stored order; with them only those
  examples, in the order given. Either way process p reads its contiguous share, and every process
  yields as many batches as the largest share needs. A streamed TFDS split is read whole, in
  stored order, to pick out the indexed examples (correct, not fast).
  """
  if split not in EVAL_SPLITS:
    raise ValueError(f'split={split!r} is not an evaluation split; use one of {EVAL_SPLITS}.')
  info, config = source.info, source.config
  data = source.split(split)
  if indices is not None:
    indices = _checked_indices(indices, data.num_examples, split)
  num_selected = data.num_examples if indices is None else len(indices)
  process, num_processes = jax.process_index(), jax.process_count()
  start, stop = _shard(num_selected, process, num_processes)
  transform = transforms.make_transform(config.augment, info, train=False)
  no_seed = tf.zeros([2], tf.int64)
  bad_file = None
  if data.streamed:
    if indices is None:
      ds = tfds_source.stream(source.catalog, data.tfds_split, shuffle_seed=None)
    else:
      ds = _streamed_at(source.catalog, data, indices[start:stop])
    ds = ds.map(
        lambda image, label: (transform(transforms.decode(image), no_seed), label),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
  else:
    wanted = (np.arange(data.num_examples) if indices is None else indices)[start:stop]
    image_of = _image_lookup(data, 0)
    labels = tf.constant(data.labels)
    ds = tf.data.Dataset.from_tensor_slices(wanted.astype(np.int64)).map(
        lambda i: (transform(image_of(i), no_seed), tf.gather(labels, i)),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    if data.pixels is None:
      bad_file = lambda k: image_folder.find_bad_file(
          data.files[wanted[k * local_batch_size : (k + 1) * local_batch_size]]
      )
  ds = ds.batch(local_batch_size)
  # Every process runs as many batches as the largest shard needs.
  num_batches = math.ceil(math.ceil(num_selected / num_processes) / local_batch_size)
  size = info.image_size

  def batches():
    count = 0
    for image, label in _numpy(ds, config.prefetch, bad_file):
      yield _pad(image, label, local_batch_size)
      count += 1
    empty = (np.zeros((0, size, size, 3), np.float32), np.zeros((0,), np.int32))
    for _ in range(count, num_batches if num_processes > 1 else count):
      yield _pad(*empty, local_batch_size)

  return batches()


def check_example_index(source: Source) -> None:
  """Raises ValueError unless the train split has example indices and labels (`with_index`,
  `train_labels`): a streamed TFDS split has neither."""
  if source.split('train').streamed:
    raise ValueError(
        f"{source.info.name}: this method needs each train example's index and label (a memory "
        'of the train set), which a streamed TFDS split does not have; cache the train split '
        '(config.dataset.cache=True with enough config.dataset.cache_budget_gib) or use an '
        'image folder.'
    )


def train_labels(source: Source) -> np.ndarray | None:
  """The train split's labels, int32 (num_train,), in the order of the train batches' 'index'
  (decoding the split into the cache first where it caches); None for a streamed TFDS split."""
  split = source.split('train')
  return None if split.labels is None else np.asarray(split.labels, np.int32)


def class_mixed_indices(source: Source, split: str, num_examples: int, seed: int) -> np.ndarray:
  """A fixed subset of a split for diagnostics: int64 global indices, for eval_iterator.

  Takes the Source, 'val' or 'test', how many examples (at most the split's size) and a seed.
  Where the labels are known (image folders; TFDS splits in the cache, decoded now if not yet),
  each class's examples are put in an order drawn from the seed, the classes in a seeded order
  too, and the examples are taken round-robin over the classes: every class appears once before
  any appears twice, so a balanced split of K classes gives every class when num_examples >= K,
  with counts differing by at most one. Where they are not known (a TFDS split streamed, not
  cached) it is the first num_examples in stored order, which TFDS stores shuffled.
  """
  if split not in EVAL_SPLITS:
    raise ValueError(f'split={split!r} is not an evaluation split; use one of {EVAL_SPLITS}.')
  if num_examples < 1:
    raise ValueError(f'num_examples={num_examples} must be >= 1.')
  data = source.split(split)
  count = min(int(num_examples), data.num_examples)
  if data.labels is None:
    return np.arange(count, dtype=np.int64)
  rng = np.random.default_rng(seed)
  classes = np.unique(data.labels)
  classes = classes[rng.permutation(len(classes))]
  rank = np.zeros(data.num_examples, np.int64)  # place within its class's seeded order
  class_place = np.zeros(data.num_examples, np.int64)  # its class's place in the class order
  for place, label in enumerate(classes):
    members = np.flatnonzero(data.labels == label)
    rank[members[rng.permutation(len(members))]] = np.arange(len(members))
    class_place[members] = place
  order = np.lexsort((class_place, rank))  # by rank, then by class: round-robin
  return order[:count].astype(np.int64)


# ----------------------------------------------------------------------------------------------
# Helpers of the iterators.


def _shard(n: int, process: int, num_processes: int) -> tuple[int, int]:
  """[start, stop) of this process's contiguous, near-even share of n examples."""
  sizes = [n // num_processes + (p < n % num_processes) for p in range(num_processes)]
  start = sum(sizes[:process])
  return start, start + sizes[process]


def _seed_words(seed: int, epoch: int, process: int, purpose: int, stream: int = 0) -> np.ndarray:
  """Seed words of one epoch's order (purpose 0) or augmentation (1); stream 0 keeps the words
  it had before streams existed, so old runs resume on the same batches."""
  entropy = [seed, epoch, process, purpose] + ([stream] if stream else [])
  return np.random.SeedSequence(entropy).generate_state(2, np.uint32)


def _fold(seed: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
  return tf.random.experimental.stateless_fold_in(seed, tf.cast(index, tf.int64))


def _image_lookup(split: Split, start: int) -> Callable:
  """index i -> uint8 (h, w, 3) of example start + i, from the cache or from the file."""
  if split.pixels is not None:
    return lambda i: split.pixels.lookup(start + i)
  files = tf.constant(split.files[start:])
  return lambda i: transforms.decode(tf.io.read_file(files[i]))


def _checked_indices(indices, num_examples: int, split: str) -> np.ndarray:
  """eval_iterator's indices as int64 (n,), or a ValueError saying what is wrong with them."""
  array = np.asarray(indices)
  if array.ndim != 1 or not len(array) or not np.issubdtype(array.dtype, np.integer):
    raise ValueError(
        f'indices (shape {array.shape}, dtype {array.dtype}) must be a non-empty 1-D array of '
        f'integer indices into split {split!r}.'
    )
  if array.min() < 0 or array.max() >= num_examples:
    raise ValueError(
        f'indices must be in [0, {num_examples}), the examples of split {split!r}; they run '
        f'from {array.min()} to {array.max()}.'
    )
  return array.astype(np.int64)


def _streamed_at(catalog: Catalog, split: Split, wanted: np.ndarray) -> tf.data.Dataset:
  """(encoded image, label) of a streamed TFDS split at positions `wanted`, in that order.

  Reads the split in stored order up to the last wanted position and keeps the wanted ones; one that is wanted after
  a later position is held (still encoded) until its turn, so sorted positions hold nothing.
  """
  is_wanted = np.zeros(split.num_examples, bool)
  is_wanted[wanted] = True
  is_wanted = tf.constant(is_wanted)
  ds = tfds_source.stream(catalog, split.tfds_split, shuffle_seed=None, this_process=False)
  # Nothing is read past the last wanted position.
  ds = ds.take(int(wanted.max()) + 1).enumerate()
  ds = ds.filter(lambda pos, example: tf.gather(is_wanted, pos))

  def in_order():
    uses = collections.Counter(wanted.tolist())
    held, k = {}, 0
    for pos, example in ds.as_numpy_iterator():
      held[int(pos)] = example
      while k < len(wanted) and int(wanted[k]) in held:
        position = int(wanted[k])
        yield held[position]
        uses[position] -= 1
        if not uses[position]:
          del held[position]
        k += 1

  signature = (tf.TensorSpec([], tf.string), tf.TensorSpec([], tf.int32))
  return tf.data.Dataset.from_generator(in_order, output_signature=signature)


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
      raise image_folder.bad_image_error([culprit]) from e
    yield batch


def _pad(image: np.ndarray, label: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
  n = len(label)
  mask = np.zeros((batch_size,), np.float32)
  mask[:n] = 1.0
  if n < batch_size:
    image = np.concatenate([image, np.zeros((batch_size - n, *image.shape[1:]), image.dtype)])
    label = np.concatenate([label, np.zeros((batch_size - n,), label.dtype)])
  return {'image': image, 'label': label.astype(np.int32), 'mask': mask}
