"""FFKD's losses, as the code that is very likely its authors' computes them.

FFKD is "Reciprocal Teacher-Student Learning via Forward and Feedback Knowledge Distillation"
(Gou et al., IEEE Transactions on Multimedia 26, 2024). Its full text is not public; the code of
wp502/SKD-RSL (`zoo/Our_1.py`, `OurLoss`; driven by `train_one_epoch.py::train_our_distill`) is
taken as its specification (docs/FFKD.md). For stage pair k: teacher map U_k, student map V_k,
CKA_k = linear CKA of the two flattened maps (`ffkd_jax.cka.layer_cka`, both stop-gradient).

  channel_kl(target, source, T)    the channel-wise spatial-softmax KL L_k of one pair
  forward_channel_loss(cka, L)     sum_k CKA_k L_k (`is_use_fwd_cka`), or sum_k L_k
  feedback_channel_loss(cka, L)    sum of L_k over the k with CKA_k <= mean_k CKA_k
                                   (`is_use_fdbk_cka`), or sum_k L_k

Each is a pure function of its arrays; the caller places the stop-gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def channel_kl(target: jax.Array, source: jax.Array, temperature: float) -> jax.Array:
  """Channel-wise spatial-softmax KL of FFKD's authors' code: each channel's map as a
  distribution over its H*W positions.

    q(X)[i, c, :] = softmax over positions of X[i, :, :, c] / T
    channel_kl    = T^2 / (n C) * sum_{i, c} KL(q(target)[i, c] || q(source)[i, c])

  wp502/SKD-RSL, zoo/Our_1.py, `OurLoss.forward`: `nn.KLDivLoss(reduction='sum')(
  F.log_softmax(input / T), F.softmax(target / T)) * T^2 / (N C)` on maps reshaped to
  (N, C, H*W), which is KL(target || input). Its forward call has input = the regressed student,
  target = the teacher (`channel_kl(U, R_fwd(V), T)` here); its feedback call input = the
  teacher, target = the feedback-regressed student (`channel_kl(R_fb(sg(V)), U, T)`). Both
  arguments are used as given, gradients flowing into both: the caller places the stop-gradients.

  Args:
    target: (n, h, w, c) NHWC map whose distribution is the KL's reference.
    source: (n, h, w, c) map of the same shape.
    temperature: T > 0.
  Returns:
    A scalar.
  """
  if target.shape != source.shape or target.ndim != 4:
    raise ValueError(
        'channel_kl needs two NHWC maps of the same shape; got '
        f'{target.shape} and {source.shape}'
    )
  n, h, w, c = target.shape

  def log_q(x):  # (n, h, w, c) -> (n, c, h*w) log-probabilities over positions
    x = jnp.transpose(x.astype(jnp.float32), (0, 3, 1, 2)).reshape(n, c, h * w)
    return jax.nn.log_softmax(x / temperature, axis=-1)

  log_target, log_source = log_q(target), log_q(source)
  kl = jnp.sum(jnp.exp(log_target) * (log_target - log_source))
  return kl * (temperature * temperature) / (n * c)


def _check_stage_values(name: str, cka: jax.Array, losses: jax.Array) -> None:
  if cka.ndim != 1 or cka.shape != losses.shape or not cka.shape[0]:
    raise ValueError(
        f'{name} needs one CKA and one channel loss per stage pair, two (K,) arrays with '
        f'K >= 1; got shapes {cka.shape} and {losses.shape}'
    )


def forward_channel_loss(cka: jax.Array, losses: jax.Array, weighted: bool = True) -> jax.Array:
  """The student's channel term: sum_k CKA_k L_k, or sum_k L_k with `weighted=False`.

  wp502/SKD-RSL zoo/Our_1.py, `OurLoss.forward`, the `is_use_fwd_cka` branch: each pair's loss
  times its CKA score (times 100 there with `is_100cka`; the caller scales `cka`). The CKA is
  used as given: pass it stop-gradient (the code computes it on detached maps).

  Args:
    cka: (K,) the pairs' CKA scores.
    losses: (K,) the pairs' channel losses L_k.
    weighted: the forward CKA switch.
  Returns:
    A scalar.
  """
  _check_stage_values('forward_channel_loss', cka, losses)
  return jnp.sum(cka * losses) if weighted else jnp.sum(losses)


def feedback_selection(cka: jax.Array) -> jax.Array:
  """(K,) 1.0 for the pairs the feedback trains on, CKA_k <= mean CKA (the least understood
  ones; `each_cka <= cka_mean` in zoo/Our_1.py), else 0.0; no gradient."""
  cka = jax.lax.stop_gradient(cka)
  return (cka <= jnp.mean(cka)).astype(jnp.float32)


def feedback_channel_loss(cka: jax.Array, losses: jax.Array, selected: bool = True) -> jax.Array:
  """The teacher's channel term: the sum of L_k over the pairs with CKA_k <= mean_k CKA_k, or
  over all pairs with `selected=False`.

  wp502/SKD-RSL zoo/Our_1.py, `OurLoss.forward(..., is_feedback=True)`, the `is_use_fdbk_cka`
  branch: the CKA only selects (an unweighted sum of the selected pairs' losses), so its scale
  (x100 or not) does not matter. At least one pair is always selected (the minimum is at most
  the mean).

  Args:
    cka: (K,) the pairs' CKA scores.
    losses: (K,) the pairs' feedback channel losses.
    selected: the feedback CKA switch.
  Returns:
    A scalar.
  """
  _check_stage_values('feedback_channel_loss', cka, losses)
  if not selected:
    return jnp.sum(losses)
  return jnp.sum(feedback_selection(cka) * losses)
