"""DIST: Huang, You, Wang, Qian, Xu, "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022.

With Y_s = softmax(z_s / tau), Y_t = softmax(z_t / tau), both (n, k), and rho the Pearson
correlation (cosine similarity of mean-centred vectors, with eps in the denominator):

  inter = 1 - mean_i rho(Y_s[i, :], Y_t[i, :])     (relation between classes, per example)
  intra = 1 - mean_c rho(Y_s[:, c], Y_t[:, c])     (relation between examples, per class)
  L_DIST = tau^2 * (beta * inter + gamma * intra)

As in the official code (hunto/DIST_KD, lib/models/losses/dist_kd.py), tau^2 multiplies each
relation term, and rho uses eps = 1e-8 added to the product of norms. Official settings:
beta = gamma = 1; ImageNet tau = 1, KD loss weight 1; CIFAR-100 tau = 4 (kd method
`dist_t4`), KD loss weight 2 (equivalently beta = gamma = 2) with CE weight 1.

The intra-class term is a statistic over the batch: pass the global batch (gather first).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ffkd_jax.losses._numerics import safe_sqrt


def pearson_correlation(a: jax.Array, b: jax.Array, eps: float = 1e-8) -> jax.Array:
  """Row-wise Pearson correlation: cos(a_i - mean(a_i), b_i - mean(b_i)) with eps.

  rho_i = <a~_i, b~_i> / (||a~_i|| ||b~_i|| + eps); a constant row gives 0 (finite gradient).

  Args:
    a: (m, d).
    b: (m, d).
    eps: added to the product of norms.
  Returns:
    (m,) correlations.
  """
  a = a - jnp.mean(a, axis=-1, keepdims=True)
  b = b - jnp.mean(b, axis=-1, keepdims=True)
  norm_a = safe_sqrt(jnp.sum(a * a, axis=-1))  # (m,)
  norm_b = safe_sqrt(jnp.sum(b * b, axis=-1))  # (m,)
  return jnp.sum(a * b, axis=-1) / (norm_a * norm_b + eps)


def inter_class_relation(y_s: jax.Array, y_t: jax.Array, eps: float = 1e-8) -> jax.Array:
  """1 - mean over examples of the Pearson correlation of the probability rows.

  Args:
    y_s: (n, k) student probabilities.
    y_t: (n, k) teacher probabilities.
  Returns:
    A scalar in [0, 2].
  """
  return 1.0 - jnp.mean(pearson_correlation(y_s, y_t, eps))


def intra_class_relation(y_s: jax.Array, y_t: jax.Array, eps: float = 1e-8) -> jax.Array:
  """1 - mean over classes of the Pearson correlation of the probability columns (over n).

  Args:
    y_s: (n, k) student probabilities (global batch).
    y_t: (n, k) teacher probabilities (global batch).
  Returns:
    A scalar in [0, 2].
  """
  return 1.0 - jnp.mean(pearson_correlation(y_s.T, y_t.T, eps))


def dist_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    temperature: float = 1.0,
    beta: float = 1.0,
    gamma: float = 1.0,
    eps: float = 1e-8,
) -> jax.Array:
  """DIST loss tau^2 * (beta * inter + gamma * intra) on softmax(z / tau).

  Invariant to adding a per-example constant to either side's logits. No stop-gradient
  inside: the caller stops the teacher's gradient where it should.

  Args:
    student_logits: (n, k) student logits (global batch).
    teacher_logits: (n, k) teacher logits (global batch).
    temperature: tau.
    beta: inter-class weight.
    gamma: intra-class weight.
    eps: Pearson denominator epsilon.
  Returns:
    A scalar.
  """
  if student_logits.shape != teacher_logits.shape:
    raise ValueError(
        f'dist_loss needs student and teacher logits of the same shape; got '
        f'{student_logits.shape} and {teacher_logits.shape}'
    )
  dtype = jnp.promote_types(student_logits.dtype, jnp.float32)
  y_s = jax.nn.softmax(student_logits.astype(dtype) / temperature, axis=-1)  # (n, k)
  y_t = jax.nn.softmax(teacher_logits.astype(dtype) / temperature, axis=-1)  # (n, k)
  inter = inter_class_relation(y_s, y_t, eps)
  intra = intra_class_relation(y_s, y_t, eps)
  return temperature**2 * (beta * inter + gamma * intra)
