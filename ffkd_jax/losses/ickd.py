"""ICKD: Liu, Shao, Li, Zhang, Guo, Chen, "Exploring Inter-Channel Correlation for
Diversity-preserved Knowledge Distillation", ICCV 2021.

Per example, the inter-channel correlation of a map F (h*w, c) is the c x c Gram matrix
F^T F over the spatial positions, each row L2-normalised (the official code's
`normalize(bmm(f, f^T), dim=2)`); the loss is the squared Frobenius distance, summed over
examples and divided by c * n:

  L_ICKD = sum_n ||G_s(n) - G_t(n)||_F^2 / (c n).

The student map is already projected to the teacher's channels by a connector (the caller's).
Defaults found: weight beta = 2.5 together with KD (tau 4) and CE on CIFAR-100 (ICKD-C
scripts, `-r 1 -a 1 -b 2.5`, as seen in third-party copies; the official repository was not in
the index), on the last stage's map.

Invariant to scaling each example's map (each example's Gram matrix scales by s^2 and the row
normalisation removes it) and to permuting spatial positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ffkd_jax.losses._numerics import l2_normalize


def channel_correlation(feature_map: jax.Array) -> jax.Array:
  """(n, h, w, c) -> (n, c, c) per-example channel Gram matrices, rows L2-normalised."""
  n, c = feature_map.shape[0], feature_map.shape[-1]
  f = feature_map.reshape(n, -1, c).astype(jnp.promote_types(feature_map.dtype, jnp.float32))
  gram = jnp.einsum('npc,npd->ncd', f, f)  # (n, c, c)
  return l2_normalize(gram, axis=-1)


def ickd_loss(student: jax.Array, teacher: jax.Array) -> jax.Array:
  """Inter-channel correlation loss sum_n ||G_s - G_t||_F^2 / (c n).

  Args:
    student: (n, h, w, c) connector-mapped student map.
    teacher: (n, h', w', c) teacher map (spatial sizes may differ; channels must match).
  Returns:
    A scalar.
  """
  if (
      student.ndim != 4
      or teacher.ndim != 4
      or student.shape[0] != teacher.shape[0]
      or student.shape[-1] != teacher.shape[-1]
  ):
    raise ValueError(
        f'ickd_loss needs NHWC maps with the same n and c (project the student with a '
        f'connector first); got student {student.shape} and teacher {teacher.shape}'
    )
  n, c = student.shape[0], student.shape[-1]
  diff = channel_correlation(student) - channel_correlation(teacher)  # (n, c, c)
  return jnp.sum(diff * diff) / (c * n)
