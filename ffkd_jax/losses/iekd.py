"""IE-KD: Huang, Shen, Xing, Liu, Tian, Li, Deng, Huang, Hua, "Revisiting Knowledge
Distillation: An Inheritance and Exploration Framework", CVPR 2021.

The teacher's knowledge is compressed into factors (codes) by an auto-encoder; the student's
features are split into an inheritance part and an exploration part, each encoded to a code.
With codes flattened per example and L2-normalised, norm(f) = f / ||f||_2:

  L_rec = mean |x - x_rec|                                   (auto-encoder, L1)
  D(a, b) = mean over n and features of |norm(a) - norm(b)|   (FT's factor distance, p = 1)
  L_inh = D(student_inheritance_code, teacher_code)           (similarity: pull together)
  L_exp = -D(student_exploration_code, teacher_code)          (dis-similarity: push apart)

This follows the official code (aliyun/Revisiting-Knowledge-Distillation-an-Inheritance-and-
Exploration-Framework): `RecLoss(norm=1)` = sum|x - y| / numel, `FTLoss(norm=1)` =
||norm(x) - norm(y)||_1 / numel (numel = n * features), and the exploration loss is
`NormLoss(negative=True)` = -FTLoss. L_exp is bounded below by -2 / sqrt(features), so it
cannot run away. Defaults found: inheritance and exploration weights 1 each
(`*_loss_weight_decay: base: 1`), with CE weight 1; the auto-encoder that makes the codes is
trained first (30 epochs in config/ie_kd.yaml) with L_rec alone, then kept fixed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ffkd_jax.losses._numerics import flatten_examples, l2_normalize


def autoencoder_reconstruction_loss(x: jax.Array, x_rec: jax.Array) -> jax.Array:
  """L1 reconstruction loss mean |x - x_rec| over all elements.

  Args:
    x: (n, ...) auto-encoder input (features).
    x_rec: (n, ...) its reconstruction.
  Returns:
    A scalar.
  """
  if x.shape != x_rec.shape:
    raise ValueError(
        f'autoencoder_reconstruction_loss needs x and its reconstruction in the same shape; '
        f'got {x.shape} and {x_rec.shape}'
    )
  return jnp.mean(jnp.abs(x - x_rec))


def factor_distance(a: jax.Array, b: jax.Array) -> jax.Array:
  """FT factor distance: mean over n and features of |a/||a||_2 - b/||b||_2| (per example)."""
  if a.shape != b.shape:
    raise ValueError(
        f'factor_distance needs codes of the same shape; got {a.shape} and ' f'{b.shape}'
    )
  dtype = jnp.promote_types(jnp.promote_types(a.dtype, b.dtype), jnp.float32)
  a_unit = l2_normalize(flatten_examples(a).astype(dtype), axis=-1)  # (n, d)
  b_unit = l2_normalize(flatten_examples(b).astype(dtype), axis=-1)  # (n, d)
  return jnp.mean(jnp.abs(a_unit - b_unit))


def inheritance_loss(student_code: jax.Array, teacher_code: jax.Array) -> jax.Array:
  """Inheritance (similarity) loss: factor_distance(student_code, teacher_code).

  Args:
    student_code: (n, ...) code of the student's inheritance part.
    teacher_code: (n, ...) teacher's code (same shape).
  Returns:
    A scalar >= 0.
  """
  return factor_distance(student_code, teacher_code)


def exploration_loss(student_code: jax.Array, teacher_code: jax.Array) -> jax.Array:
  """Exploration (dis-similarity) loss: -factor_distance(student_code, teacher_code).

  Minimising it pushes the exploration part's normalised code away from the teacher's.

  Args:
    student_code: (n, ...) code of the student's exploration part.
    teacher_code: (n, ...) teacher's code (same shape).
  Returns:
    A scalar <= 0.
  """
  return -factor_distance(student_code, teacher_code)
