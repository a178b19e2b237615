"""Checks a config before anything runs; each error names the field, the value and what is valid."""

import os
import tempfile
from typing import Mapping

import jax

from ffkd_jax import methods
from ffkd_jax import models

_POSITIVE = ('batch_size', 'eval_batch_size', 'optimizer.learning_rate', 'log_every_steps',
             'checkpoint_every_steps', 'keep_checkpoints')
_TEMPERATURES = ('kd.temperature', 'dist.temperature', 'ffkd.temperature',
                 'ffkd.weight_temperature', 'cc.temperature', 'ickd.temperature',
                 'dml.temperature', 'iedml.temperature')


def _get(config, dotted: str):
  value = config
  for part in dotted.split('.'):
    value = value[part]
  return value


def _fail(field: str, value, valid: str):
  raise ValueError(f'config.{field}={value!r} is not valid: {valid}.')


def validate(config, workdir: str | None = None) -> None:
  """Raises ValueError for the first bad field found."""
  if config.method not in methods.available_methods():
    _fail('method', config.method, f'one of {", ".join(methods.available_methods())}')
  valid_models = models.available_models()
  for field in ('model', 'teacher.model'):
    if _get(config, field) not in valid_models:
      _fail(field, _get(config, field), f'one of {", ".join(valid_models)}')
  for field in _POSITIVE:
    if not _get(config, field) > 0:
      _fail(field, _get(config, field), 'must be > 0')
  for field in _TEMPERATURES:
    if not _get(config, field) > 0:
      _fail(field, _get(config, field), 'a temperature must be > 0')
  if config.num_train_steps <= 0 and not config.num_epochs > 0:
    _fail('num_epochs', config.num_epochs, 'must be > 0 (or set config.num_train_steps > 0)')
  devices = jax.device_count()
  for field in ('batch_size', 'eval_batch_size'):
    if _get(config, field) % devices:
      _fail(field, _get(config, field),
            f'must be divisible by the device count ({devices}), e.g. '
            f'{max(1, _get(config, field) // devices) * devices}')
  if config.nonfinite_policy not in ('skip', 'stop'):
    _fail('nonfinite_policy', config.nonfinite_policy, "'skip' or 'stop'")
  if config.dtype not in ('float32', 'bfloat16'):
    _fail('dtype', config.dtype, "'float32' or 'bfloat16'")
  if not 0.0 <= config.dataset.val_fraction < 1.0:
    _fail('dataset.val_fraction', config.dataset.val_fraction, 'must be in [0, 1)')
  if workdir is not None:
    _check_writable(workdir)


def _check_writable(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir):
      pass
  except OSError as error:
    raise ValueError(f"--workdir='{workdir}' is not a writable directory ({error.strerror}); "
                     'pass a directory you can write to.') from error


def check_features(method, feature_shapes: Mapping[str, Mapping]) -> None:
  """Every feature a method asks of a role must be one the role's model produces."""
  for role, names in method.required_features().items():
    available = sorted(feature_shapes[role])
    for name in names:
      if name not in feature_shapes[role]:
        raise ValueError(
            f"feature '{name}' of the {role} (config.method='{method.name}', e.g. "
            f"config.ffkd.layer_pairs) is not produced by its model; it has: "
            f"{', '.join(available)}.")
