"""CD: Zhou, Zhuge, Guan, Liu, "Channel Distillation: Channel-Wise Attention for Knowledge
Distillation", arXiv:2006.01683, 2020: channel distillation and guided KD.

As wp502/SKD-RSL implements them (zoo/CD.py, the code FFKD's paper was compared with):

  - `channel_distillation_loss` (its `CDLoss`, one stage pair): the per-channel global average of
    the embedded student map against the teacher's, squared and averaged over (n, c):
      mean_{n,c} (GAP(embed(V))_{n,c} - GAP(U)_{n,c})^2;
    the embedding (a 1x1 convolution and batch norm, to the teacher's channels) is the caller's.
  - `guided_kd_loss` (its `KDLossv2`): KD on the examples the teacher classifies correctly only,
      T^2 sum_{n: argmax p_T,n = y_n} KL(p_T,n || p_S,n) / count,
    p = softmax(z / T), count = the number of such examples (`kl_div(..., reduction='sum') *
    T^2 / count`).

Departures, both on degenerate inputs only:
  - count = 0 (the teacher wrong on every example): the reference divides 0 by 0 (NaN); here the
    loss is 0, the value of an empty sum with nothing to imitate.
  - The reference sets every exactly-zero teacher probability to 1 (`correct_t[correct_t == 0.0]
    = 1.0`, so that the masked rows contribute 1 log 1 = 0); on a correctly classified row a
    teacher probability that underflows to 0 then adds -log q to the sum. Here KL uses
    0 log 0 = 0 throughout; for probabilities that do not underflow the two are equal.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def channel_distillation_loss(student: jax.Array, teacher: jax.Array) -> jax.Array:
  """mean_{n,c} (GAP(student) - GAP(teacher))^2 of one stage pair.

  Args:
    student: (n, h, w, c) the student's map, already embedded to the teacher's c channels.
    teacher: (n, h', w', c) the teacher's map (spatial sizes may differ: only channel means count).
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
        'channel_distillation_loss needs NHWC maps with the same n and c (embed the student '
        f'first); got student {student.shape} and teacher {teacher.shape}'
    )
  dtype = jnp.promote_types(jnp.promote_types(student.dtype, teacher.dtype), jnp.float32)
  student_means = jnp.mean(student.astype(dtype), axis=(1, 2))  # (n, c)
  teacher_means = jnp.mean(teacher.astype(dtype), axis=(1, 2))  # (n, c)
  return jnp.mean((student_means - teacher_means) ** 2)


def guided_kd_loss(
    student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array, temperature: float
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Guided KD: T^2 x the KL summed over the examples the teacher gets right, / their count.

  A ratio over the batch: the caller passes the global batch. The teacher is used as given
  (the caller stop-gradients it).

  Args:
    student_logits: (n, k).
    teacher_logits: (n, k).
    labels: (n,) integer classes.
    temperature: T > 0.
  Returns:
    (loss, {'teacher_correct': the share of the n examples the teacher classifies correctly}); the
    loss is 0 where that share is 0.
  """
  if student_logits.shape != teacher_logits.shape or labels.shape != student_logits.shape[:1]:
    raise ValueError(
        'guided_kd_loss needs (n, classes) student and teacher logits of one shape and (n,) '
        f'labels; got {student_logits.shape}, {teacher_logits.shape} and {labels.shape}'
    )
  dtype = jnp.promote_types(
      jnp.promote_types(student_logits.dtype, teacher_logits.dtype), jnp.float32
  )
  log_q = jax.nn.log_softmax(student_logits.astype(dtype) / temperature)  # (n, k)
  log_p = jax.nn.log_softmax(teacher_logits.astype(dtype) / temperature)  # (n, k)
  p = jnp.exp(log_p)
  correct = jnp.argmax(p, axis=-1) == labels.astype(jnp.int32)  # (n,)
  count = jnp.sum(correct.astype(log_p.dtype))
  kl = jnp.sum(p * (log_p - log_q), axis=-1)  # (n,)
  total = jnp.sum(jnp.where(correct, kl, 0.0))
  loss = jnp.where(count > 0, temperature**2 * total / jnp.maximum(count, 1.0), 0.0)
  return loss, {'teacher_correct': count / correct.shape[0]}
