"""CKA diagnostics as pictures: the teacher x student layer heat map and FFKD's omega histograms.

At every evaluation `evaluation.Evaluator` calls `write_eval_figures`, which writes into
WORKDIR/cka/ (process 0 only):
  cka_matrix_step<step>.png  linear CKA of every teacher stage with every student stage, on the
                             diagnostics subset of the validation split (`cka_matrix` of the
                             diagnostics step, ffkd_jax/evaluation.py); the cells of the
                             method's layer pairs are outlined;
  omega_hist_step<step>.png  per FFKD layer pair, the histogram of the channel understanding
                             omega[c] = CKA(U[..., c], R_fwd(V)[..., c]) (`omega_channels/<pair>`;
                             R_fwd: the student's forward regressor);
  cka_step<step>.json        the numbers drawn (the omega arrays are not in metrics.jsonl);
and adds both images to TensorBoard (`cka/matrix`, `cka/omega_histogram`). The same drawing
serves `python -m ffkd_jax.cka_report` for any two checkpoints.

matplotlib is imported only here and only when drawing; figures are drawn on its Agg canvas
directly (no pyplot), so a notebook's own plotting backend is left as it is.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from absl import logging

MATRIX_KEY = 'cka_matrix'
OMEGA_PREFIX = 'omega_channels/'
LAYER_CKA_PREFIX = 'cka/'
_BINS = np.linspace(0.0, 1.0, 21)


def omega_pairs(record: Mapping[str, Any]) -> list[str]:
  """The layer pairs ('<teacher feature>-<student feature>') with per-channel omega values."""
  return sorted(k[len(OMEGA_PREFIX) :] for k in record if k.startswith(OMEGA_PREFIX))


def arrays_of(record: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The array-valued entries of a diagnostics record."""
  return {k: np.asarray(v) for k, v in record.items() if np.ndim(v) > 0}


def _figure(width: float, height: float):
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  fig = Figure(figsize=(width, height), dpi=100)
  FigureCanvasAgg(fig)
  return fig


def _margins(fig, left: float, right: float, bottom: float, top: float, wspace: float = 0.2):
  """Fixed margins in inches: one draw per figure instead of tight_layout's extra layout pass
  (about a third of the drawing time)."""
  width, height = fig.get_size_inches()
  fig.subplots_adjust(
      left=left / width,
      right=1.0 - right / width,
      bottom=bottom / height,
      top=1.0 - top / height,
      wspace=wspace,
  )


def _save(fig, path: str) -> str:
  """Writes the PNG next to its final name and renames it, so no reader sees half a file."""
  partial = f'{path}.partial.png'
  fig.savefig(partial, format='png')
  os.replace(partial, path)
  return path


def _cells_of(layer_pairs, teacher_names, student_names) -> list[tuple[int, int]]:
  """(row, column) of the layer pairs whose two features are stage outputs of the matrix."""
  return [
      (teacher_names.index(t), student_names.index(s))
      for t, s in layer_pairs
      if t in teacher_names and s in student_names
  ]


def draw_cka_matrix(
    path: str,
    matrix: np.ndarray,
    teacher_names: Sequence[str],
    student_names: Sequence[str],
    title: str,
    *,
    teacher_label: str = 'teacher',
    student_label: str = 'student',
    outlined: Sequence[tuple[int, int]] = (),
) -> str:
  """Heat map of a (teacher layers, student layers) CKA matrix, every cell annotated."""
  from matplotlib.patches import Rectangle  # pylint: disable=g-import-not-at-top

  matrix = np.asarray(matrix, np.float64)
  rows, cols = matrix.shape
  if (rows, cols) != (len(teacher_names), len(student_names)):
    raise ValueError(
        f'CKA matrix of shape {matrix.shape} does not match {len(teacher_names)} '
        f'teacher and {len(student_names)} student layer names.'
    )
  fig = _figure(max(4.4, 2.2 + 1.0 * cols), max(3.4, 1.7 + 0.75 * rows))
  ax = fig.add_subplot()
  image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap='viridis', aspect='auto')
  for i in range(rows):
    for j in range(cols):
      value = matrix[i, j]
      ax.text(
          j,
          i,
          f'{value:.2f}',
          ha='center',
          va='center',
          fontsize=9,
          color='black' if value > 0.6 else 'white',
      )
  for i, j in outlined:
    ax.add_patch(
        Rectangle((j - 0.5, i - 0.5), 1.0, 1.0, fill=False, edgecolor='red', linewidth=2.0)
    )
  ax.set_xticks(range(cols), list(student_names), rotation=30, ha='right')
  ax.set_yticks(range(rows), list(teacher_names))
  ax.set_xlabel(f'{student_label} layer')
  ax.set_ylabel(f'{teacher_label} layer')
  ax.set_title(title, fontsize=10)
  _margins(fig, left=1.25, right=0.1, bottom=1.0, top=0.6)
  fig.colorbar(image, ax=ax, label='linear CKA', fraction=0.08, pad=0.04)
  if outlined:
    fig.text(0.01, 0.01, 'red: FFKD layer pairs', fontsize=7, color='red')
  return _save(fig, path)


