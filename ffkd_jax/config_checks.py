"""Checks a config before anything runs; each error names the field, the value and what is valid."""

import contextlib
import difflib
import math
import os
import tempfile

import jax
import ml_collections

from ffkd_jax import defaults
from ffkd_jax import methods
from ffkd_jax import models
from ffkd_jax.models import conv


class ConfigError(ValueError):
  """A config (or a file it names) is not valid: raised before training starts. The CLI shows
  it as one line (field, value, what is valid) and exits with status 1."""


@contextlib.contextmanager
def config_errors():
  """Turns the ValueErrors raised inside the block (the checks of every part: methods, data,
  models, checkpoints) into ConfigErrors."""
  try:
    yield
  except ConfigError:
    raise
  except ValueError as error:
    raise ConfigError(str(error)) from error


_POSITIVE = (
    'batch_size',
    'eval_batch_size',
    'optimizer.learning_rate',
    'log_every_steps',
    'checkpoint_every_steps',
    'keep_checkpoints',
    'diagnostics_examples',
)


def _get(config, dotted: str):
  value = config
  for part in dotted.split('.'):
    value = value[part]
  return value


def _fail(field: str, value, valid: str):
  raise ValueError(f'config.{field}={value!r} is not valid: {valid}.')


def _positive(value) -> bool:
  """A finite number > 0 (False for NaN, inf and non-numbers)."""
  try:
    return value > 0 and math.isfinite(value)
  except TypeError:
    return False


def validate(config, workdir: str | None = None) -> None:
  """Raises ValueError for the first bad field found."""
  check_known_fields(config)
  if config.method not in methods.available_methods():
    _fail('method', config.method, f'one of {", ".join(methods.available_methods())}')
  valid_models = models.available_models()
  for field in ('model', 'teacher.model'):
    if _get(config, field) not in valid_models:
      _fail(field, _get(config, field), f'one of {", ".join(valid_models)}')
  for field in _POSITIVE:
    if not _positive(_get(config, field)):
      _fail(field, _get(config, field), 'must be a finite number > 0')
  methods.check_config(config)  # each method checks its own block (temperatures, ...)
  if config.num_train_steps <= 0 and not _positive(config.num_epochs):
    _fail(
        'num_epochs',
        config.num_epochs,
        'must be a finite number > 0 (or set config.num_train_steps > 0)',
    )
  if config.optimizer.name not in ('sgd', 'adamw'):
    _fail('optimizer.name', config.optimizer.name, "'sgd' or 'adamw'")
  if config.optimizer.schedule not in ('steps', 'cosine', 'constant'):
    _fail('optimizer.schedule', config.optimizer.schedule, "'steps', 'cosine' or 'constant'")
  devices = jax.device_count()
  for field in ('batch_size', 'eval_batch_size'):
    if _get(config, field) % devices:
      _fail(
          field,
          _get(config, field),
          f'must be divisible by the device count ({devices}), e.g. '
          f'{max(1, _get(config, field) // devices) * devices}',
      )
  if config.nonfinite_policy not in ('skip', 'stop'):
    _fail('nonfinite_policy', config.nonfinite_policy, "'skip' or 'stop'")
  if config.conv_impl not in conv.IMPLEMENTATIONS:
    _fail('conv_impl', config.conv_impl, f'one of {", ".join(conv.IMPLEMENTATIONS)}')
  if config.dtype not in ('float32', 'bfloat16'):
    _fail('dtype', config.dtype, "'float32' or 'bfloat16'")
  if not 0.0 <= config.dataset.val_fraction < 1.0:
    _fail('dataset.val_fraction', config.dataset.val_fraction, 'must be in [0, 1)')
  _check_teacher_checkpoint(config)
  if workdir is not None:
    _check_writable(workdir)


def check_known_fields(config: ml_collections.ConfigDict) -> None:
  """Every field must be one ffkd_jax/defaults.py defines (a typo would otherwise do nothing)."""
  _compare_fields(config, defaults.get_config(), 'config')


def _compare_fields(config, reference, prefix: str) -> None:
  for key in config.keys():
    if key not in reference:
      close = difflib.get_close_matches(key, list(reference.keys()), n=3)
      hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ''
      raise ValueError(
          f'{prefix}.{key}={config[key]!r} is not valid: {prefix} has no field '
          f"'{key}'{hint}; its fields are {', '.join(sorted(reference.keys()))}."
      )
    if isinstance(config[key], ml_collections.ConfigDict) and isinstance(
        reference[key], ml_collections.ConfigDict
    ):
      _compare_fields(config[key], reference[key], f'{prefix}.{key}')


def _check_teacher_checkpoint(config) -> None:
  """A teacher checkpoint that is named must exist (what it holds is checked when loaded)."""
  path = config.teacher.checkpoint
  if not path or not any(role.pretrained for role in methods.method_roles(config)):
    return
  if not os.path.exists(path):
    _fail(
        'teacher.checkpoint',
        path,
        'no such file or directory; give the workdir of a teacher run (its best/ or '
        'checkpoints/), a checkpoint step directory, or a PyTorch teacher converted with '
        '`python -m ffkd_jax.import_torch`',
    )


def _check_writable(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir):
      pass
  except OSError as error:
    raise ValueError(
        f"--workdir='{workdir}' is not a writable directory ({error.strerror}); "
        'pass a directory you can write to.'
    ) from error
