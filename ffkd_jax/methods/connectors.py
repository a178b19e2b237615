"""Student-side connectors: map a student feature map onto its teacher's shape.

A connector is a 1x1 convolution and batch norm from the student's channels to the teacher's,
preceded by average pooling when the student's map is spatially larger (docs/FFKD.md).
"""

from typing import Sequence

import flax.linen as nn
import jax


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