def draw_omega_histograms(path: str, record: Mapping[str, Any], title: str) -> str | None:
  """One histogram of omega per layer pair (None when the record has none)."""
  pairs = omega_pairs(record)
  if not pairs:
    return None
  fig = _figure(max(4.4, 3.6 * len(pairs)), 3.4)
  axes = fig.subplots(1, len(pairs), squeeze=False)[0]
  for ax, pair in zip(axes, pairs):
    omega = np.asarray(record[OMEGA_PREFIX + pair], np.float64).reshape(-1)  # (c,)
    counts, _, _ = ax.hist(
        np.clip(omega, 0.0, 1.0), bins=_BINS, color='tab:blue', edgecolor='white'
    )
    ax.set_ylim(0.0, 1.45 * max(float(np.max(counts)), 1.0))  # room for the text above the bars
    ax.axvline(float(np.mean(omega)), color='tab:red', linestyle='--', linewidth=1.2)
    lines = [f'{omega.size} channels', f'mean omega {np.mean(omega):.3f}']
    if LAYER_CKA_PREFIX + pair in record:
      lines.append(f'layer Omega {float(record[LAYER_CKA_PREFIX + pair]):.3f}')
    ax.text(
        0.03,
        0.97,
        '\n'.join(lines),
        transform=ax.transAxes,
        va='top',
        fontsize=8,
        bbox={'facecolor': 'white', 'alpha': 0.8, 'edgecolor': 'none'},
    )
    ax.set_xlim(0.0, 1.0)
    ax.set_title(pair.replace('-', ' -> '), fontsize=9)
    ax.set_xlabel('channel understanding omega')
    ax.set_ylabel('channels')
  fig.suptitle(title, fontsize=10)
  _margins(fig, left=0.6, right=0.15, bottom=0.6, top=0.7, wspace=0.3)
  return _save(fig, path)


def draw_figures(
    out_dir: str,
    record: Mapping[str, Any],
    teacher_names: Sequence[str],
    student_names: Sequence[str],
    *,
    title_note: str,
    suffix: str = '',
    teacher_label: str = 'teacher',
    student_label: str = 'student',
    layer_pairs: Sequence[tuple[str, str]] = (),
) -> dict[str, str]:
  """Draws the heat map and the omega histograms of `record` and writes the numbers as JSON.

  layer_pairs: the method's (teacher feature, student feature) pairs, outlined on the heat map.

  Returns {'matrix': png, 'omega_histogram': png, 'numbers': json} for what was written.
  """
  os.makedirs(out_dir, exist_ok=True)
  paths = {}
  teacher_names, student_names = list(teacher_names), list(student_names)
  if MATRIX_KEY in record:
    paths['matrix'] = draw_cka_matrix(
        os.path.join(out_dir, f'cka_matrix{suffix}.png'),
        record[MATRIX_KEY],
        teacher_names,
        student_names,
        f'Linear CKA, {teacher_label} x {student_label} layers\n{title_note}',
        teacher_label=teacher_label,
        student_label=student_label,
        outlined=_cells_of(layer_pairs, teacher_names, student_names),
    )
  histograms = draw_omega_histograms(
      os.path.join(out_dir, f'omega_hist{suffix}.png'),
      record,
      f'Channel understanding omega per FFKD layer pair, {title_note}',
  )
  if histograms:
    paths['omega_histogram'] = histograms
  numbers = {'teacher_layers': teacher_names, 'student_layers': student_names}
  numbers.update(
      {
          k: np.asarray(v).tolist()
          for k, v in record.items()
          if k == MATRIX_KEY or k.startswith((OMEGA_PREFIX, LAYER_CKA_PREFIX))
      }
  )
  paths['numbers'] = os.path.join(out_dir, f'cka{suffix}.json')
  with open(paths['numbers'], 'w', encoding='utf-8') as f:
    json.dump(numbers, f)
  return paths


def write_eval_figures(
    workdir: str,
    step: int,
    record: Mapping[str, Any],
    writer,
    teacher_names: Sequence[str],
    student_names: Sequence[str],
    layer_pairs: Sequence[tuple[str, str]] = (),
    title_note: str = '',
) -> dict[str, str]:
  """Training's evaluation hook: the figures of `record` into WORKDIR/cka/ and TensorBoard.

  Does nothing on processes other than 0 or for runs without a teacher and a student. A failure
  to draw is logged and does not stop training.
  """
  if jax.process_index() != 0 or MATRIX_KEY not in record:
    return {}
  start = time.perf_counter()
  try:
    paths = draw_figures(
        os.path.join(workdir, 'cka'),
        record,
        teacher_names,
        student_names,
        title_note=f'step {step}{title_note}',
        suffix=f'_step{step:07d}',
        layer_pairs=layer_pairs,
    )
    for name, path in paths.items():
      if path.endswith('.png'):
        writer.write_image(step, f'cka/{name}', path)
  except Exception:  # pylint: disable=broad-except; pictures must never stop a training run
    logging.exception('Drawing the CKA figures at step %d failed; training goes on.', step)
    return {}
  logging.info(
      'CKA figures at step %d (%.2f s): %s',
      step,
      time.perf_counter() - start,
      ', '.join(sorted(paths.values())),
  )
  return paths
