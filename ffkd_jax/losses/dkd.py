"""DKD: Zhao, Cui, Song, Qiu, Liang, "Decoupled Knowledge Distillation", CVPR 2022.

The softened KL of KD is split, per example, into a target-class part and a non-target part:

  TCKD = tau^2 mean_n KL(b_T || b_S),   b = (p_y, 1 - p_y)      the binary target / rest split
  NCKD = tau^2 mean_n KL(p~_T || p~_S), p~_k = p_k / (1 - p_y)  over the classes k != y
  DKD  = alpha TCKD + beta NCKD

with p = softmax(z / tau) and y the label (KD = TCKD + (1 - p_T,y) NCKD per example, the
paper's identity). This follows megvii-research/mdistiller, mdistiller/distillers/DKD.py
(`dkd_loss`: `kl_div(..., size_average=False) * T^2 / n`, i.e. summed over the bins or classes,
averaged over examples).

Numerics, where this departs from the reference's arithmetic (not its value): the reference takes
`torch.log` of the two summed probabilities (log 0 = -inf where p_y rounds to 1) and drops the
target class from the non-target softmax by subtracting 1000 from its logit. Here every
log-probability comes from log-sum-exps of the logits: log p_y = z_y - lse(z), log(1 - p_y) =
lse_{k != y}(z) - lse(z), log p~_k = z_k - lse_{k != y}(z), with the target class masked out of
the sum, so values and gradients stay finite for any logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _check_inputs(student_logits, teacher_logits, labels) -> None:
  if (
      student_logits.ndim != 2
      or student_logits.shape != teacher_logits.shape
      or labels.shape != student_logits.shape[:1]
  ):
    raise ValueError(
        'dkd needs (n, classes) student and teacher logits of one shape and (n,) labels; got '
        f'{student_logits.shape}, {teacher_logits.shape} and {labels.shape}'
    )
  if student_logits.shape[-1] < 2:
    raise ValueError(f'dkd needs at least 2 classes; got logits {student_logits.shape}')


def _decoupled_log_probs(scaled: jax.Array, target: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(n, k) logits / tau and the (n, k) target mask -> (n, 2) log(p_y, 1 - p_y) and (n, k)
  log p~ (meaningful off the target class only)."""
  lse_all = jax.nn.logsumexp(scaled, axis=-1)  # (n,)
  lse_other = jax.nn.logsumexp(scaled, axis=-1, where=~target)  # (n,)
  target_logit = jnp.sum(jnp.where(target, scaled, 0.0), axis=-1)  # (n,)
  log_binary = jnp.stack([target_logit - lse_all, lse_other - lse_all], axis=-1)  # (n, 2)
  log_other = scaled - lse_other[:, None]  # (n, k)
  return log_binary, log_other


def decoupled_kl(
    student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array, temperature: float
) -> tuple[jax.Array, jax.Array]:
  """(TCKD, NCKD) of the batch, each tau^2 times a mean over examples.

  Args:
    student_logits: (n, k) logits of the distributions being fitted.
    teacher_logits: (n, k) logits of the targets (used as given: the caller stop-gradients them).
    labels: (n,) integer classes y in [0, k).
    temperature: tau > 0.
  Returns:
    Two scalars >= 0.
  """
  _check_inputs(student_logits, teacher_logits, labels)
  dtype = jnp.promote_types(
      jnp.promote_types(student_logits.dtype, teacher_logits.dtype), jnp.float32
  )
  target = jax.nn.one_hot(labels, student_logits.shape[-1], dtype=jnp.bool_)  # (n, k)
  log_bs, log_os = _decoupled_log_probs(student_logits.astype(dtype) / temperature, target)
  log_bt, log_ot = _decoupled_log_probs(teacher_logits.astype(dtype) / temperature, target)
  tckd = jnp.sum(jnp.exp(log_bt) * (log_bt - log_bs), axis=-1)  # (n,)
  other_terms = jnp.where(target, 0.0, jnp.exp(log_ot) * (log_ot - log_os))  # (n, k)
  nckd = jnp.sum(other_terms, axis=-1)  # (n,)
  scale = temperature**2
  return scale * jnp.mean(tckd), scale * jnp.mean(nckd)


def dkd_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    labels: jax.Array,
    alpha: float,
    beta: float,
    temperature: float,
) -> jax.Array:
  """alpha TCKD + beta NCKD (see `decoupled_kl`): mdistiller's `dkd_loss`, the same arguments."""
  tckd, nckd = decoupled_kl(student_logits, teacher_logits, labels, temperature)
  return alpha * tckd + beta * nckd
