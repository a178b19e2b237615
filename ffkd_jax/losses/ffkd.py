"""FFKD's forward and feedback losses.

FFKD is "Reciprocal Teacher-Student Learning via Forward and Feedback Knowledge Distillation"
(Gou et al., IEEE Transactions on Multimedia 26, 2024). Its full text is not public. Two sets of
formulas live here:
- `channel_kl`: the channel-wise spatial-softmax KL of the code that is very likely its authors'
  (wp502/SKD-RSL, zoo/Our_1.py), tested against a NumPy transcription of that file; the method
  that uses it is still to be built (issue "FFKD as its authors' code does it").
- The rest: this project's earlier reconstruction (docs/FFKD.md), not the authors' code, which
  `ffkd_jax/methods/ffkd.py` runs today:

For one layer pair: teacher map U (n, H, W, C), student map V mapped by a connector to the same
shape, channel understanding omega[c] = CKA(U[..., c], V[..., c]) from `ffkd_jax.cka.channel_cka`.

  w[c]   = C * softmax_c((1 - sg(omega[c])) / tau_w)                 channel_weights
  L_feat = mean_c w[c] * mean_{n,h,w} (V[..., c] - sg(U[..., c]))^2  weighted_feature_loss
  L_fb   = mean_c w[c] * (1 - omega[c])                               feedback_alignment_loss

For the feedback loss, omega is computed with sg(V), so its gradient reaches only the teacher.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def channel_weights(omega: jax.Array, temperature: float, scale: float | None = None) -> jax.Array:
  """CKA weighting constraint: w = scale * softmax((1 - sg(omega)) / temperature) over channels.

  Channels the student understands least (smallest omega) weigh most. The softmax is over the
  last axis; omega is stop-gradiented, so the weights carry no gradient. With the default
  scale = C (the number of channels, omega.shape[-1]) the weights sum to C, i.e. their mean is
  1, and uniform omega gives w = 1 (the same scale as the unweighted loss).

  Args:
    omega: (..., c) channel CKA values in [0, 1].
    temperature: tau_w > 0; large tau_w -> uniform weights, small -> the worst channel only.
    scale: total weight per layer; None means c.
  Returns:
    (..., c) weights, each row summing to `scale`.
  """
  omega = jax.lax.stop_gradient(omega)
  if scale is None:
    scale = omega.shape[-1]
  return scale * jax.nn.softmax((1.0 - omega) / temperature, axis=-1)


def weighted_feature_loss(u: jax.Array, v: jax.Array, weights: jax.Array) -> jax.Array:
  """Channel-weighted feature MSE: mean_c w[c] * mean_{n,h,w} (v[..., c] - sg(u[..., c]))^2.

  The teacher map gets no gradient (forward loss updates the student and its connector only).
  The weights are used as given (`channel_weights` already stops their gradient).

  Args:
    u: (n, h, w, c) teacher map U.
    v: (n, h, w, c) student map V after the connector.
    weights: (c,) channel weights (all ones for the unweighted loss).
  Returns:
    A scalar.
  """
  if u.shape != v.shape:
    raise ValueError(
        f'weighted_feature_loss needs the teacher map and the connector-mapped student map '
        f'in the same shape; got teacher {u.shape} and student {v.shape}'
    )
  if weights.shape != (u.shape[-1],):
    raise ValueError(
        f'weighted_feature_loss needs one weight per channel, shape ({u.shape[-1]},); '
        f'got {weights.shape}'
    )
  diff = v - jax.lax.stop_gradient(u)  # (n, h, w, c)
  per_channel = jnp.mean(diff * diff, axis=tuple(range(diff.ndim - 1)))  # (c,)
  return jnp.mean(weights * per_channel)


def feedback_alignment_loss(omega: jax.Array, weights: jax.Array) -> jax.Array:
  """Feedback term of the teacher's loss: mean_c w[c] * (1 - omega[c]).

  omega must come from `channel_cka(U, sg(V))` so that only the teacher is pushed toward
  forms the student can follow. With stacked layers, (l, c) inputs, the per-layer means are
  summed over l (the sum over layer pairs in docs/FFKD.md).

  Args:
    omega: (c,) or (l, c) channel CKA values.
    weights: the same shape, channel weights.
  Returns:
    A scalar.
  """
  if omega.shape != weights.shape:
    raise ValueError(
        f'feedback_alignment_loss needs omega and weights in the same shape; got '
        f'{omega.shape} and {weights.shape}'
    )
  return jnp.sum(jnp.mean(weights * (1.0 - omega), axis=-1))


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
