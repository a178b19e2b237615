"""CCS: Li et al., "Knowledge Distillation via Channel Correlation Structure", KSEM 2021 (LNAI
12815): the channel correlation structure of a stage map, within each example and across the
batch, matched between teacher and student.

As wp502/SKD-RSL implements it in zoo/CCS_2.py (`ccs_loss`, the variant its train_student.py
builds as `CCSLoss_2`), for one stage pair of maps with the same channel count c (the student's
already embedded by the caller):

  channel structure (`euclidean_dist_fm_inter` there): per example, the squared Euclidean
    distances between its c channels (each a vector over the spatial positions), (n, c, c);
  example structure (`euclidean_dist_fm_intra` there): the squared Euclidean distances between
    the n examples (each map flattened), (n, n);
  each computed as |a|^2 + |b|^2 - 2 a.b, clamped below at 1e-12, its diagonal set to 0 and
  divided by its largest entry: for the channel structure the largest over the whole (n, c, c)
  array (one scale for the batch, not one per example);

  L = mean (C_S - C_T)^2 + mean (E_S - E_T)^2   (F.mse_loss of each, weights 1 and 1).

Both structures are statistics of the batch: the caller passes the global batch. The code's
names are inter (between channels) and intra (within the batch); the paper's abstract speaks of
intra-instance and inter-instance relations, which are the same two structures.

Departure, for a degenerate input only: where a structure has no positive entry (one example,
or one channel), the code divides 0 by 0 (NaN); here it stays 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

CLAMP_MIN = 1e-12


def _normalized_distances(squared_norms_i, squared_norms_j, products) -> jax.Array:
  """|a|^2 + |b|^2 - 2 a.b, clamped at 1e-12, zero diagonal (the last two axes), / its max."""
  distances = jnp.maximum(squared_norms_i + squared_norms_j - 2.0 * products, CLAMP_MIN)
  size = distances.shape[-1]
  distances = jnp.where(jnp.eye(size, dtype=jnp.bool_), 0.0, distances)
  largest = jnp.max(distances)
  return distances / jnp.where(largest > 0, largest, 1.0)


def channel_distances(feature_map: jax.Array) -> jax.Array:
  """(n, h, w, c) -> (n, c, c): per example, normalised squared distances between channels."""
  n, c = feature_map.shape[0], feature_map.shape[-1]
  f = feature_map.reshape(n, -1, c).astype(jnp.promote_types(feature_map.dtype, jnp.float32))
  squared = jnp.sum(f * f, axis=1)  # (n, c)
  products = jnp.einsum('npc,npd->ncd', f, f)  # (n, c, c)
  return _normalized_distances(squared[:, :, None], squared[:, None, :], products)


def example_distances(feature_map: jax.Array) -> jax.Array:
  """(n, ...) -> (n, n): normalised squared distances between the examples' flattened maps."""
  n = feature_map.shape[0]
  f = feature_map.reshape(n, -1).astype(jnp.promote_types(feature_map.dtype, jnp.float32))
  squared = jnp.sum(f * f, axis=1)  # (n,)
  products = f @ f.T  # (n, n)
  return _normalized_distances(squared[:, None], squared[None, :], products)


def ccs_loss(student: jax.Array, teacher: jax.Array) -> jax.Array:
  """mean (C_S - C_T)^2 + mean (E_S - E_T)^2 of one stage pair (zoo/CCS_2.py `ccs_loss`).

  Args:
    student: (n, h, w, c) the student's embedded map (global batch).
    teacher: (n, h', w', c) the teacher's map (spatial sizes may differ; n and c must match).
  Returns:
    A scalar >= 0.
  """
  if (
      student.ndim != 4
      or teacher.ndim != 4
      or student.shape[0] != teacher.shape[0]
      or student.shape[-1] != teacher.shape[-1]
  ):
    raise ValueError(
        'ccs_loss needs NHWC maps with the same n and c (embed the student first); got '
        f'student {student.shape} and teacher {teacher.shape}'
    )
  channel = jnp.mean((channel_distances(student) - channel_distances(teacher)) ** 2)
  example = jnp.mean((example_distances(student) - example_distances(teacher)) ** 2)
  return channel + example
