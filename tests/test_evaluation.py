"""Evaluation: diagnostics on a class-mixed subset of val, eval splits streamed batch by batch."""

import weakref

import numpy as np
import pytest

from ffkd_jax import data, defaults, evaluation, parallel
from tests.image_folder_fixture import write_image_folder
from tests import helpers

NUM_CLASSES = helpers.NUM_CLASSES


def folder_config(root, *, val_fraction=0.5, cache_budget_gib=4.0):
  config = defaults.dataset_config()
  config.name = data.IMAGE_FOLDER
  config.path = root
  config.val_fraction = val_fraction
  config.cache_budget_gib = cache_budget_gib
  return config


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  # 10 classes x 16 train images, half carved out as a balanced val split (8 a class), whose
  # list is in class order; 16x16 images for the tiny test models.
  root = tmp_path_factory.mktemp('eval_images')
  return write_image_folder(
      root,
      classes=tuple(f'c{i}' for i in range(NUM_CLASSES)),
      num_train=16,
      num_test=4,
      size=helpers.IMAGE_SIZE,
  )


def test_diagnostics_subset_holds_every_class_of_a_balanced_val_split(folder):
  source = data.open_source(folder_config(folder))
  assert source.info.num_val == 80
  # The first 40 val images in list order are 5 classes; the subset must mix all 10.
  first = next(data.eval_iterator(source, 'val', local_batch_size=40))
  assert len(set(first['label'].tolist())) < NUM_CLASSES  # what the old diagnostics saw
  batch = evaluation.diagnostics_batch(source, 'val', 40)
  assert len(batch['label']) == 40 and np.all(batch['mask'] == 1)
  counts = np.bincount(batch['label'], minlength=NUM_CLASSES)
  assert counts.tolist() == [4] * NUM_CLASSES
  # Fixed: the same images at every evaluation and in a new process (seeded, not the run's seed).
  again = evaluation.diagnostics_batch(data.open_source(folder_config(folder)), 'val', 40)
  np.testing.assert_array_equal(again['image'], batch['image'])


def test_diagnostics_size_is_a_multiple_of_the_devices_and_at_most_the_split():
  import jax  # pylint: disable=g-import-not-at-top

  devices = jax.device_count()
  assert evaluation.diagnostics_size(1000, 1024) == 1000 - 1000 % devices
  assert evaluation.diagnostics_size(5000, 1024) == 1024 - 1024 % devices
  with pytest.raises(ValueError, match='config.diagnostics_examples=2'):
    evaluation.diagnostics_size(5000, 2)


def _evaluator(source, batches_of=None):
  config = helpers.tiny_config('fkd_cka')
  method, programs, state = helpers.build(config)
  mesh = helpers.mesh_of(2)
  evaluator = evaluation.Evaluator(
      source=source,
      method=method,
      programs=programs,
      mesh=mesh,
      eval_batch_size=8,
      diagnostics_examples=40,
      workdir=None,
      batches_of=batches_of,
  )
  return evaluator, parallel.replicate(mesh, state)


def test_eval_of_a_split_over_the_cache_budget_streams_a_few_batches(folder):
  budget = 1e-6  # GiB: far below the split, so nothing is cached
  streamed = data.open_source(folder_config(folder, cache_budget_gib=budget))
  alive, most_alive, seen = set(), [0], [0]

  def tracked(split):
    for batch in data.eval_iterator(streamed, split, local_batch_size=4):
      key = seen[0]
      seen[0] += 1
      alive.add(key)
      weakref.finalize(batch['image'], alive.discard, key)
      most_alive[0] = max(most_alive[0], len(alive))
      yield batch
      del batch

  evaluator, state = _evaluator(streamed, tracked)
  record = evaluator.accuracy(state)
  assert seen[0] == 80 // 4 + 40 // 4  # val (80) and test (40) in batches of 4
  assert most_alive[0] <= 3, most_alive[0]
  # The same numbers as a fully cached evaluation.
  cached_evaluator, _ = _evaluator(data.open_source(folder_config(folder)))
  assert cached_evaluator.accuracy(state) == pytest.approx(record)
  # The diagnostics record carries the method's CKA per pair and the layer matrix.
  diagnostics = evaluator.diagnostics(state)
  assert diagnostics['cka_matrix'].shape == (3, 3)
  assert any(k.startswith('cka/') for k in diagnostics)
