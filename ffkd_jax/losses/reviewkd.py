"""ReviewKD: Chen, Liu, Zhao, Jia, "Distilling Knowledge via Knowledge Review", CVPR 2021: the
hierarchical context loss (HCL).

As megvii-research/mdistiller computes it (mdistiller/distillers/ReviewKD.py l. 11,
`hcl_loss`; the same as `hcl` in dvlab-research/ReviewKD CIFAR-100/model/reviewkd.py), for each
level k of a student's fused map F_k and the teacher's map T_k of the same shape:

  HCL_k = (MSE(F_k, T_k) + sum_{l in (4, 2, 1), l < h_k} 2^-j(l) MSE(P_l(F_k), P_l(T_k)))
          / (1 + sum_{l in (4, 2, 1), l < h_k} 2^-j(l))
  HCL   = sum_k HCL_k

MSE the mean over every element (`F.mse_loss(reduction='mean')`), P_l the adaptive average pool
to l x l (`F.adaptive_avg_pool2d`), h_k the map's height, and j(l) = 1, 2, 3 for the first,
second, third pool taken (the weights halve from 1/2 with every pool that is taken, so a map of
height 4 gets weights 1/2 and 1/4 for l = 2 and l = 1, not the 1/4 and 1/8 of l's place in
(4, 2, 1)). A 1x1 map (the pooled embedding) is its plain MSE.

NHWC here (the reference is NCHW); only the height decides which pools are taken, as in the
reference, and every pool is l x l. The adaptive pool is PyTorch's for any size: output bin i
averages input rows floor(i h / l) to ceil((i + 1) h / l) - 1 (and columns alike), so the bins
are equal windows where l divides the size (every map of the model zoo: 32, 16, 8, 4, 2, 1) and
PyTorch's overlapping uneven ones where it does not (e.g. 7 -> 4); nothing is refused.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

POOL_SIZES = (4, 2, 1)


def adaptive_pool_matrix(size: int, out: int) -> np.ndarray:
  """(out, size) averaging matrix of PyTorch's adaptive average pool along one axis: row i
  averages inputs floor(i size / out) .. ceil((i + 1) size / out) - 1."""
  matrix = np.zeros((out, size), np.float32)
  for i in range(out):
    start = (i * size) // out
    end = -((-(i + 1) * size) // out)  # ceil
    matrix[i, start:end] = 1.0 / (end - start)
  return matrix


def adaptive_avg_pool(x: jax.Array, out: int) -> jax.Array:
  """(n, h, w, c) -> (n, out, out, c): PyTorch's `adaptive_avg_pool2d(x, (out, out))` in NHWC."""
  h, w = x.shape[1:3]
  rows = jnp.asarray(adaptive_pool_matrix(h, out), x.dtype)  # (out, h)
  cols = jnp.asarray(adaptive_pool_matrix(w, out), x.dtype)  # (out, w)
  return jnp.einsum('ih,nhwc,jw->nijc', rows, x, cols, precision=jax.lax.Precision.HIGHEST)


def hcl_level(student: jax.Array, teacher: jax.Array) -> jax.Array:
  """HCL_k of one level: the full-resolution MSE and the pooled ones, weights halving.

  Args:
    student: (n, h, w, c) the student's fused map at the teacher's shape.
    teacher: (n, h, w, c) the teacher's map (the caller stops its gradient).
  Returns:
    A scalar >= 0.
  """
  if student.ndim != 4 or student.shape != teacher.shape:
    raise ValueError(
        'hcl_loss needs NHWC student and teacher maps of one shape at every level; got '
        f'student {student.shape} and teacher {teacher.shape}'
    )
  dtype = jnp.promote_types(jnp.promote_types(student.dtype, teacher.dtype), jnp.float32)
  student, teacher = student.astype(dtype), teacher.astype(dtype)
  loss = jnp.mean((student - teacher) ** 2)
  weight, total = 1.0, 1.0
  for size in POOL_SIZES:
    if size >= student.shape[1]:
      continue
    weight /= 2.0
    pooled = adaptive_avg_pool(student, size) - adaptive_avg_pool(teacher, size)
    loss = loss + weight * jnp.mean(pooled**2)
    total += weight
  return loss / total


def hcl_loss(students: Sequence[jax.Array], teachers: Sequence[jax.Array]) -> jax.Array:
  """The hierarchical context loss summed over the levels.

  Args:
    students: the student's fused maps, one (n, h_k, w_k, c_k) array a level.
    teachers: the teacher's maps, in the same order and shapes (a pooled vector as (n, 1, 1, d)).
  Returns:
    A scalar >= 0.
  """
  if len(students) != len(teachers) or not students:
    raise ValueError(
        f'hcl_loss needs as many teacher maps as student maps (at least one); got '
        f'{len(students)} and {len(teachers)}'
    )
  return sum(hcl_level(s, t) for s, t in zip(students, teachers))
