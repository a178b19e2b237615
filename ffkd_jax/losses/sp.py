"""SP: Tung, Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019.

For maps flattened per example, F (n, d):  G = row_normalise(F F^T) (each row of the n x n
similarity matrix divided by its L2 norm), and

  L_SP = ||G_t - G_s||_F^2 / n^2.

As in RepDistiller / mdistiller (`similarity_loss`). Defaults found: weight 3000 (RepDistiller
beta, mdistiller SP.LOSS.FEAT_WEIGHT) on the last stage's map, CE weight 1.

Invariant to a global scaling of either map and to permuting the examples of both; not to
per-example scaling (row normalisation removes example i's own scale from row i, but its
columns keep the other examples' scales). A statistic over the batch: pass the global batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ffkd_jax.losses._numerics import check_same_examples, flatten_examples, l2_normalize


def similarity_matrix(feature_map: jax.Array) -> jax.Array:
  """(n, ...) -> (n, n) row-L2-normalised Gram matrix of the flattened examples."""
  f = flatten_examples(feature_map).astype(jnp.promote_types(feature_map.dtype, jnp.float32))
  return l2_normalize(f @ f.T, axis=1)  # (n, n)


def sp_loss(student: jax.Array, teacher: jax.Array) -> jax.Array:
  """Similarity-preserving loss ||G_t - G_s||_F^2 / n^2.

  Args:
    student: (n, ...) student map (global batch); shapes may differ from the teacher's.
    teacher: (n, ...) teacher map (global batch).
  Returns:
    A scalar.
  """
  check_same_examples('sp_loss', student, teacher)
  n = student.shape[0]
  diff = similarity_matrix(teacher) - similarity_matrix(student)
  return jnp.sum(diff * diff) / (n * n)
