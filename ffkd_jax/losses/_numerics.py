"""Small numerically safe helpers shared by the loss files (finite values and gradients at 0)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def safe_sqrt(s: jax.Array) -> jax.Array:
  """sqrt(s) for s >= 0 with gradient 0 (not inf or NaN) where s == 0."""
  positive = s > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, s, 1.0)), 0.0)


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||_2, eps) along `axis` (PyTorch's F.normalize), finite gradients at x = 0."""
  squared_norm = jnp.sum(x * x, axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(squared_norm, eps * eps))


def smooth_l1(x: jax.Array, y: jax.Array) -> jax.Array:
  """Elementwise Huber / smooth L1 with delta 1: 0.5 d^2 if |d| < 1 else |d| - 0.5."""
  d = jnp.abs(x - y)
  return jnp.where(d < 1.0, 0.5 * d * d, d - 0.5)


def flatten_examples(x: jax.Array) -> jax.Array:
  """(n, ...) -> (n, prod(...))."""
  return x.reshape(x.shape[0], -1)


def check_same_examples(loss: str, student: jax.Array, teacher: jax.Array) -> None:
  """Raises unless the two arrays hold the same number of examples (their first axis)."""
  if student.shape[0] != teacher.shape[0]:
    raise ValueError(
        f'{loss} needs the same number of student and teacher examples; got shapes '
        f'{student.shape} and {teacher.shape}'
    )
