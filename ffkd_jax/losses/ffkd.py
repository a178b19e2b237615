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

import functools

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

  Departures from that code, in how and not what it computes: the softmaxes run over axes 1, 2 of
  the NHWC maps instead of on a (N, C, H*W) transpose, and the gradient is written out (a custom
  VJP) instead of autodiff's, per distribution with p_t = q(target), p_s = q(source) and
  KL_ic = sum_j p_t (log p_t - log p_s):

    d/d target = T / (n C) * p_t (log p_t - log p_s - KL_ic),   d/d source = T / (n C) (p_s - p_t)

  On the 2-core CPU, at FFKD's first-stage map (64, 32, 32, 64), the transpose form took 16 ms
  forward and 51 ms for both gradients, this one 4 and 23 ms (2026-12-01). Tested against a
  NumPy transcription of Our_1.py and, for the gradients, against its finite differences.

  Args:
    target: (n, h, w, c) NHWC map whose distribution is the KL's reference.
    source: (n, h, w, c) map of the same shape.
    temperature: T > 0, a Python number (it is static in the compiled step).
  Returns:
    A float32 scalar.
  """
  if target.shape != source.shape or target.ndim != 4:
    raise ValueError(
        'channel_kl needs two NHWC maps of the same shape; got '
        f'{target.shape} and {source.shape}'
    )
  try:
    temperature = float(temperature)
  except TypeError as error:  # a traced value: the custom VJP takes T as a static argument
    raise ValueError(
        f'channel_kl: temperature must be a Python number, got {type(temperature).__name__}'
    ) from error
  # float32 in, so that the VJP saves no input; autodiff casts the gradients back to each
  # input's dtype
  return _channel_kl(target.astype(jnp.float32), source.astype(jnp.float32), temperature)


def _spatial_log_softmax(x: jax.Array, temperature: float) -> jax.Array:
  """log q(x) of float32 NHWC `x`: the log-softmax over axes 1, 2 (positions) of x / T."""
  z = x / temperature
  z = z - jnp.max(z, axis=(1, 2), keepdims=True)
  return z - jnp.log(jnp.sum(jnp.exp(z), axis=(1, 2), keepdims=True))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _channel_kl(target, source, temperature):
  return _channel_kl_forward(target, source, temperature)[0]


def _channel_kl_forward(target, source, temperature):
  n, _, _, c = target.shape
  log_target = _spatial_log_softmax(target, temperature)
  log_source = _spatial_log_softmax(source, temperature)
  p_target = jnp.exp(log_target)
  log_ratio = log_target - log_source
  per_channel = jnp.sum(p_target * log_ratio, axis=(1, 2), keepdims=True)  # KL_ic, (n, 1, 1, c)
  value = jnp.sum(per_channel) * (temperature * temperature / (n * c))
  return value, (p_target, log_source, log_ratio, per_channel)


def _channel_kl_backward(temperature, residuals, cotangent):
  p_target, log_source, log_ratio, per_channel = residuals
  n, _, _, c = p_target.shape
  k = cotangent * (temperature / (n * c))
  d_target = k * p_target * (log_ratio - per_channel)
  d_source = k * (jnp.exp(log_source) - p_target)
  return d_target, d_source


_channel_kl.defvjp(_channel_kl_forward, _channel_kl_backward)


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
