"""The zoo's batch norm: Flax's `nn.BatchNorm` forward, with its training gradient written out.

`BatchNorm` has Flax's variables (params `scale`, `bias`; batch_stats `mean`, `var`), its
defaults as `layers.batch_norm` sets them, and its arithmetic: statistics in float32 as
E[x] and E[x^2] - E[x]^2 clipped at 0 (`use_fast_variance`), averaged over `axis_name` with one
`pmean`, y = (x - mean) * rsqrt(var + eps) * scale + bias cast to `dtype`, running averages
`momentum * old + (1 - momentum) * batch` of the (biased) batch statistics, left alone while
initialising. So checkpoints, `import_torch` and every number of a forward pass are unchanged.

What differs is the backward pass of a training-mode call. Autodiff of that forward gives XLA a
graph with a reduction and a broadcast per intermediate (mean, E[x^2], the clip, rsqrt, the
scale), which XLA's CPU backend runs as several passes over the activation. Here the gradient is
the textbook one (Ioffe & Szegedy 2015, as PyTorch's `batch_norm_backward` computes it), in two
passes: one reading (dy, x) for the per-channel sums

    db = sum(dy),  ds = sum(dy * xhat),  xhat = (x - mean) * rsqrt(var + eps)

(summed over `axis_name` too: the statistics are the global batch's), and one writing

    dx = scale * rsqrt(var + eps) * (dy - db / M - xhat * ds / M)
         + (dmean + 2 * dvar * (x - mean)) / M

with M the global number of positions; dmean, dvar are the cotangents of the returned batch
statistics (zero in training, where those only feed the running averages; kept so the VJP is
exact). The clip of a negative variance at 0 is treated as inactive in the gradient.
On the 2-core CPU this took a 9-block CIFAR stage's forward + backward from 279 to 232 ms
(benchmarks/README.md). The same formula is correct on every backend, so it is used everywhere.

ds is summed over dy * (x - mean), not as sum(dy * x) - mean * sum(dy). That one-pass form was
5-10% faster on the CPU (XLA merges this x - mean with the forward's and writes it out as a
whole tensor, since its YNNPACK reductions cannot take a broadcast subtraction in), but it
loses to cancellation: with it, tests/test_multihost.py's one- and two-process FFKD runs, which
differ only in the order of float32 sums, ended 2.6e-4 apart after two steps instead of 6e-6
(2026-12-01), so it was reverted.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from ffkd_jax.models import conv

Dtype = Any
_AXES = (0, 1, 2)  # NHWC: every axis but the channels


def _stats(xf, axis_name):
  mean = jnp.mean(xf, _AXES)
  mean_sq = jnp.mean(xf * xf, _AXES)
  if axis_name is not None:
    mean, mean_sq = lax.pmean(jnp.stack([mean, mean_sq]), axis_name)
  return mean, jnp.maximum(0.0, mean_sq - mean * mean)


def _count(x, axis_name):
  count = x.shape[0] * x.shape[1] * x.shape[2]
  return count * lax.axis_size(axis_name) if axis_name is not None else count


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def batch_norm_train(x, scale, bias, axis_name, epsilon, dtype):
  """Training-mode batch norm of NHWC `x`: returns (y, batch mean, batch variance)."""
  return _forward(x, scale, bias, axis_name, epsilon, dtype)[0]


def _forward(x, scale, bias, axis_name, epsilon, dtype):
  xf = x.astype(jnp.float32)
  mean, var = _stats(xf, axis_name)
  inv = lax.rsqrt(var + epsilon)
  y = ((xf - mean) * (inv * scale) + bias).astype(dtype)
  return (y, mean, var), (x, scale, mean, inv)


def _backward(axis_name, epsilon, dtype, residuals, cotangents):
  del epsilon, dtype
  x, scale, mean, inv = residuals
  dy, dmean, dvar = cotangents
  xf = x.astype(jnp.float32)
  g = dy.astype(jnp.float32)
  centred = xf - mean
  db = jnp.sum(g, _AXES)
  ds = jnp.sum(g * centred, _AXES) * inv  # sum(dy * xhat), the scaling outside the reduction
  if axis_name is not None:
    db, ds = lax.psum(jnp.stack([db, ds]), axis_name)
  count = _count(x, axis_name)
  dx = (scale * inv) * (g - db / count - centred * (inv * ds / count))
  dx = dx + (dmean + 2.0 * dvar * centred) / count
  return (
      conv.match_cotangent(dx.astype(x.dtype), x),
      conv.match_cotangent(ds.astype(scale.dtype), scale),
      conv.match_cotangent(db.astype(scale.dtype), scale),
  )


batch_norm_train.defvjp(_forward, _backward)


class BatchNorm(nn.Module):
  """`nn.BatchNorm` over the channels of NHWC (or (n, c)) inputs; see the module docstring."""

  use_running_average: bool = False
  momentum: float = 0.9
  epsilon: float = 1e-5
  axis_name: str | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (features,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (features,), jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (features,), jnp.float32)
    if self.use_running_average:
      inv = lax.rsqrt(ra_var.value + self.epsilon)
      return ((x - ra_mean.value) * (inv * scale) + bias).astype(self.dtype)
    spatial = x.reshape(x.shape[0], 1, 1, features) if x.ndim == 2 else x
    if spatial.ndim != 4:
      raise ValueError(f'BatchNorm takes (n, h, w, c) or (n, c) inputs, got shape {x.shape}')
    y, mean, var = batch_norm_train(
        spatial, scale, bias, self.axis_name, self.epsilon, jnp.dtype(self.dtype)
    )
    if not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * var
    return y.reshape(x.shape)
