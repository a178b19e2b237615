"""Classification losses and metrics: cross-entropy, Hinton's softened KL, top-k correctness,
and the logit standardisation that any logit-distillation term can apply first.

KD: Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network" (NIPS 2014 workshop).
RepDistiller / mdistiller CIFAR-100 defaults: tau = 4, CE weight 0.1, KD weight 0.9.
Logit standardisation: Sun, Ren, Li, Wang, Cao, "Logit Standardization in Knowledge
Distillation", CVPR 2024.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ffkd_jax.losses._numerics import safe_sqrt

STANDARDIZE_EPS = 1e-7


def standardize_logits(logits: jax.Array) -> jax.Array:
  """Z-score of each example's logits over the classes: (z - mean(z)) / (1e-7 + std(z)).

  As `normalize` of sunshangquan/logit-standardization-KD, mdistiller/distillers/KD.py and
  DKD.py, whose `logit.std(dim=-1)` is PyTorch's unbiased standard deviation (divisor k - 1).
  The square root has a zero gradient where an example's logits are all equal (PyTorch's gives
  NaN there), so constant logits map to zeros with finite gradients.

  Args:
    logits: (n, k) scores, k >= 2.
  Returns:
    (n, k) standardised scores (float32 at least): mean 0, unbiased std ~1 per example.
  """
  z = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  k = z.shape[-1]
  if k < 2:
    raise ValueError(f'standardize_logits needs at least 2 classes; got logits {logits.shape}')
  centred = z - jnp.mean(z, axis=-1, keepdims=True)
  std = safe_sqrt(jnp.sum(centred * centred, axis=-1, keepdims=True) / (k - 1))
  return centred / (STANDARDIZE_EPS + std)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean cross-entropy: -mean_n log softmax(z_n)[y_n].

  Args:
    logits: (n, k) unnormalised scores.
    labels: (n,) integer class indices in [0, k).
  Returns:
    A scalar.
  """
  log_probs = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)))
  picked = jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=-1)  # (n, 1)
  return -jnp.mean(picked)


def softened_kl(
    teacher_logits: jax.Array, student_logits: jax.Array, temperature: float
) -> jax.Array:
  """Hinton KD: tau^2 * mean_n KL(softmax(t_n / tau) || softmax(s_n / tau)).

  KL(p || q) = sum_k p_k (log p_k - log q_k), summed over classes and averaged over examples
  (PyTorch's kl_div(..., reduction='batchmean') * tau^2). The tau^2 keeps gradient magnitudes
  comparable across temperatures. No stop-gradient inside: the caller applies
  `jax.lax.stop_gradient` to whichever side is the target (FFKD's feedback loss swaps them).

  Args:
    teacher_logits: (n, k) logits of the target distribution p.
    student_logits: (n, k) logits of the distribution q being fitted.
    temperature: tau > 0.
  Returns:
    A scalar >= 0.
  """
  dtype = jnp.promote_types(
      jnp.promote_types(teacher_logits.dtype, student_logits.dtype), jnp.float32
  )
  log_p = jax.nn.log_softmax(teacher_logits.astype(dtype) / temperature)  # (n, k)
  log_q = jax.nn.log_softmax(student_logits.astype(dtype) / temperature)  # (n, k)
  kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)  # (n,)
  return temperature**2 * jnp.mean(kl)


def top_k_correct(logits: jax.Array, labels: jax.Array, k: int = 1) -> jax.Array:
  """Per-example top-k correctness: 1.0 where the label is among the k highest logits.

  Ties are broken as `jax.lax.top_k` does (lower index first), so constant logits do not
  count every example as correct. Returns a vector so that the caller can apply an eval mask:
  accuracy = sum(correct * mask) / sum(mask).

  Args:
    logits: (n, classes) scores.
    labels: (n,) integer labels.
    k: how many top classes count (static).
  Returns:
    (n,) float32 of 0.0 / 1.0.
  """
  _, top_indices = jax.lax.top_k(logits, k)  # (n, k)
  hit = jnp.any(top_indices == labels[:, None].astype(top_indices.dtype), axis=-1)  # (n,)
  return hit.astype(jnp.float32)
