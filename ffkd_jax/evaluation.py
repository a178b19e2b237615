"""Evaluation: top-1/top-5 of every role on each eval split, diagnostics on a fixed subset, figures.

- Accuracy streams each eval split in fixed batches of `config.eval_batch_size` (the last one
  padded, `mask` marking its real rows): at most the pipeline's prefetched batches are in host
  memory at once; decoded images are cached (uint8) only where the data pipeline's budget
  allows (`config.dataset.cache_budget_gib`).
- Diagnostics (the method's, e.g. FFKD's CKA per layer pair, and the teacher x student layer CKA
  matrix) are computed on a fixed, seeded, class-mixed subset of the validation split
  (`ffkd_jax.data.class_mixed_indices`): `config.diagnostics_examples` images (default 1024),
  fewer where the split is smaller, rounded down to a multiple of the device count so that the
  subset is one global batch with no padded row (the mask is checked to be all ones). The same
  images at every evaluation, so the numbers are comparable across steps. The diagnostics step
  gathers every stage of both roles for the subset onto each device: for large images or models
  lower `config.diagnostics_examples` if that does not fit.
- Figures: the CKA heat map and the omega histograms into WORKDIR/cka/ and TensorBoard
  (`ffkd_jax.cka_plots`), process 0 only.

`python -m ffkd_jax.cka_report` uses `diagnostics_batch` and the same diagnostics step.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import jax
import numpy as np
from absl import logging

from ffkd_jax import cka_plots
from ffkd_jax import data
from ffkd_jax import parallel
from ffkd_jax import step as step_lib
from ffkd_jax.methods import pairs

DIAGNOSTICS_SEED = 20241201  # the subset never depends on the run's seed
MIN_DIAGNOSTICS_EXAMPLES = 4  # CKA needs a few examples


def accuracy_counts(eval_step, state, batches: Iterable[dict], mesh) -> dict[str, np.ndarray]:
  """Sums the eval step's counts over `batches`, consumed one at a time (never listed)."""
  totals = None
  for batch in batches:
    counts = parallel.fetch(eval_step(state, parallel.global_batch(mesh, batch)))
    totals = counts if totals is None else jax.tree.map(np.add, totals, counts)
  return totals


def accuracies(totals: Mapping[str, Any], role_names: Iterable[str]) -> dict[str, float]:
  """{role}_top1 and {role}_top5 in percent of the counted (real) rows."""
  count = max(float(totals['count']), 1.0)
  result = {}
  for name in role_names:
    result[f'{name}_top1'] = 100.0 * float(totals[f'{name}_top1']) / count
    result[f'{name}_top5'] = 100.0 * float(totals[f'{name}_top5']) / count
  return result


def diagnostics_size(num_available: int, requested: int) -> int:
  """The subset's size: min(requested, available), a multiple of the device count."""
  devices = jax.device_count()
  n = min(requested, num_available)
  n -= n % devices
  if n < max(MIN_DIAGNOSTICS_EXAMPLES, devices):
    raise ValueError(
        f'config.diagnostics_examples={requested}: the split has {num_available} images; '
        f'diagnostics need at least {max(MIN_DIAGNOSTICS_EXAMPLES, devices)} (a multiple of the '
        f'{devices} devices).'
    )
  return n


def diagnostics_indices(source: data.Source, split: str, num_examples: int) -> np.ndarray:
  """The fixed class-mixed subset of `split` (global indices); raises ValueError (naming
  config.diagnostics_examples) where the split is too small."""
  available = source.info.num_val if split == 'val' and source.info.num_val > 0 else None
  if available is None:
    available = source.info.num_test
  n = diagnostics_size(available, num_examples)
  return data.class_mixed_indices(source, split, n, DIAGNOSTICS_SEED)


def diagnostics_batch(source: data.Source, split: str, num_examples: int) -> dict[str, np.ndarray]:
  """This process's rows of the fixed class-mixed subset of `split`, as one unpadded batch."""
  return batch_at(source, split, diagnostics_indices(source, split, num_examples))


