"""RKD: Park, Kim, Lu, Cho, "Relational Knowledge Distillation", CVPR 2019.

For embeddings e (n, d) (maps are flattened per example):

Distance-wise: psi_D(i, j) = ||e_i - e_j||_2 / mu, mu = mean of the off-diagonal distances;
  L_D = mean over all n^2 pairs (diagonal included, as 0 vs 0) of Huber(psi_D^s - psi_D^t).
Angle-wise: psi_A(i, j, k) = <unit(e_j - e_i), unit(e_k - e_i)>, the cosine of the angle at
  anchor i (unit(0) = 0, so triplets with j == i or k == i give 0);
  L_A = mean over all n^3 triplets of Huber(psi_A^s - psi_A^t).
Huber is smooth L1 with delta 1. This follows RepDistiller's RKDLoss (HobbitLong/RepDistiller,
distiller_zoo/RKD.py): squared distances clamped at 1e-12 before the square root, and the mean
over the positive distances, which after that clamp are exactly the off-diagonal ones.

Defaults found: w_D = 25, w_A = 50 (paper and RepDistiller / mdistiller), applied by the caller,
on the penultimate embedding, with CE weight 1. Both terms are statistics over the batch: pass
the global batch. Memory is O(n^2 d) (pairwise differences), so pass pooled embeddings.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ffkd_jax.losses._numerics import flatten_examples, smooth_l1


def _distances_and_directions(e: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
  """e (n, d) -> distances (n, n) with zero diagonal, unit differences (n, n, d)."""
  diff = e[None, :, :] - e[:, None, :]  # (n, n, d): diff[i, j] = e_j - e_i
  squared = jnp.sum(diff * diff, axis=-1)  # (n, n)
  clamped = jnp.sqrt(jnp.maximum(squared, eps))  # (n, n), >= sqrt(eps), finite gradient
  # diff[i, i] is exactly 0, so its unit vector is exactly 0, as F.normalize gives.
  directions = diff / clamped[..., None]  # (n, n, d)
  n = e.shape[0]
  distances = jnp.where(jnp.eye(n, dtype=bool), 0.0, clamped)  # (n, n)
  return distances, directions


def _normalized_distances(distances: jax.Array) -> jax.Array:
  n = distances.shape[0]
  mean_off_diagonal = jnp.sum(distances) / (n * (n - 1))
  return distances / mean_off_diagonal


def rkd_loss(
    student: jax.Array, teacher: jax.Array, eps: float = 1e-12
) -> tuple[jax.Array, jax.Array]:
  """RKD distance-wise and angle-wise losses, returned separately (weights by the caller).

  Both are invariant to scaling and translating either embedding, and to rotating it.
  No stop-gradient inside.

  Args:
    student: (n, ...) student embeddings (global batch), flattened per example.
    teacher: (n, ...) teacher embeddings (global batch); the feature size may differ.
    eps: clamp on squared distances before the square root.
  Returns:
    (distance_loss, angle_loss), two scalars.
  """
  student = flatten_examples(student)
  teacher = flatten_examples(teacher)
  if student.shape[0] != teacher.shape[0] or student.shape[0] < 2:
    raise ValueError(
        f'rkd_loss needs the same number (>= 2) of student and teacher examples; got shapes '
        f'{student.shape} and {teacher.shape}'
    )
  dtype = jnp.promote_types(student.dtype, jnp.float32)
  d_s, dir_s = _distances_and_directions(student.astype(dtype), eps)
  d_t, dir_t = _distances_and_directions(teacher.astype(dtype), eps)
  distance_loss = jnp.mean(smooth_l1(_normalized_distances(d_s), _normalized_distances(d_t)))
  angle_s = jnp.einsum('ijd,ikd->ijk', dir_s, dir_s)  # (n, n, n)
  angle_t = jnp.einsum('ijd,ikd->ijk', dir_t, dir_t)  # (n, n, n)
  angle_loss = jnp.mean(smooth_l1(angle_s, angle_t))
  return distance_loss, angle_loss
