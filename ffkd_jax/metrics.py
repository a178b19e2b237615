"""Where measurements go: DIR/metrics.jsonl, TensorBoard event files and a progress line.

Only process 0 writes. Every event is one JSON object with `step`; evaluation events carry
`eval/top1` (the primary role's top-1, in %).
"""

import json
import os
import time
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging


def _to_python(value: Any) -> Any:
  array = np.asarray(value)
  if array.ndim == 0:
    return array.item()
  return array.tolist()


class MetricWriter:
  """Appends to metrics.jsonl and writes TensorBoard scalars and images (process 0 only)."""

  def __init__(self, workdir: str, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self._file = open(self.path, 'a', encoding='utf-8')
      if self._file.tell() > 0 and not _ends_with_newline(self.path):
        self._file.write('\n')  # a crash mid-write left a torn line: start a fresh one
      if tensorboard:
        import tensorflow as tf  # pylint: disable=g-import-not-at-top

        self._tf = tf
        self._tb = tf.summary.create_file_writer(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, values: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    record = {'step': int(step), 'time': time.time()}
    record.update({k: _to_python(v) for k, v in values.items()})
    self._file.write(json.dumps(record) + '\n')
    self._file.flush()
    if self._tb is not None:
      with self._tb.as_default(step=int(step)):
        for key, value in record.items():
          if key not in ('step', 'time') and isinstance(value, (int, float)):
            self._tf.summary.scalar(key, value)

  def write_image(self, step: int, name: str, png_path: str) -> None:
    """Adds a PNG file the run drew to TensorBoard."""
    if not self.enabled or self._tb is None:
      return
    with open(png_path, 'rb') as f:
      image = self._tf.image.decode_png(f.read(), channels=4)
    with self._tb.as_default(step=int(step)):
      self._tf.summary.image(name, image[None])

  def flush(self) -> None:
    if self.enabled:
      self._file.flush()
      if self._tb is not None:
        self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self.flush()
      self._file.close()
      if self._tb is not None:
        self._tb.close()


def _ends_with_newline(path: str) -> bool:
  with open(path, 'rb') as f:
    f.seek(-1, os.SEEK_END)
    return f.read(1) == b'\n'


def read_metrics(workdir: str) -> list[dict]:
  """The events of a run's metrics.jsonl, in order (a line torn by a crash mid-write is skipped)."""
  events = []
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    for line in f:
      try:
        events.append(json.loads(line))
      except json.JSONDecodeError:
        logging.warning('metrics.jsonl: skipping a torn line: %.80s', line)
  return events


class Progress:
  """Images/s and time left, from the steps done since the last report."""

  def __init__(self, total_steps: int, global_batch_size: int, start_step: int):
    self.total_steps = total_steps
    self.batch = global_batch_size
    self._last_step, self._last_time = start_step, time.perf_counter()

  def report(self, step: int, values: Mapping[str, float]) -> dict[str, float]:
    now = time.perf_counter()
    steps = step - self._last_step
    elapsed = max(now - self._last_time, 1e-9)
    images_per_s = steps * self.batch / elapsed
    seconds_left = (self.total_steps - step) * elapsed / max(steps, 1)
    self._last_step, self._last_time = step, now
    shown = ' '.join(
        f'{k}={v:.4g}' for k, v in sorted(values.items()) if k.startswith(('loss/', 'train/'))
    )
    logging.info(
        'step %d/%d (%.0f%%) | %.1f img/s | %s left | %s',
        step,
        self.total_steps,
        100.0 * step / max(self.total_steps, 1),
        images_per_s,
        _format_seconds(seconds_left),
        shown,
    )
    return {'perf/images_per_s': images_per_s, 'perf/seconds_left': seconds_left}


def _format_seconds(seconds: float) -> str:
  seconds = int(seconds)
  hours, rest = divmod(seconds, 3600)
  return f'{hours}h{rest // 60:02d}m' if hours else f'{rest // 60}m{rest % 60:02d}s'