def batch_at(source: data.Source, split: str, indices: np.ndarray) -> dict[str, np.ndarray]:
  """This process's rows of `split` at `indices` (a multiple of the devices), as one batch."""
  local = parallel.local_batch_size(len(indices), 'config.diagnostics_examples')
  batches = list(data.eval_iterator(source, split, local_batch_size=local, indices=indices))
  if len(batches) != 1 or not np.all(batches[0]['mask'] > 0):
    raise AssertionError('the diagnostics subset must be one batch with no padded row')
  return batches[0]


class Evaluator:
  """`evaluate(state, step)`: accuracy on every eval split, diagnostics, figures, one record.

  splits: metric prefix -> data split, e.g. {'eval': 'val', 'test': 'test'}; model selection
  reads 'eval' only. write(step, scalars) is the metric writer's; figures go to workdir.
  """

  def __init__(
      self,
      *,
      source: data.Source,
      method,
      programs,
      mesh,
      eval_batch_size: int,
      diagnostics_examples: int,
      workdir: str | None,
      writer=None,
      splits: Mapping[str, str] | None = None,
      batches_of: Callable[[str], Iterable[dict]] | None = None,
  ):
    self.source, self.method, self.programs, self.mesh = source, method, programs, mesh
    self.workdir, self.writer = workdir, writer
    self.local_batch = parallel.local_batch_size(eval_batch_size, 'config.eval_batch_size')
    if splits is None:
      splits = {'eval': 'val'}
      if source.info.num_val > 0:
        splits['test'] = 'test'
    self.splits = dict(splits)
    self._batches_of = batches_of or (
        lambda split: data.eval_iterator(source, split, local_batch_size=self.local_batch)
    )
    # Chosen once (a too small split fails here, before training, as a config error).
    self.diagnostics_indices = diagnostics_indices(source, 'val', diagnostics_examples)
    self.eval_step = step_lib.make_eval_step(programs, mesh)
    self.diagnostics_step = step_lib.make_diagnostics_step(method, programs, mesh)
    shapes = method.feature_shapes
    self.layer_names = {
        role: pairs.stage_names(shapes.get(role, {})) for role in ('teacher', 'student')
    }

  def accuracy(self, state) -> dict[str, float]:
    record = {}
    for prefix, split in self.splits.items():
      totals = accuracy_counts(self.eval_step, state, self._batches_of(split), self.mesh)
      for key, value in accuracies(totals, self.programs).items():
        record[f'{prefix}/{key}'] = value
    primary = self.method.primary_role
    record['eval/top1'] = record[f'eval/{primary}_top1']
    record['eval/top5'] = record[f'eval/{primary}_top5']
    return record

  def diagnostics(self, state) -> dict[str, Any]:
    batch = batch_at(self.source, 'val', self.diagnostics_indices)
    return parallel.fetch(self.diagnostics_step(state, parallel.global_batch(self.mesh, batch)))

  def evaluate(self, state, step: int, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The record of one evaluation (scalars, and the arrays `cka_matrix`, `omega_channels/*`),
    written to the metrics (scalars and cka_matrix) and drawn (figures)."""
    record = self.accuracy(state)
    record.update(self.diagnostics(state))
    record.update(extra or {})
    if self.writer is not None:
      # Arrays stay out of metrics.jsonl (omega per channel goes to WORKDIR/cka/), but cka_matrix.
      self.writer.write(
          step,
          {k: v for k, v in record.items() if np.ndim(v) == 0 or k == cka_plots.MATRIX_KEY},
      )
    if self.workdir is not None and self.writer is not None:
      cka_plots.write_eval_figures(
          self.workdir,
          step,
          record,
          self.writer,
          self.layer_names['teacher'],
          self.layer_names['student'],
          layer_pairs=self.method.layer_pairs,
      )
    logging.info(
        'eval at step %d: %s',
        step,
        ', '.join(f'{k}={v:.2f}' for k, v in record.items() if k.startswith(('eval/', 'test/'))),
    )
    return record
