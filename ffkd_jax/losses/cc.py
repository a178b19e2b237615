"""CC: Peng, Jin, Liu, Li, Wu, Liu, Zhou, Zhang, "Correlation Congruence for Knowledge
Distillation", ICCV 2019.

The correlation between examples uses a Gaussian RBF kernel approximated by its P-order Taylor
expansion. For L2-normalised embeddings f_i, ||f_i - f_j||^2 = 2 - 2 <f_i, f_j>, so

  k(f_i, f_j) = exp(-gamma ||f_i - f_j||^2) = exp(-2 gamma) exp(2 gamma <f_i, f_j>)
             ~= sum_{p=0}^{P} exp(-2 gamma) (2 gamma)^p / p! <f_i, f_j>^p,
  L_CC = mean over the n x n entries of (C_s - C_t)^2.

Defaults found: gamma = 0.4, P = 2 (AberHu/Knowledge-Distillation-Zoo's CC, the Taylor-RBF form
of the paper). RepDistiller's `Correlation` class is a different, author-emailed variant
(mean_i sum_d |f_s - f_t|_i * |f_s - f_t|_{i+1}), run there with weight beta = 0.02 on 128-d
linear embeddings; the weight for this form is the caller's choice.

A statistic over the batch: pass the global batch.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ffkd_jax.losses._numerics import check_same_examples, flatten_examples, l2_normalize


def correlation_matrix(embedding: jax.Array, gamma: float = 0.4, order: int = 2) -> jax.Array:
  """Taylor-approximated RBF correlation between the L2-normalised rows of `embedding`.

  Args:
    embedding: (n, ...) embeddings, flattened per example.
    gamma: RBF kernel parameter.
    order: P, the highest power kept (static).
  Returns:
    (n, n) symmetric correlation matrix.
  """
  f = l2_normalize(
      flatten_examples(embedding).astype(jnp.promote_types(embedding.dtype, jnp.float32))
  )
  similarity = f @ f.T  # (n, n) cosine similarities
  corr = jnp.zeros_like(similarity)
  power = jnp.ones_like(similarity)
  for p in range(order + 1):  # static, P + 1 terms
    corr = corr + (2.0 * gamma) ** p / math.factorial(p) * power
    power = power * similarity
  return math.exp(-2.0 * gamma) * corr


def cc_loss(
    student: jax.Array, teacher: jax.Array, gamma: float = 0.4, order: int = 2
) -> jax.Array:
  """Correlation congruence: mean((C_s - C_t)^2) over the n x n correlation matrices.

  Symmetric in (student, teacher); invariant to per-example scaling of either input.
  No stop-gradient inside.

  Args:
    student: (n, ...) student embeddings (global batch).
    teacher: (n, ...) teacher embeddings (global batch); feature sizes may differ.
    gamma: RBF kernel parameter.
    order: Taylor order P.
  Returns:
    A scalar.
  """
  check_same_examples('cc_loss', student, teacher)
  diff = correlation_matrix(student, gamma, order) - correlation_matrix(teacher, gamma, order)
  return jnp.mean(diff * diff)
