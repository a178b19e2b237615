"""Modules that map a student feature map onto its teacher's shape.

- `Connector`: average pooling (where the student's map is larger), a 1x1 convolution and batch
  norm (the ICKD and FitNet heads here; at the student's own size, `channel_embeddings`, the
  CD and CCS ones).
- `Regressor`: the convolutional regressor of RepDistiller's and wp502/SKD-RSL's `ConvReg`
  (HobbitLong/RepDistiller models/util.py; wp502/SKD-RSL zoo/Our_1.py): a strided, transposed
  or valid convolution chosen by the two spatial sizes, batch norm, ReLU (FFKD's regressors).
"""

from typing import Sequence

import flax.linen as nn
import jax

from ffkd_jax.methods.pairs import pair_key


class Connector(nn.Module):
  """(n, h_s, w_s, c_s) -> (n, h_t, w_t, c_t)."""

  target_shape: tuple[int, int, int]  # (h_t, w_t, c_t)
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    h_t, w_t, c_t = self.target_shape
    h_s, w_s = x.shape[1:3]
    if (h_s, w_s) != (h_t, w_t):
      if h_s % h_t or w_s % w_t:
        raise ValueError(
            f'connector: student map {h_s}x{w_s} cannot be pooled to the teacher '
            f'map {h_t}x{w_t} (sizes must divide).'
        )
      window = (h_s // h_t, w_s // w_t)
      x = nn.avg_pool(x, window, strides=window)
    x = nn.Conv(c_t, (1, 1), use_bias=False, name='conv')(x)
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        axis_name=self.axis_name,
        name='bn',
    )(x)


class ConnectorHeads(nn.Module):
  """One connector per (student feature -> teacher shape) pair; returns {'<pair key>': map}."""

  pairs: Sequence[tuple[str, str, tuple[int, int, int]]]  # (key, student feature, target shape)
  axis_name: str | None = None

  @nn.compact
  def __call__(self, features, train: bool) -> dict[str, jax.Array]:
    return {
        key: Connector(tuple(shape), self.axis_name, name=f'connector_{key}')(
            features[source], train
        )
        for key, source, shape in self.pairs
    }


def channel_embeddings(feature_shapes, layer_pairs, axis_name: str | None) -> ConnectorHeads:
  """Per (teacher, student) pair a `Connector` at the student's own spatial size: a 1x1
  convolution without bias and batch norm from the student's channels to the teacher's, nothing
  pooled. This is the `Embed` of wp502/SKD-RSL zoo/CD.py and zoo/CCS_2.py (Conv2d(k=1,
  bias=False) + BatchNorm2d), the student's heads of CD and CCS; {'<pair key>': map}."""
  pairs = []
  for t_name, s_name in layer_pairs:
    h, w = feature_shapes['student'][s_name].shape[1:3]
    channels = feature_shapes['teacher'][t_name].shape[-1]
    pairs.append((pair_key((t_name, s_name)), s_name, (h, w, channels)))
  return ConnectorHeads(tuple(pairs), axis_name=axis_name)


def regressor_kind(student_hw: tuple[int, int], teacher_hw: tuple[int, int]) -> str:
  """Which convolution `Regressor` uses for a student map of size student_hw onto teacher_hw:
  'stride2' (student twice the teacher's size), 'transposed' (half), 'valid' (larger or equal
  otherwise); a ValueError for anything else. ConvReg decides by the heights alone; here both
  sides must agree (a map twice as tall but not twice as wide is refused, not mis-shaped)."""
  (h_s, w_s), (h_t, w_t) = student_hw, teacher_hw
  if h_s == 2 * h_t and w_s == 2 * w_t:
    return 'stride2'
  if 2 * h_s == h_t and 2 * w_s == w_t:
    return 'transposed'
  if h_s >= h_t and w_s >= w_t and not (h_s == 2 * h_t or 2 * h_s == h_t):
    return 'valid'
  raise ValueError(
      f'a regressor maps a student map onto the teacher map: {h_s}x{w_s} onto {h_t}x{w_t} is '
      'neither twice nor half the size in both dimensions, nor at least as large; pick other '
      'layer pairs.'
  )


def check_regressible(feature_shapes, pairs, field: str) -> None:
  """Raises, naming the config field and the pair, unless every (teacher, student) pair's
  student map can be regressed onto the teacher's (`regressor_kind`)."""
  for t_name, s_name in pairs:
    try:
      regressor_kind(
          tuple(feature_shapes['student'][s_name].shape[1:3]),
          tuple(feature_shapes['teacher'][t_name].shape[1:3]),
      )
    except ValueError as e:
      raise ValueError(f'config.{field} {t_name}:{s_name}: {e}') from None


class Regressor(nn.Module):
  """(n, h_s, w_s, c_s) -> (n, h_t, w_t, c_t): `ConvReg` of zoo/Our_1.py (and RepDistiller).

  By the heights (as that code decides; widths follow): a 3x3 stride-2 convolution with padding
  1 when h_s = 2 h_t; a 4x4 stride-2 transposed convolution with padding 1 (PyTorch's
  convention: output 2 h_s) when h_s = h_t / 2; otherwise a (1 + h_s - h_t) x (1 + w_s - w_t)
  valid convolution (1x1 for equal sizes). Each with a bias, as PyTorch's default; then batch
  norm (PyTorch's momentum 0.1, epsilon 1e-5) and, with use_relu, ReLU. Initialisation is
  Flax's default (LeCun normal kernels, zero biases), not PyTorch's (Kaiming uniform); the
  running variance is the biased one (PyTorch keeps the unbiased).
  """

  target_shape: tuple[int, int, int]  # (h_t, w_t, c_t)
  use_relu: bool = True
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    h_t, w_t, c_t = self.target_shape
    h_s, w_s = x.shape[1:3]
    kind = regressor_kind((h_s, w_s), (h_t, w_t))
    if kind == 'stride2':
      x = nn.Conv(c_t, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), name='conv')(x)
    elif kind == 'transposed':
      # PyTorch's ConvTranspose2d(k=4, s=2, p=1) is XLA's transposed convolution padded by
      # k - 1 - p = 2 on each side, with the kernel flipped (transpose_kernel).
      x = nn.ConvTranspose(
          c_t,
          (4, 4),
          strides=(2, 2),
          padding=((2, 2), (2, 2)),
          transpose_kernel=True,
          name='conv',
      )(x)
    else:
      x = nn.Conv(c_t, (1 + h_s - h_t, 1 + w_s - w_t), padding='VALID', name='conv')(x)
    x = nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        axis_name=self.axis_name,
        name='bn',
    )(x)
    return nn.relu(x) if self.use_relu else x


class RegressorHeads(nn.Module):
  """One `Regressor` per (student feature -> teacher shape) pair; returns {'<pair key>': map}."""

  pairs: Sequence[tuple[str, str, tuple[int, int, int]]]  # (key, student feature, target shape)
  use_relu: bool = True
  axis_name: str | None = None

  @nn.compact
  def __call__(self, features, train: bool) -> dict[str, jax.Array]:
    return {
        key: Regressor(tuple(shape), self.use_relu, self.axis_name, name=f'regressor_{key}')(
            features[source], train
        )
        for key, source, shape in self.pairs
    }
