"""AT: Zagoruyko, Komodakis, "Paying More Attention to Attention: Improving the Performance of
Convolutional Neural Networks via Attention Transfer", ICLR 2017.

Attention map of F (n, h, w, c): Q = mean_c |F|^p, flattened to (n, h*w) and L2-normalised per
example. Loss for one layer pair: mean over all n * h * w entries of (Q_s - Q_t)^2, as in
RepDistiller / mdistiller (`(at(f_s) - at(f_t)).pow(2).mean()`, which use f^p; |f|^p is the
same for the default even p). Defaults found: p = 2, weight 1000 (RepDistiller beta,
mdistiller AT.LOSS.FEAT_WEIGHT; the paper's beta = 1000 with beta/2 per pair), summed over the
stage pairs, CE weight 1.

Spatial sizes must match; resizing (adaptive average pooling of the larger map) is the
caller's job. Channel counts may differ. Invariant to scaling either map.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ffkd_jax.losses._numerics import l2_normalize


def attention_map(feature_map: jax.Array, p: float = 2.0) -> jax.Array:
  """(n, h, w, c) -> (n, h*w) L2-normalised spatial attention mean_c |F|^p."""
  f = feature_map.astype(jnp.promote_types(feature_map.dtype, jnp.float32))
  attention = jnp.mean(jnp.abs(f) ** p, axis=-1)  # (n, h, w)
  return l2_normalize(attention.reshape(f.shape[0], -1), axis=-1)


def at_loss(student: jax.Array, teacher: jax.Array, p: float = 2.0) -> jax.Array:
  """Attention transfer loss mean((Q_s - Q_t)^2) for one stage pair.

  Args:
    student: (n, h, w, c_s) student map.
    teacher: (n, h, w, c_t) teacher map with the same n, h, w.
    p: power of |F| (2 in the paper).
  Returns:
    A scalar.
  """
  if student.ndim != 4 or teacher.ndim != 4 or student.shape[:3] != teacher.shape[:3]:
    raise ValueError(
        f'at_loss needs NHWC maps with the same batch and spatial size (pool the larger map '
        f'first); got student {student.shape} and teacher {teacher.shape}'
    )
  diff = attention_map(student, p) - attention_map(teacher, p)
  return jnp.mean(diff * diff)
